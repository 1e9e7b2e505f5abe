"""Lightning training on real QM9: a few steps, checkpoint, resume, export, and loading the export; an exact
resume, the newest checkpoint picked, resume errors and Ctrl-C through the CLI."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffgen.errors import DiffgenError
from diffgen.tasks.generation.checkpoints import export_generator, load_generator
from diffgen.tasks.generation.config import load_generation_config as load_config
from diffgen.tasks.generation.build import sample_molecules
from diffgen.tasks.generation.module import train_generation


#: A tiny generator run: 2 training batches per epoch, periodic checkpoints every 2 steps, every step logged.
TINY = ["trainer.limit_val_batches=2", "trainer.ckpt_every_n_steps=2", "trainer.sample_every_n_epochs=1",
        "trainer.n_eval_samples=3", "trainer.eval_steps=2", "trainer.limit_train_batches=2",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.log_every_n_steps=1",
        "model.hidden=16", "model.n_layers=2", "data.batch_size=8"]


def tiny_config(out_dir, max_steps):
    return load_config("qm9_egnn",
                       [f"trainer.out_dir={out_dir}", f"trainer.max_steps={max_steps}", *TINY])


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def logged_losses(run: Path) -> list[dict[int, float]]:
    """Per CSV version (one per fit call, in order): {logged step: train/loss}."""
    versions = sorted((run / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    out = []
    for version in versions:
        rows = csv.DictReader((version / "metrics.csv").open())
        out.append({int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")})
    return out


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_train_checkpoint_resume_and_export(tmp_path):
    cfg = tiny_config(tmp_path / "run", max_steps=2)
    task = train_generation(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert task.trainer.global_step == 2
    first_ckpt = load_ckpt(last)
    # EMA weights differ from the raw weights after training (decay < 1) and are finite
    ema = {k: v for k, v in first_ckpt["state_dict"].items() if k.startswith("ema.module.")}
    assert ema and all(torch.isfinite(v).all() for v in ema.values())

    # resuming continues from step 2 instead of starting over
    cfg2 = tiny_config(tmp_path / "run", max_steps=4)
    task2 = train_generation(cfg2)
    assert task2.trainer.global_step == 4
    resumed = load_ckpt(last)
    assert resumed["global_step"] == 4
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))  # atomic writes leave no debris

    out = export_generator(last, tmp_path / "tiny.safetensors")
    gen = load_generator(out)
    assert gen.config.model.hidden == 16
    mols = sample_molecules(gen.diffusion, gen.node_dist, 3, steps=3, seed=0)
    assert len(mols) == 3 and all(torch.isfinite(p).all() for _, p in mols)
    # the fp16 export matches the checkpoint's EMA weights to fp16 precision
    sd = gen.diffusion.state_dict()
    ema_last = {k[len("ema.module."):]: v for k, v in resumed["state_dict"].items() if k.startswith("ema.module.")}
    for k, v in ema_last.items():
        torch.testing.assert_close(sd[k], v.half().float())


def test_ema_warmup_tracks_recent_weights():
    from torch.optim.swa_utils import AveragedModel

    from diffgen.tasks.generation.module import ema_with_warmup

    model = torch.nn.Linear(3, 3)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    ema.update_parameters(model)  # first call copies
    for _ in range(50):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.update_parameters(model)
    # with warm-up the average after 50 updates weights recent steps (d = 51/60); a plain 0.999 EMA would
    # still sit ~4.9 away from the current weights, the warmed-up one is within 1
    gap = (model.weight - ema.module.weight).abs().max().item()
    assert 0.05 < gap < 1.0


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """A tiny run of 4 steps (2 epochs of 2 batches) without interruption."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train_generation(tiny_config(run, max_steps=4))
    return run


