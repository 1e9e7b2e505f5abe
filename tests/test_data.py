"""Real-data checks of the QM9 loader against the published EDM/Cormorant protocol (shared/reference),
and what the loader does with broken cache files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch_geometric.utils import scatter

from diffgen.data.cache import CacheError, default_cache_dir, stamp_path, verify
from diffgen.data.elements import ATOMIC_NUMBERS
from diffgen.data.qm9 import (
    CACHE_VERSION,
    QM9,
    TARGETS,
    molecules_from_table,
    node_count_histogram,
    read_qm9pack,
    split_indices,
)
from diffgen.errors import DiffgenError

# Train node-count histogram with H, from qm9_generation.md (EDM's histogram): atoms -> molecules
REFERENCE_HISTOGRAM = {
    3: 1, 4: 4, 5: 5, 6: 9, 7: 16, 8: 49, 9: 124, 10: 362, 11: 807, 12: 1689, 13: 3060, 14: 5136,
    15: 7796, 16: 10644, 17: 13025, 18: 13364, 19: 13832, 20: 9482, 21: 9970, 22: 3393, 23: 4848,
    24: 539, 25: 1506, 26: 48, 27: 266, 28: 0, 29: 25,
}
# Train atom-type frequencies (%) from qm9_generation.md, with the precision they are quoted to
REFERENCE_FREQ = {1: (51.2, 0.05), 6: (35.2, 0.05), 7: (5.6, 0.05), 8: (7.8, 0.05), 9: (0.13, 0.005)}
HARTREE_EV = 27.2114


def _idx(ds: QM9) -> np.ndarray:
    return ds.idx.numpy()


@pytest.fixture(scope="module")
def split_idx():
    return {s: _idx(QM9(split=s)) for s in ("train", "valid", "test", "all")}


def test_split_sizes(split_idx):
    assert {s: len(v) for s, v in split_idx.items()} == {
        "train": 100_000, "valid": 17_748, "test": 13_083, "all": 130_831}


def test_splits_disjoint_and_cover_all_gdb_indices(split_idx):
    all_idx = split_idx["all"]
    # "all" is in GDB-9 index order, unique, 1-based, within 1..133,885 (3,054 uncharacterised dropped)
    assert np.all(np.diff(all_idx) > 0)
    assert all_idx[0] == 1 and all_idx[-1] == 133_885
    parts = [set(split_idx[s].tolist()) for s in ("train", "valid", "test")]
    assert sum(len(p) for p in parts) == 130_831  # no duplicates inside a split
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(all_idx.tolist())


def test_split_is_the_numpy_seed0_permutation(split_idx):
    """The recipe of data_sources.md: np.random.seed(0); permutation of the index-sorted table."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        perm = np.random.permutation(130_831)
    finally:
        np.random.set_state(state)
    all_idx = split_idx["all"]
    np.testing.assert_array_equal(split_idx["train"], all_idx[perm[:100_000]])
    np.testing.assert_array_equal(split_idx["valid"], all_idx[perm[100_000:117_748]])
    np.testing.assert_array_equal(split_idx["test"], all_idx[perm[117_748:]])


def test_train_node_count_histogram_matches_edm(qm9_train):
    hist = node_count_histogram(qm9_train)
    assert hist.shape == (30,)
    expected = torch.zeros(30, dtype=torch.long)
    for n, c in REFERENCE_HISTOGRAM.items():
        expected[n] = c
    assert torch.equal(hist, expected)
    # same histogram counted independently from the per-molecule tensors
    counts = torch.tensor([qm9_train[i].z.numel() for i in range(0, 100_000, 997)])
    sub = node_count_histogram(qm9_train[torch.arange(0, 100_000, 997)])
    assert torch.equal(sub, torch.bincount(counts, minlength=30))


def test_train_atom_type_frequencies(qm9_train):
    z = qm9_train.z  # all atoms of the split, concatenated
    assert set(torch.unique(z).tolist()) == set(ATOMIC_NUMBERS)
    assert z.numel() / len(qm9_train) == pytest.approx(18.0, abs=0.05)  # mean atoms per molecule
    for zz, (ref, tol) in REFERENCE_FREQ.items():
        pct = 100.0 * float((z == zz).sum()) / z.numel()
        assert abs(pct - ref) <= tol, (zz, pct, ref)


