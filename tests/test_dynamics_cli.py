"""The `diffgen dynamics` CLI: train, evaluate, predict and export on stand-in caches, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def run_cli(*args, env_extra=None):
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "diffgen.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _one_line_error(res, fragment):
    assert res.returncode != 0
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


def test_cli_train_evaluate_and_bad_input(tmp_path):
    from diffgen.data.nbody import N_FRAMES, nbody_cache_path, save_nbody_cache

    env = {"DIFFGEN_CACHE": str(tmp_path / "cache")}
    tiny = ["data.n_train=20", "data.n_valid=10", "data.n_test=10", "data.batch_size=10"]
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("valid", 10), ("test", 10)):  # stand-in caches: CLI plumbing, not physics
        path = nbody_cache_path(split, n, tmp_path / "cache")
        loc = rng.standard_normal((n, N_FRAMES, 5, 3)).astype(np.float32)
        save_nbody_cache(path, {"loc": loc, "vel": np.gradient(loc, axis=1),
                                "charges": np.sign(rng.standard_normal((n, 5)))})
    res = run_cli("dynamics", "train", "--threads", "1", "--out-dir", str(tmp_path / "run"), *tiny,
                  "trainer.max_epochs=1", env_extra=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    from typer.testing import CliRunner

    from diffgen.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["dynamics", "evaluate", "--checkpoint", str(ckpt), "--json", str(tmp_path / "m.json")],
                        env={**env, "COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "identity" in res.output and "EGNN" in res.output
    assert set(json.loads((tmp_path / "m.json").read_text())["mse"]) == {"model", "identity", "constant_velocity"}
    xyz = tmp_path / "pred.xyz"
    res = runner.invoke(app, ["dynamics", "predict", "--checkpoint", str(ckpt), "--out", str(xyz), "--index", "2"],
                        env=env)
    assert res.exit_code == 0, res.output
    lines = xyz.read_text().splitlines()
    assert len(lines) == 3 * 7 and lines[0] == "5" and lines[1] == "input frame 30"
    _one_line_error(run_cli("dynamics", "predict", "--checkpoint", str(ckpt), "--out", str(xyz)), "exists")
    # the exported safetensors evaluates and predicts exactly as the Lightning checkpoint (fp32 weights)
    exported = tmp_path / "nbody.safetensors"
    res = runner.invoke(app, ["dynamics", "export", str(ckpt), str(exported)], env=env)
    assert res.exit_code == 0, res.output
    assert exported.stat().st_size < ckpt.stat().st_size  # no optimizer state
    res = runner.invoke(app, ["dynamics", "evaluate", "--checkpoint", str(exported), "--json",
                              str(tmp_path / "m2.json")], env={**env, "COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m2.json").read_text())["mse"] == json.loads((tmp_path / "m.json").read_text())["mse"]
    res = runner.invoke(app, ["dynamics", "predict", "--checkpoint", str(exported), "--out", str(tmp_path / "p2.xyz"),
                              "--index", "2"], env=env)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p2.xyz").read_text() == xyz.read_text()
    _one_line_error(run_cli("dynamics", "export", str(ckpt), str(exported)), "already exists")
    _one_line_error(run_cli("dynamics", "export", str(ckpt), str(tmp_path / "nbody.pt")), "must end in .safetensors")
    # missing frames (trajectories have 50 frames)
    _one_line_error(run_cli("dynamics", "train", "--out-dir", str(tmp_path / "bad"), *tiny, "data.frame_out=60",
                            env_extra=env), "frame 60 missing")
    # mismatched atom counts in a user trajectory file
    bad = tmp_path / "bad.npz"
    np.savez(bad, loc=np.zeros((2, 50, 5, 3)), vel=np.zeros((2, 50, 5, 3)), charges=np.ones((2, 4)))
    _one_line_error(run_cli("dynamics", "evaluate", "--checkpoint", str(ckpt), "--data", str(bad), env_extra=env),
                    "mismatched atom counts")
    # a trajectory file with NaN: one-line error, not a NaN MSE with exit 0
    nan = tmp_path / "nan.npz"
    loc = np.zeros((2, 50, 5, 3))
    loc[1, 30, 2, 0] = np.nan
    np.savez(nan, loc=loc, vel=np.zeros((2, 50, 5, 3)), charges=np.ones((2, 5)))
    res = runner.invoke(app, ["dynamics", "evaluate", "--checkpoint", str(ckpt), "--data", str(nan)], env=env)
    assert res.exit_code != 0 and "loc holds NaN" in str(res.exception), res.output
    _one_line_error(run_cli("dynamics", "evaluate", "--checkpoint", str(tmp_path / "nope.ckpt")), "not found")
    _one_line_error(run_cli("dynamics", "train", "--dataset", "md17"), "data.dataset must be one of")