@pytest.mark.parametrize("resume_from", ["last", "periodic"])
def test_resume_continues_the_uninterrupted_run_exactly(straight_run: Path, tmp_path: Path, resume_from: str):
    """2 steps, then resumed to 4, equals 4 steps in one go: the same logged steps and losses, weights, EMA,
    optimizer moments and clipping history (measured: bitwise equal, max |difference| 0.0).

    ``last``: resume from last.ckpt, written when the first run ended (max_steps, after its validation);
    ``periodic``: from step2.ckpt, written at the end of the batch before validation (as a Ctrl-C one is).
    A restart from scratch would log steps 0 and 1 again, with the first run's losses, and the checkpoint's RNG
    states, the EMA update before batch-end checkpoints and the clipping history are each needed (each checked
    by removing it: different losses or weights)."""
    from diffgen.tasks.trainer import resume_path

    run = tmp_path / "run"
    train_generation(tiny_config(run, max_steps=2))
    if resume_from == "periodic":
        for name in ("last.ckpt", "best.ckpt"):  # leave only the batch-end checkpoint of step 2
            (run / "checkpoints" / name).unlink()
    cfg = tiny_config(run, max_steps=4)
    assert Path(resume_path(cfg.trainer)).name == ("last.ckpt" if resume_from == "last" else "step2.ckpt")
    task = train_generation(cfg)
    assert task.trainer.global_step == 4

    straight = logged_losses(straight_run)
    assert len(straight) == 1 and sorted(straight[0]) == [0, 1, 2, 3]
    first, resumed = logged_losses(run)
    assert sorted(first) == [0, 1] and sorted(resumed) == [2, 3]  # the resumed run did steps 2 and 3 only
    assert {**first, **resumed} == straight[0]  # exact float equality of every step's loss

    a, b = load_ckpt(straight_run / "checkpoints" / "last.ckpt"), load_ckpt(run / "checkpoints" / "last.ckpt")
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (4, 2)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # raw weights, EMA weights and the EMA's update count
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=1e-7, msg=key)
    assert int(b["state_dict"]["ema.n_averaged"]) == 4
    torch.testing.assert_close(b["optimizer_states"][0]["state"], a["optimizer_states"][0]["state"], rtol=0, atol=1e-7)
    assert b["grad_norms"] == a["grad_norms"] and len(a["grad_norms"]) == 4
    torch.testing.assert_close(b["rng_states"], a["rng_states"], rtol=0, atol=0)


def test_resume_path_takes_the_highest_global_step(tmp_path: Path):
    """A stale last.ckpt (what Lightning left when it wrote later saves to last-vN.ckpt) loses to a newer periodic
    checkpoint; on a tie last.ckpt wins, then a periodic one, then best.ckpt; an unreadable file is an error."""
    from diffgen.config import TrainerConfig
    from diffgen.errors import DiffgenError
    from diffgen.tasks.trainer import resume_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    tc = TrainerConfig(out_dir=str(tmp_path))
    assert resume_path(TrainerConfig(out_dir=str(tmp_path / "none"))) is None

    def put(name: str, step: int) -> None:
        torch.save({"global_step": step, "state_dict": {}}, folder / name)

    put("last.ckpt", 2)
    put("step6.ckpt", 6)
    put("best.ckpt", 5)
    assert Path(resume_path(tc)).name == "step6.ckpt"
    put("best.ckpt", 6)
    assert Path(resume_path(tc)).name == "step6.ckpt"  # same step: the periodic one, not the one after validation
    put("last.ckpt", 6)
    assert Path(resume_path(tc)).name == "last.ckpt"
    (folder / "step7.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DiffgenError, match="cannot read checkpoint .*step7.ckpt"):
        resume_path(tc)


def test_resumes_from_the_newest_checkpoint_and_never_writes_last_v(tmp_path: Path):
    """A run stopped before its first periodic checkpoint, resumed twice, never gets a last-vN.ckpt; last.ckpt holds
    the final step even between periodic saves; a stale last.ckpt next to a newer step2.ckpt is passed over."""
    run = tmp_path / "run"
    train_generation(tiny_config(run, max_steps=1))  # stops before the first periodic checkpoint (every 2 steps)
    assert ckpt_names(run) == ["last.ckpt"]
    stale = tmp_path / "stale.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", stale)
    train_generation(tiny_config(run, max_steps=3))
    steps = {name: load_ckpt(run / "checkpoints" / name)["global_step"] for name in ckpt_names(run)}
    assert steps == {"best.ckpt": 3, "last.ckpt": 3, "step2.ckpt": 2}  # last.ckpt: the final step, between saves

    shutil.copy(stale, run / "checkpoints" / "last.ckpt")  # last.ckpt at step 1, step2.ckpt at step 2
    (run / "checkpoints" / "best.ckpt").unlink()  # (at step 3) so that step2.ckpt is the newest
    train_generation(tiny_config(run, max_steps=4))
    losses = logged_losses(run)
    assert [sorted(v) for v in losses] == [[0], [1, 2], [2, 3]]  # the third run resumed at step 2, not at 1
    assert not any(name.startswith("last-v") for name in ckpt_names(run)), ckpt_names(run)
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffgen.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, **kwargs)