def test_methane_is_first_molecule(qm9_all):
    mol = qm9_all[0]
    assert int(mol.idx) == 1
    assert qm9_all.smiles[0] == "C"
    assert sorted(mol.z.tolist()) == [1, 1, 1, 1, 6]
    assert mol.pos.shape == (5, 3) and mol.y.shape == (1, len(TARGETS))
    c = mol.pos[mol.z == 6][0]
    d_ch = (mol.pos[mol.z == 1] - c).norm(dim=-1)
    assert torch.allclose(d_ch, torch.full((4,), 1.09), atol=0.01)
    # tetrahedral: H-H distances = C-H * sqrt(8/3)
    h = mol.pos[mol.z == 1]
    d_hh = torch.pdist(h)
    assert torch.allclose(d_hh, torch.full((6,), 1.09 * (8 / 3) ** 0.5), atol=0.02)
    gap = float(mol.y[0, TARGETS.index("gap")])
    assert gap == pytest.approx(0.5048 * HARTREE_EV, abs=2e-3)
    # homo (-0.3877 Ha) + gap = lumo (0.1171 Ha), all in eV
    homo, lumo = (float(mol.y[0, TARGETS.index(k)]) for k in ("homo", "lumo"))
    assert homo == pytest.approx(-0.3877 * HARTREE_EV, abs=2e-3)
    assert lumo - homo == pytest.approx(gap, abs=2e-3)


def test_remove_h(qm9_train):
    """``remove_h`` drops exactly the hydrogens of every molecule and keeps order, positions, targets and GDB
    indices: the first 2,000 train molecules parsed from qm9pack by the code that builds the no-H cache,
    against the stored with-H split."""
    n = 2000
    rows = split_indices()["train"][:n]
    noh, noh_slices = QM9.collate(molecules_from_table(read_qm9pack().iloc[rows], remove_h=True))
    ref, ref_slices = QM9.collate([qm9_train[i] for i in range(n)])
    np.testing.assert_array_equal(noh.idx.numpy(), ref.idx.numpy())
    assert not bool((noh.z == 1).any())
    assert set(torch.unique(noh.z).tolist()) <= {6, 7, 8, 9} and bool((noh.z == 6).any())
    # per molecule: the heavy atoms of the H version, same order and positions
    heavy = ref.z != 1
    assert torch.equal(noh.z, ref.z[heavy])
    assert torch.equal(noh.pos, ref.pos[heavy])
    mol_of_atom = torch.repeat_interleave(torch.arange(n), ref_slices["z"].diff())
    n_heavy = scatter(heavy.long(), mol_of_atom, dim=0, dim_size=n, reduce="sum")
    assert torch.equal(noh_slices["z"].diff(), n_heavy)
    assert int(n_heavy.max()) <= 9 and int(n_heavy.min()) >= 1
    assert torch.equal(noh.y, ref.y)


def test_unknown_split_or_subset_raises():
    with pytest.raises(DiffgenError):
        QM9(split="training")
    with pytest.raises(DiffgenError):
        QM9(split="train", subset="half2")
    with pytest.raises(DiffgenError):
        QM9(split="valid", subset="half0")


def test_half_subsets(split_idx):
    h0, h1 = _idx(QM9(subset="half0")), _idx(QM9(subset="half1"))
    assert len(h0) == len(h1) == 50_000
    assert not (set(h0.tolist()) & set(h1.tolist()))
    # the two halves are the first / second 50,000 of the train permutation
    np.testing.assert_array_equal(np.concatenate([h0, h1]), split_idx["train"])


# ------------------------------------------------------------------ broken cache files

def _copy_processed(dst_root, names):
    """Copy processed files of the default cache (and their stamps) into ``dst_root/qm9/processed``."""
    QM9(split="test")  # the default cache exists and is stamped
    src = default_cache_dir() / "qm9" / "processed"
    dst = dst_root / "qm9" / "processed"
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        for f in (src / name, stamp_path(src / name)):
            shutil.copyfile(f, dst / f.name)
    return src, dst


def _edit_stamp(path, **changes):
    stamp = json.loads(stamp_path(path).read_text())
    for key, value in changes.items():
        stamp[key] = {**stamp[key], **value} if isinstance(value, dict) else value
    stamp_path(path).write_text(json.dumps(stamp))


