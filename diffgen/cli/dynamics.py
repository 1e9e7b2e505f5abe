"""``diffgen dynamics``: predict how a 3D system moves (simulate, train, evaluate, predict, export).

Data sets: the N-body charged-particle benchmark of Satorras et al. 2021 (simulator of Kipf et al. 2018)
and alanine-dipeptide trajectories simulated with OpenMM (:mod:`diffgen.data.md`).

User errors raise :class:`~diffgen.errors.DiffgenError`; ``diffgen.cli.main`` prints them as one line
and exits with code 2. Heavy imports (torch, Lightning) happen inside the commands.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from diffgen.cli.common import (
    check_device, check_split, check_writable, console, out_console, progress, set_threads, write_json,
)
from diffgen.errors import DiffgenError

dynamics_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="Equivariant dynamics prediction with the velocity-aware EGNN: N-body charged particles "
                                "and alanine dipeptide MD (OpenMM).")

DEFAULT_CONFIG = "nbody_egnn"  # packaged config (diffgen/configs)


@dynamics_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, help="Data set (default: the config's): nbody (3,000/2,000/2,000 "
                                          "charged-particle trajectories) or alanine_dipeptide (runs from "
                                          "`diffgen dynamics simulate`)."),
    config: str = typer.Option(DEFAULT_CONFIG, help="YAML config: a file, or the name of a packaged config."),
    out_dir: Optional[str] = typer.Option(None, help="Run folder (overrides trainer.out_dir); resumes from its newest checkpoint."),
    accelerator: Optional[str] = typer.Option(None, help="cpu, gpu or auto (overrides trainer.accelerator)."),
    devices: Optional[str] = typer.Option(None, help="Number of devices or 'auto'."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Train a dynamics model. Extra arguments are config overrides: section.key=value (e.g. optim.lr=1e-3)."""
    from diffgen.config import trainer_overrides
    from diffgen.tasks.dynamics.config import load_dynamics_config

    overrides = list(ctx.args)
    if dataset is not None:
        overrides.append(f"data.dataset={dataset}")
    overrides += trainer_overrides(accelerator, devices, out_dir)
    cfg = load_dynamics_config(config, overrides)
    set_threads(threads)
    from diffgen.tasks.dynamics.module import train_dynamics

    train_dynamics(cfg)
    best = Path(cfg.trainer.out_dir) / "checkpoints" / "best.ckpt"
    console.print(f"checkpoints in {best.parent}; test MSE: diffgen dynamics evaluate --checkpoint {best}",
                  markup=False, highlight=False)