def assert_one_line_error(res: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def run_main(monkeypatch, capfd, *args: str) -> tuple[int, str]:
    """``diffgen.cli.main`` in-process (no interpreter start-up): (exit code, everything written to fd 2)."""
    from diffgen.cli import main

    monkeypatch.setattr(sys, "argv", ["diffgen", *args])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capfd.readouterr().err


def test_cli_resume_errors_come_before_any_training_step(tmp_path: Path, monkeypatch, capfd):
    """Resuming a run folder with another model size (a `python -m diffgen.cli train` subprocess), or from a
    truncated last.ckpt (``diffgen.cli.main`` in-process), is a one-line error with exit code 2 that writes
    nothing: no log version, no checkpoint."""
    run = tmp_path / "run"
    train_generation(tiny_config(run, max_steps=2))
    cli = ["train", "--config", "qm9_egnn", "--out-dir", str(run), "trainer.max_steps=4", *TINY]
    before = snapshot(run)
    assert_one_line_error(run_cli(*cli, "model.hidden=32"), "does not fit the configured model (diffusion.")
    assert snapshot(run) == before

    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    code, stderr = run_main(monkeypatch, capfd, *cli)
    assert_one_line_error(subprocess.CompletedProcess(cli, code, "", stderr), f"cannot read checkpoint {last}")
    assert snapshot(run) == before


def test_ctrl_c_saves_the_current_step_and_exits_130(tmp_path: Path):
    """SIGINT during training (periodic checkpoints every 1,000 steps, none reached): exit code 130, no traceback,
    and last.ckpt at the last finished step: its global step equals the steps in the CSV log, and its EMA has
    had exactly that many updates (the step was finished, not cut in half)."""
    run = tmp_path / "run"
    args = ["train", "--config", "qm9_egnn", "--out-dir", str(run), "trainer.max_steps=100000",
            "trainer.ckpt_every_n_steps=1000", "trainer.limit_val_batches=2", "trainer.sample_every_n_epochs=0",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.log_every_n_steps=1", "model.hidden=16",
            "model.n_layers=2", "data.batch_size=8"]
    metrics = run / "csv" / "version_0" / "metrics.csv"
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "diffgen.cli", *args], stdout=out, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 120
            while not (metrics.is_file() and len(logged_losses(run)[0]) >= 3):  # flushed at every logged step
                assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "err").read_text()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    steps = sorted(logged_losses(run)[0])
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] >= 3 and steps == list(range(ckpt["global_step"]))
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == ckpt["global_step"]
    assert not list((run / "checkpoints").glob("step*.ckpt"))


def test_resumes_a_checkpoint_written_before_the_egnn_block_split(tmp_path: Path):
    """Runs trained before EGNNLayer was split into MessageBlock + EquivariantUpdate stored flat parameter names
    (``layers.0.edge_in.src.weight``); resuming them must work (the layer's load pre-hook renames them), not
    be refused as "another model"."""
    import re

    train_generation(tiny_config(tmp_path / "run", max_steps=2))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    old = {re.sub(r"(layers\.\d+\.)(?:message|update)\.", r"\1", k): v for k, v in ckpt["state_dict"].items()}
    assert any(".layers.0.edge_in." in k for k in old) and not any(".message." in k for k in old)
    ckpt["state_dict"] = old
    for p in last.parent.glob("*.ckpt"):
        p.unlink()
    torch.save(ckpt, last)
    # with a checkpoint in the run folder, fit() either resumes from it or raises (it never starts afresh)
    task = train_generation(tiny_config(tmp_path / "run", max_steps=3))
    assert task.trainer.global_step == 3


