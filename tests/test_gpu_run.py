"""The one-call GPU training command (benchmarks/gpu_run.py), run on the CPU with a tiny budget: a first chunk from
the committed training state, a second chunk resuming from the first's last.ckpt, each with an fp16 export that loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_packed import head, packed_train  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


def chunk(tmp_path: Path, out: str, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_run.py"), "--out", str(tmp_path / out), "--data", str(data),
           "--accelerator", "cpu", "--batch-size", "8", "--run-dir", str(tmp_path / f"run-{out}"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_gpu_run_chunks_resume_and_export_on_cpu(packed_train, tmp_path):  # noqa: F811
    from diffgen.data.packed import save_packed
    from diffgen.tasks.generation.checkpoints import load_generator

    data = save_packed({"train": head(packed_train, 64), "valid": head(packed_train, 16)}, tmp_path / "p.safetensors")
    first = chunk(tmp_path, "c1", data, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "c1" / "gpu_run.json").read_text())
    assert (report["global_step_start"], report["global_step_end"]) == (0, 2)
    second = chunk(tmp_path, "c2", data, "--max-steps", "4", "--resume", str(tmp_path / "c1" / "last.ckpt"))
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((tmp_path / "c2" / "gpu_run.json").read_text())
    assert (report["global_step_start"], report["global_step_end"]) == (2, 4)
    export = tmp_path / "c2" / "qm9_egnn_gpu.safetensors"
    gen = load_generator(export)
    assert gen.config.model.hidden == 128 and gen.config.trainer.precision == "bf16-mixed"
    assert export.stat().st_size < 16 * 2**20  # comes back through the device tool
    ckpt = torch.load(tmp_path / "c2" / "last.ckpt", weights_only=True, map_location="cpu")
    # the chunk started from the committed training state, not from random weights
    from safetensors.torch import load_file

    state = load_file(str(REPO / "benchmarks" / "state" / "qm9_egnn_long.safetensors"))
    key = next(k for k in state if not k.startswith("raw."))
    drift = (ckpt["state_dict"][f"ema.module.{key}"].float() - state[key].float()).abs().max()
    assert drift < 0.05


def test_gpu_run_refuses_missing_files_before_training(tmp_path):
    res = chunk(tmp_path, "c", tmp_path / "missing.safetensors")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: --data: file not found")
    assert not (tmp_path / "run-c").exists()
