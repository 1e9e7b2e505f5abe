"""benchmarks/speedrun.py end to end on a smoke budget (the yardstick of training recipes), and its bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speedrun.py"
TINY = ["--set", "model.hidden=16", "--set", "model.n_layers=1", "--set", "data.batch_size=8"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def test_smoke_speedrun_trains_scores_and_writes_its_row(tmp_path):
    res = _run("run", "--name", "smoke", "--molecules", "20", "--n-score", "3", "--sampler-steps", "2",
               "--out-dir", str(tmp_path), *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((tmp_path / "smoke-seed0.json").read_text())
    assert row["steps"] == 3 and row["molecules_seen"] == 24  # ceil(20 / 8) whole batches
    assert row["n_scored"] == 3 and row["n_molecules"] == 3
    assert 0.0 <= row["atom_stability"] <= 1.0 and row["train_molecules_per_s"] > 0
    assert row["overrides"] == ["model.hidden=16", "model.n_layers=1", "data.batch_size=8"]
    assert row["threads"] >= 1 and "load_before" in row and "load_mean" in row and row["commit"]
    assert row["eta"] == 1.0  # the yardstick's scoring sampler stays the published solver


def test_bad_input_is_a_one_line_error_before_training(tmp_path):
    for args, fragment in ((["--molecules", "0"], "--molecules must be positive"),
                           (["--set", "model.hidden=0"], "model.hidden must be >= 1"),
                           (["--config", "no_such_config"], "config file not found"),
                           (["--eta", "-2"], "eta must be a finite number >= 0")):
        res = _run("run", "--name", "bad", "--out-dir", str(tmp_path), *args, cwd=tmp_path)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and fragment in lines[0], res.stderr
    assert not list(tmp_path.iterdir())
