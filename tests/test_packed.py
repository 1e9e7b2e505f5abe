"""Resident packed QM9 tensors (diffgen.data.packed): the same batches as PyG's collation, per-epoch and per-rank
shuffling, the compact file (round trip, verification, CLI), and training from it without qm9pack or RDKit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffgen.data.packed import PackedLoader, PackedSplit, load_packed, save_packed
from diffgen.errors import DiffgenError
from tests.conftest import BATCH_ROWS

REPO = Path(__file__).resolve().parents[1]


def head(split: PackedSplit, n: int) -> PackedSplit:
    """The first ``n`` molecules of a split."""
    end = int(split.ptr[n])
    return PackedSplit(split.pos[:end].clone(), split.z[:end].clone(), split.ptr[:n + 1].clone())


@pytest.fixture(scope="module")
def packed_train(qm9_train) -> PackedSplit:
    return PackedSplit.from_dataset(qm9_train)


def write_small(path: Path, split: PackedSplit, n_train: int = 64, n_valid: int = 16) -> Path:
    return save_packed({"train": head(split, n_train), "valid": head(split, n_valid)}, path)


def test_packed_batch_equals_pyg_collation(packed_train, qm9_batch):
    b = packed_train.batch(torch.tensor(BATCH_ROWS))
    assert b.num_graphs == qm9_batch.num_graphs == len(BATCH_ROWS)
    for key in ("pos", "z", "batch", "ptr"):
        assert torch.equal(getattr(b, key), getattr(qm9_batch, key)), key
    assert packed_train.node_histogram().sum() == 100_000
    assert int(packed_train.node_histogram().argmax()) == 19  # QM9's most common size with H


def test_loader_shuffles_per_epoch_and_shards_by_rank(packed_train):
    split = head(packed_train, 103)
    epoch = {"e": 0}
    loaders = [PackedLoader(split, 10, seed=3, epoch=lambda: epoch["e"], rank=r, world_size=2) for r in (0, 1)]
    rows = [torch.cat([b.idx for b in ld]) for ld in loaders]
    assert len(loaders[0]) == 5 and all(r.numel() == 50 for r in rows)  # 52 per rank (padded), 5 full batches
    assert not set(rows[0].tolist()) & set(rows[1].tolist())  # ranks see different molecules
    again = torch.cat([b.idx for b in loaders[0]])
    assert torch.equal(again, rows[0])  # the same epoch replays the same order (resume at an epoch boundary)
    epoch["e"] = 1
    assert not torch.equal(torch.cat([b.idx for b in loaders[0]]), rows[0])  # a new epoch, a new permutation
    ordered = PackedLoader(split, 10, shuffle=False, drop_last=False)
    assert len(ordered) == 11 and torch.equal(torch.cat([b.idx for b in ordered]), torch.arange(103))
    b = next(iter(ordered))
    assert torch.equal(b.pos, split.pos[: int(split.ptr[10])])


def test_file_round_trip_and_verification(packed_train, tmp_path):
    path = write_small(tmp_path / "p.safetensors", packed_train)
    back = load_packed(path)
    small = head(packed_train, 64)
    assert torch.equal(back["train"].pos, small.pos) and torch.equal(back["train"].z, small.z)
    assert torch.equal(back["train"].ptr, small.ptr) and len(back["valid"]) == 16

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    meta = {"format": "diffgen-packed-qm9", "version": "1", "train.molecules": "64", "valid.molecules": "16"}
    cases = {
        "not found": (None, None),
        "lacks tensor 'ptr'": ({k: v for k, v in tensors.items() if k != "valid.ptr"}, meta),
        "metadata says 65": (tensors, {**meta, "train.molecules": "65"}),
        "not a diffgen packed QM9 data checkpoint": (tensors, {**meta, "format": "diffgen-generator"}),
        "ptr does not run from 0": ({**tensors, "train.ptr": tensors["train.ptr"] + 1}, meta),
        "non-finite": ({**tensors, "train.pos": tensors["train.pos"].clone().fill_(float("nan"))}, meta),
    }
    for i, (expect, (t, m)) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.safetensors"
        if t is not None:
            save_file(t, str(bad), metadata=m)
        with pytest.raises(DiffgenError, match=expect) as err:
            load_packed(bad)
        assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DiffgenError, match="cannot read"):
        load_packed(truncated)


def test_pack_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "p.safetensors"
    out.write_text("mine")
    res = subprocess.run([sys.executable, "-m", "diffgen.cli", "pack-qm9", str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error:") and res.stderr.count("\n") == 1
    assert out.read_text() == "mine"


#: Runs `diffgen train` with rdkit, qm9pack and pandas made unimportable (as on a bare GPU machine).
NO_CHEM = """
import sys
for name in ("rdkit", "qm9pack", "pandas"):
    sys.modules[name] = None
from diffgen.cli import main
sys.argv = ["diffgen", *sys.argv[1:]]
main()
"""


def tiny_train_args(out_dir: Path, packed: Path, steps: int = 2) -> list[str]:
    return ["train", "--out-dir", str(out_dir), f"data.packed={packed}", "data.batch_size=8",
            f"trainer.max_steps={steps}", "trainer.sample_every_n_epochs=0", "trainer.accelerator=cpu",
            "trainer.devices=1", "trainer.limit_val_batches=1", "model.hidden=16", "model.n_layers=2"]


def test_trains_from_a_packed_file_without_qm9pack_or_rdkit(packed_train, tmp_path):
    packed = write_small(tmp_path / "p.safetensors", packed_train)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFGEN_CACHE": str(tmp_path / "empty-cache")}
    res = subprocess.run([sys.executable, "-c", NO_CHEM, *tiny_train_args(tmp_path / "run", packed)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["node_histogram"] == head(packed_train, 64).node_histogram().tolist()
    assert not (tmp_path / "empty-cache").exists()  # the QM9 cache was never touched
    res = subprocess.run([sys.executable, "-m", "diffgen.cli", *tiny_train_args(tmp_path / "run2", tmp_path / "no")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "packed data file not found" in res.stderr and res.stderr.count("\n") == 1
