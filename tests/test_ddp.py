"""Lightning DDP is more than a flag: two CPU processes (strategy=ddp, gloo) train the generator a few steps; the
ranks see different molecules and end with identical weights (trained and EMA)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_packed import head, packed_train  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


# the PyG loader (Lightning injects a DistributedSampler) costs another ~20 s: behind -m slow
@pytest.mark.parametrize("loader", ["resident", pytest.param("pyg", marks=pytest.mark.slow)])
def test_ddp_two_cpu_processes(loader, packed_train, tmp_path):  # noqa: F811
    from diffgen.data.packed import save_packed

    data = ["data.loader=pyg"] if loader == "pyg" else [
        f"data.packed={save_packed({'train': head(packed_train, 64), 'valid': head(packed_train, 16)}, tmp_path / 'p.safetensors')}"]
    args = [f"trainer.out_dir={tmp_path / 'run'}", "trainer.max_steps=3", "trainer.max_epochs=-1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.sample_every_n_epochs=0",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "model.hidden=16",
            "model.n_layers=2", "data.batch_size=4", *data]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_probe.py"), str(tmp_path), *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    seen = [torch.cat(r["seen"]) for r in ranks]
    assert all(s.numel() == 3 * 4 for s in seen)  # 3 steps of 4 molecules on each rank
    assert not set(seen[0].tolist()) & set(seen[1].tolist())  # different data on each rank
    for key in ("state", "ema"):
        a, b = ranks[0][key], ranks[1][key]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{key} {k} differs between the ranks"
    init = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert init == 3