def test_lr_factor_warmup_then_linear_or_cosine_decay_to_the_floor():
    from diffgen.tasks.generation.config import OptimConfig

    lin = OptimConfig(lr=1e-3, warmup_steps=10, lr_decay="linear", decay_steps=100, lr_min=1e-4)
    cos = OptimConfig(lr=1e-3, warmup_steps=10, lr_decay="cosine", decay_steps=100, lr_min=1e-4)
    for o in (lin, cos):
        o.check()
        assert o.lr_factor(0) == pytest.approx(0.1) and o.lr_factor(4) == pytest.approx(0.5)  # warm-up
        assert o.lr_factor(10) == pytest.approx(1.0)  # decay starts after the warm-up
        assert o.lr_factor(110) == pytest.approx(0.1) and o.lr_factor(10_000) == pytest.approx(0.1)  # held
        assert all(o.lr_factor(s) >= o.lr_factor(s + 1) for s in range(10, 120))  # never rises after warm-up
    assert lin.lr_factor(60) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2 in both shapes
    assert cos.lr_factor(60) == pytest.approx(0.55)
    assert lin.lr_factor(35) == pytest.approx(0.1 + 0.9 * 0.75)
    assert cos.lr_factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 0.5 ** 0.5))  # cos(pi / 4)
    assert OptimConfig(warmup_steps=5).lr_factor(7) == 1.0  # lr_decay=none: constant after the warm-up


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.lr_decay=linear"], "needs optim.decay_steps >= 1"),
    (["optim.decay_steps=100"], "apply to optim.lr_decay=linear|cosine"),
    (["optim.lr_decay=cosine", "optim.decay_steps=10", "optim.lr_min=1.0"], "is above optim.lr"),
    (["optim.lr_decay=step"], "optim.lr_decay"),
])
def test_lr_decay_config_errors(overrides, fragment):
    from diffgen.errors import DiffgenError

    with pytest.raises(DiffgenError, match=fragment.replace("|", r"\|").replace(".", r"\.")):
        load_config("qm9_egnn", overrides)


def test_lr_decay_drives_the_optimizer_and_survives_a_resume(tmp_path: Path):
    """The learning rate the optimizer holds follows lr_factor across a resume: 2 steps (1 of warm-up, 1 at full
    lr) leave it halfway down a 2-step linear decay; resumed to 4 steps, it sits at lr_min."""
    decay = ["optim.lr=1.0e-3", "optim.warmup_steps=1", "optim.lr_decay=linear", "optim.decay_steps=2",
             "optim.lr_min=1.0e-5"]
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    for steps, expected in ((2, (1e-3 + 1e-5) / 2), (4, 1e-5)):
        cfg = load_config("qm9_egnn", [f"trainer.out_dir={run}", f"trainer.max_steps={steps}", *TINY, *decay])
        assert train_generation(cfg).trainer.global_step == steps
        lr = load_ckpt(last)["optimizer_states"][0]["param_groups"][0]["lr"]
        assert lr == pytest.approx(expected, rel=1e-9)