def _swap_in(other, with_stamp):
    def corrupt(path):
        shutil.copyfile(path.with_name(other), path)
        if with_stamp:
            shutil.copyfile(stamp_path(path.with_name(other)), stamp_path(path))
    return corrupt


QM9_CORRUPTIONS = {
    "zero bytes": ("test_H.pt", lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    "truncated": ("test_H.pt", lambda p: p.write_bytes(p.read_bytes()[:100_000]), "truncated"),
    "swapped split": ("test_H.pt", _swap_in("valid_H.pt", with_stamp=False), "wrong size"),
    "swapped split and stamp": ("test_H.pt", _swap_in("valid_H.pt", with_stamp=True), "swapped file?"),
    "stale version": ("test_H.pt", lambda p: _edit_stamp(p, version=CACHE_VERSION - 1), "format version"),
    "wrong counts": ("test_H.pt", lambda p: _edit_stamp(p, counts={"molecules": 13_082}), "13082 molecules"),
    "no stamp": ("test_H.pt", lambda p: stamp_path(p).unlink(), "no version stamp"),
    "truncated smiles": ("smiles_H.pt", lambda p: p.write_bytes(p.read_bytes()[:1000]), "truncated"),
}


@pytest.mark.parametrize("case", list(QM9_CORRUPTIONS))
def test_broken_processed_file_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys, case):
    """Each kind of broken file is caught on load, reported in one line on stderr and rebuilt (the rebuild is
    stubbed here with a copy of the good file; the real one is exercised by the CLI test below)."""
    name, corrupt, fragment = QM9_CORRUPTIONS[case]
    src, dst = _copy_processed(tmp_path, ["test_H.pt", "valid_H.pt", "smiles_H.pt"])
    corrupt(dst / name)
    builds = []

    def fake_build(self):
        builds.append(self.processed_dir)
        for n in ("test_H.pt", "smiles_H.pt"):
            for f in (src / n, stamp_path(src / n)):
                shutil.copyfile(f, dst / f.name)

    monkeypatch.setattr(QM9, "_build", fake_build)
    capsys.readouterr()
    ds = QM9(root=tmp_path, split="test")
    if name.startswith("smiles"):  # the SMILES file is read (and verified) on first use
        assert ds.smiles[:3] == QM9(split="test").smiles[:3]
    assert builds == [str(dst)]
    assert len(ds) == 13_083 and torch.equal(ds.idx, QM9(split="test").idx)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(dst / name) in err[0] and fragment in err[0] and "rebuilding" in err[0], err


def test_broken_processed_file_that_a_rebuild_does_not_fix_is_a_one_line_error(tmp_path, monkeypatch):
    _, dst = _copy_processed(tmp_path, ["test_H.pt"])
    (dst / "test_H.pt").write_bytes(b"")
    monkeypatch.setattr(QM9, "_build", lambda self: None)
    with pytest.raises(CacheError) as info:
        QM9(root=tmp_path, split="test")
    msg = str(info.value)
    assert isinstance(info.value, DiffgenError) and "\n" not in msg
    assert str(dst / "test_H.pt") in msg and "delete it" in msg


def test_cli_recovers_from_a_zero_byte_processed_file(tmp_path):
    """A kill during the first build used to leave a 0-byte file after which every command printed `Aborted.`
    (EOFError inside click). Now the command notes the broken file, rebuilds the QM9 cache (one real build,
    ~25 s) and runs."""
    names = [f"{k}_H.pt" for k in ("train", "valid", "test", "all", "half0", "half1", "smiles")]
    _, dst = _copy_processed(tmp_path, names)
    (dst / "test_H.pt").write_bytes(b"")
    env = {**os.environ, "DIFFGEN_CACHE": str(tmp_path), "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "diffgen.cli", "evaluate", "--dataset", "qm9", "--split", "test",
                          "--limit", "3", "--no-novelty"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Aborted" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    notes = [line for line in res.stderr.splitlines() if line.startswith("diffgen:")]
    assert len(notes) == 1 and "test_H.pt" in notes[0] and "rebuilding" in notes[0], res.stderr
    assert "QM9 test (3 molecules)" in res.stdout
    verify(dst / "test_H.pt", "qm9/test_H", CACHE_VERSION, {"molecules": 13_083})
