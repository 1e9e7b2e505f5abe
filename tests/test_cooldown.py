"""benchmarks/cooldown.sh: a branch of the long run whose learning rate decays to LR_MIN (warmup-stable-decay)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffgen.tasks.generation.checkpoints import read_training_weights
from diffgen.tasks.generation.module import train_generation
from tests.test_training import TINY, tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cooldown.sh"


def cooldown(*args: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the `diffgen` of this interpreter
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path, **env})


@pytest.mark.parametrize("args, env, fragment", [
    ((), {}, "STEPS must be a whole number of steps above the warm-up (300)"),
    (("abc",), {}, "STEPS must be a whole number"),
    (("300",), {}, "above the warm-up (300)"),
    (("10",), {"WARMUP": "x"}, "WARMUP must be a whole number"),
])
def test_bad_arguments_give_one_line_errors(tmp_path: Path, args, env, fragment):
    res = cooldown(*args, COOL=str(tmp_path / "cool"), **env)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and fragment in res.stderr and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "cool").exists()


def test_branch_starts_from_the_long_runs_checkpoint_and_ends_at_lr_min(tmp_path: Path):
    run, cool = tmp_path / "long", tmp_path / "cool"
    train_generation(tiny_config(run, max_steps=2))
    overrides = [*TINY, "trainer.compile=false", "trainer.precision=32-true", "optim.lr=1.0e-3"]
    res = cooldown("4", "1", *overrides, RUN=str(run), COOL=str(cool), WARMUP="1", LR_MIN="2.0e-5")
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(cool / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2e-5, rel=1e-9)
    # the branch started from the long run's last weights (trained and EMA), and left the long run's folder alone
    ema, raw = read_training_weights(str(cool / "start.safetensors"))
    long_sd = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert raw.keys() == ema.keys() and len(raw) > 10
    for key in raw:
        torch.testing.assert_close(raw[key], long_sd[f"diffusion.{key}"], rtol=0, atol=0)
        torch.testing.assert_close(ema[key], long_sd[f"ema.module.{key}"], rtol=0, atol=0)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt", "step2.ckpt"]

    for p in (cool / "checkpoints").iterdir():
        p.unlink()
    res = cooldown("4", RUN=str(run), COOL=str(cool), WARMUP="1")
    assert res.returncode == 2 and "exists without a checkpoint" in res.stderr