def test_a_resume_recomputes_the_lr_factor_from_the_config_instead_of_keeping_a_stale_lr(tmp_path: Path):
    """A run stopped mid-warm-up (step 1 of 4: lr 2.5e-4 of 1e-3) and resumed with the warm-up off trains
    at the configured 1e-3, and one resumed with it goes on warming up. Without a scheduler in the resumed run the
    optimizer kept the checkpoint's 2.5e-4 for good (seen in the long run, 2026-12-03)."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"

    def train(steps: int, *extra: str) -> float:
        cfg = load_config("qm9_egnn", [f"trainer.out_dir={run}", f"trainer.max_steps={steps}", *TINY,
                                       "optim.lr=1.0e-3", *extra])
        assert train_generation(cfg).trainer.global_step == steps
        ckpt = load_ckpt(last)
        assert ckpt["lr_schedulers"], "the scheduler's state is saved"
        return ckpt["optimizer_states"][0]["param_groups"][0]["lr"]

    assert train(1, "optim.warmup_steps=4") == pytest.approx(2 * 1e-3 / 4)  # lr for the next step, (1 + 1) / 4
    assert train(2, "optim.warmup_steps=4") == pytest.approx(3 * 1e-3 / 4)  # resumed: the warm-up goes on
    # resumed with the warm-up off (a constant lr): the configured lr, not the stale 7.5e-4
    assert train(3, "optim.warmup_steps=0") == pytest.approx(1e-3)


@pytest.mark.parametrize("precision, native, accelerator, warns", [
    ("bf16-mixed", False, "cpu", True), ("bf16-mixed", False, "auto", not torch.cuda.is_available()),
    ("bf16-mixed", True, "cpu", False), ("32-true", False, "cpu", False)])
def test_bf16_training_on_a_cpu_without_native_bf16_warns(precision, native, accelerator, warns, monkeypatch,
                                                          capsys):
    import diffgen.devices
    from diffgen.tasks.trainer import warn_emulated_bf16

    monkeypatch.setattr(diffgen.devices, "native_bf16", lambda device="cpu": native)
    tc = load_config("qm9_egnn", [f"trainer.precision={precision}", f"trainer.accelerator={accelerator}"]).trainer
    assert warn_emulated_bf16(tc) is warns
    err = capsys.readouterr().err
    assert (err.count("\n") == 1 and err.startswith("warning: ") and "32-true" in err) if warns else err == ""


def test_kept_checkpoints_are_never_deleted_ignored_by_resume_and_averaged_by_export(tmp_path: Path):
    """``trainer.keep_every_n_steps`` keeps every N-th step in checkpoints/kept/ (the periodic stepN.ckpt keeps only
    the newest); a resume still goes by checkpoints/*.ckpt; ``diffgen export A B OUT`` writes their EMA mean."""
    run = tmp_path / "run"
    keep = ["trainer.keep_every_n_steps=2"]
    train_generation(load_config("qm9_egnn", [f"trainer.out_dir={run}", "trainer.max_steps=4", *TINY, *keep]))
    kept = run / "checkpoints" / "kept"
    assert sorted(p.name for p in kept.iterdir()) == ["step2.ckpt", "step4.ckpt"]
    assert {load_ckpt(kept / n)["global_step"] for n in ("step2.ckpt", "step4.ckpt")} == {2, 4}
    assert [n for n in ckpt_names(run) if n.startswith("step")] == ["step4.ckpt"]
    (kept / "step9.ckpt").write_bytes(b"not a checkpoint")  # resume_path would refuse it: kept/ is not looked at
    before = snapshot(kept)
    task = train_generation(load_config("qm9_egnn", [f"trainer.out_dir={run}", "trainer.max_steps=5", *TINY, *keep]))
    assert task.trainer.global_step == 5 and logged_losses(run)[-1].keys() == {4}
    assert snapshot(kept) == before  # none deleted or rewritten by the resumed run
    (kept / "step9.ckpt").unlink()
    del before["step9.ckpt"]

    # a fresh run (nothing to resume) into a folder whose kept/ holds an earlier run's checkpoints is refused
    for name in ("last.ckpt", "best.ckpt", "step4.ckpt"):
        (run / "checkpoints" / name).unlink()
    with pytest.raises(DiffgenError, match="holds checkpoints of an earlier run"):
        train_generation(load_config("qm9_egnn", [f"trainer.out_dir={run}", "trainer.max_steps=5", *TINY, *keep]))
    assert snapshot(kept) == before

    out = tmp_path / "avg.safetensors"
    res = run_cli("export", str(kept / "step2.ckpt"), str(kept / "step4.ckpt"), str(out))
    assert res.returncode == 0 and "mean of 2 checkpoints" in res.stdout, res.stderr[-2000:]
    emas = [load_generator(kept / n).diffusion.state_dict() for n in ("step2.ckpt", "step4.ckpt")]
    got = load_generator(out).diffusion.state_dict()
    for k, v in got.items():
        if v.is_floating_point():  # fp16 export of the mean
            torch.testing.assert_close(v, (emas[0][k] + emas[1][k]) / 2, rtol=1e-3, atol=1e-4)
    bad = run_cli("export", str(kept / "step2.ckpt"), str(kept / "step4.ckpt"), str(tmp_path / "raw.safetensors"),
                  "--with-raw")
    assert_one_line_error(bad, "--with-raw takes one checkpoint")
    assert not (tmp_path / "raw.safetensors").exists()