@dynamics_app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="Lightning .ckpt from `diffgen dynamics train` (use best.ckpt) or a "
                                    ".safetensors from `diffgen dynamics export`."),
    split: str = typer.Option("test", help="Split: test, valid or train."),
    data: Optional[Path] = typer.Option(None, help="Evaluate on this trajectory .npz instead (loc, vel [B, F, n, 3], "
                                        "charges [B, n]) with the checkpoint's frames."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the MSEs to this JSON file."),
    overwrite: bool = typer.Option(False, help="Replace the --json file if it exists."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
):
    """Position MSE on a split (or a trajectory file), beside identity/constant-velocity baselines and the EGNN table."""
    check_split(split)
    check_device(device)
    if json_out is not None:
        check_writable(json_out, overwrite, (".json",))
    if not checkpoint.is_file():
        raise DiffgenError(f"checkpoint not found: {checkpoint}")
    traj = None
    if data is not None:
        from diffgen.data.nbody import load_trajectories

        traj = load_trajectories(data)  # validated before torch is imported
    set_threads(threads)
    from diffgen.tasks.dynamics.checkpoints import load
    from diffgen.tasks.dynamics.data import pairs_dataset, trajectory_pairs
    from diffgen.tasks.dynamics.evaluate import REFERENCE_NBODY_MSE, evaluate_pairs

    model, cfg = load(checkpoint, device=device)
    if traj is not None and cfg.model.n_types:
        raise DiffgenError("--data supports N-body style models only (this checkpoint needs atom types)")
    if traj is not None:
        ds, name = trajectory_pairs(traj, cfg, str(data)), str(data)
    else:
        ds, name = pairs_dataset(cfg, split), f"{cfg.data.dataset} {split}"
    start = time.perf_counter()
    mse = evaluate_pairs(model, ds)
    seconds = time.perf_counter() - start
    if not all(math.isfinite(v) for v in mse.values()):
        raise DiffgenError(f"non-finite MSE on {name} ({', '.join(f'{k} {v:g}' for k, v in mse.items())}): "
                           "the inputs or the model's outputs hold NaN/inf")
    n = ds.tensors[0].shape[0]
    table = Table(title=f"{name}: {n} trajectories, frame {cfg.data.frame_in} -> {cfg.data.frame_out}, "
                        f"position MSE ({seconds:.1f} s)")
    table.add_column("model")
    table.add_column("MSE", justify="right")
    table.add_column("source")
    table.add_row("this model", f"{mse['model']:.5f}", str(checkpoint))
    table.add_row("identity (no motion)", f"{mse['identity']:.5f}", "computed")
    table.add_row("constant velocity", f"{mse['constant_velocity']:.5f}", "computed")
    if cfg.data.dataset == "alanine_dipeptide":
        lag_ps = (cfg.data.frame_out - cfg.data.frame_in) * cfg.data.md_frame_ps
        table.title = f"{name}: {n} frame pairs, {lag_ps:g} ps ahead, position MSE in Å^2 ({seconds:.1f} s)"
    if cfg.data.dataset == "nbody" and (cfg.data.frame_in, cfg.data.frame_out) == (30, 40) and data is None:
        for reference, value in REFERENCE_NBODY_MSE.items():
            table.add_row(reference, f"{value:.4f}", "Satorras et al. 2021, Table 2")
    out_console.print(table)
    if json_out is not None:
        write_json(json_out, {"data": name, "n_trajectories": n, "checkpoint": str(checkpoint),
                              "frame_in": cfg.data.frame_in, "frame_out": cfg.data.frame_out, "mse": mse})


@dynamics_app.command()
def simulate(
    runs: int = typer.Option(12, help="Independent runs (run k uses seed SEED + k)."),
    frames: int = typer.Option(500, help="Frames saved per run."),
    frame_ps: float = typer.Option(1.0, help="Picoseconds between frames."),
    equil_ps: float = typer.Option(10.0, help="Equilibration before the first frame (ps)."),
    seed: int = typer.Option(0, help="Seed of run 0."),
    root: Optional[Path] = typer.Option(None, help="Cache root (default: $DIFFGEN_CACHE or ~/.cache/diffgen)."),
):
    """Alanine dipeptide MD with OpenMM (Amber ff99SB-ILDN + OBC, Langevin 300 K, 2 fs, HBonds), cached per run.

    Resumable: runs already in the cache are skipped. Reference platform: bit-reproducible for a seed.
    """
    if runs < 1 or frames < 2 or frame_ps <= 0 or equil_ps < 0:
        raise DiffgenError("--runs must be >= 1, --frames >= 2, --frame-ps > 0 and --equil-ps >= 0")
    from diffgen.data.md import MDSettings, md_cache_dir, simulate_all

    settings = MDSettings(n_runs=runs, n_frames=frames, frame_ps=frame_ps, equil_ps=equil_ps, seed=seed)
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"alanine dipeptide, {runs} runs", total=runs * frames)
        paths = simulate_all(settings, root, progress=lambda k: bar.advance(task, k))
    seconds = time.perf_counter() - start
    total_ns = runs * (frames - 1) * frame_ps / 1000
    out_console.print(f"{len(paths)} runs x {frames} frames ({total_ns:g} ns sampled) in {md_cache_dir(root)} "
                      f"({seconds:.1f} s)", markup=False, highlight=False, soft_wrap=True)


@dynamics_app.command()
def predict(
    checkpoint: Path = typer.Option(..., help="Lightning .ckpt from `diffgen dynamics train` or a .safetensors from "
                                    "`diffgen dynamics export`."),
    out: Path = typer.Option(..., help="Multi-frame .xyz to write (plays in VMD, PyMOL, ASE, Ovito)."),
    split: str = typer.Option("test", help="Split to take the trajectory from: test, valid or train."),
    index: int = typer.Option(0, help="Trajectory (N-body) or run (MD) index inside the split."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
):
    """Write predicted frames as a multi-frame XYZ.

    N-body: 3 frames per trajectory (input frame, predicted target frame, true target frame); charges
    shown as Na (+1) / Cl (-1). Alanine dipeptide: for every frame t of the run, the prediction of frame
    t + lag made from frame t (one-step predictions; comment lines give t and the frame's MSE).
    """
    check_split(split)
    check_device(device)
    check_writable(out, overwrite, (".xyz",))
    if not checkpoint.is_file():
        raise DiffgenError(f"checkpoint not found: {checkpoint}")
    set_threads(threads)
    from diffgen.tasks.dynamics.checkpoints import load
    from diffgen.tasks.dynamics.predict import predict_frames, write_xyz_frames

    model, cfg = load(checkpoint, device=device)
    pred = predict_frames(model, cfg, split, index)
    write_xyz_frames(out, pred.symbols, pred.frames, pred.comments)
    out_console.print(f"wrote {out}: {pred.summary}")


@dynamics_app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Lightning .ckpt from `diffgen dynamics train` (or a .safetensors)."),
    out: Path = typer.Argument(..., help="Output .safetensors (weights; metadata: config)."),
    fp16: bool = typer.Option(False, help="Store the weights as fp16 instead of fp32."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Export a dynamics checkpoint to a small self-contained safetensors file (evaluate/predict read it)."""
    check_writable(out, overwrite, (".safetensors",))
    import torch

    from diffgen.tasks.dynamics.checkpoints import export as export_checkpoint

    path = export_checkpoint(checkpoint, out, dtype=torch.float16 if fp16 else torch.float32, overwrite=overwrite)
    out_console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
