"""``diffgen dynamics``: predict how a 3D system moves (N-body protocol of Satorras et al. 2021).

User errors raise :class:`~diffgen.errors.DiffgenError`; ``diffgen.cli.main`` prints them as one line
and exits with code 2. Heavy imports (torch, Lightning) happen inside the commands.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from diffgen.errors import DiffgenError

dynamics_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="Equivariant dynamics prediction: N-body charged particles with the velocity-aware EGNN.")
console = Console(stderr=True)
out_console = Console()

DEFAULT_CONFIG = Path("configs/nbody_egnn.yaml")


def _threads(n: Optional[int]) -> None:
    if n is not None:
        if n < 1:
            raise DiffgenError(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


@dynamics_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    dataset: str = typer.Option("nbody", help="Data set: nbody (3,000/2,000/2,000 charged-particle trajectories)."),
    config: Optional[Path] = typer.Option(None, help=f"YAML config (default: {DEFAULT_CONFIG} if present, "
                                          "else built-in defaults)."),
    out_dir: Optional[str] = typer.Option(None, help="Run folder (overrides trainer.out_dir); resumes if it holds last.ckpt."),
    accelerator: Optional[str] = typer.Option(None, help="cpu, gpu or auto (overrides trainer.accelerator)."),
    devices: Optional[str] = typer.Option(None, help="Number of devices or 'auto'."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Train a dynamics model. Extra arguments are config overrides: section.key=value (e.g. optim.lr=1e-3)."""
    from diffgen.dynamics_config import load_dynamics_config

    overrides = list(ctx.args)
    overrides.append(f"data.dataset={dataset}")
    if accelerator:
        overrides.append(f"trainer.accelerator={accelerator}")
    if devices:
        overrides.append(f"trainer.devices={devices}")
    if out_dir:
        overrides.append(f"trainer.out_dir={out_dir}")
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    cfg = load_dynamics_config(config, overrides)
    _threads(threads)
    from diffgen.tasks.dynamics import train_dynamics

    train_dynamics(cfg)
    best = Path(cfg.trainer.out_dir) / "checkpoints" / "best.ckpt"
    console.print(f"checkpoints in {best.parent}; test MSE: diffgen dynamics evaluate --checkpoint {best}",
                  markup=False, highlight=False)


@dynamics_app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="Lightning .ckpt from `diffgen dynamics train` (use best.ckpt)."),
    split: str = typer.Option("test", help="Split: test, valid or train."),
    data: Optional[Path] = typer.Option(None, help="Evaluate on this trajectory .npz instead (loc, vel [B, F, n, 3], "
                                        "charges [B, n]) with the checkpoint's frames."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the MSEs to this JSON file."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Position MSE on a split (or a trajectory file), beside identity/constant-velocity baselines and the EGNN table."""
    if split not in ("test", "valid", "train"):
        raise DiffgenError(f"unknown split {split!r}: choose test, valid or train")
    if json_out is not None and json_out.exists():
        raise DiffgenError(f"{json_out} already exists; refusing to overwrite it")
    if not checkpoint.is_file():
        raise DiffgenError(f"checkpoint not found: {checkpoint}")
    traj = None
    if data is not None:
        from diffgen.data.nbody import load_trajectories

        traj = load_trajectories(data)  # validated before torch is imported
    _threads(threads)
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from diffgen.tasks.dynamics_common import REFERENCE_NBODY_MSE, evaluate_pairs, load_model, pairs_dataset

    model, cfg = load_model(checkpoint)
    if traj is not None:
        from diffgen.data.nbody import frame_pairs

        p = frame_pairs(traj, cfg.data.frame_in, cfg.data.frame_out, name=str(data))
        ds = TensorDataset(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                             for a in (p.pos, p.vel, p.charges, p.target)))
        name = str(data)
    else:
        ds = pairs_dataset(cfg, split)
        name = f"{cfg.data.dataset} {split}"
    start = time.perf_counter()
    mse = evaluate_pairs(model, ds)
    seconds = time.perf_counter() - start
    n = ds.tensors[0].shape[0]
    table = Table(title=f"{name}: {n} trajectories, frame {cfg.data.frame_in} -> {cfg.data.frame_out}, "
                        f"position MSE ({seconds:.1f} s)")
    table.add_column("model")
    table.add_column("MSE", justify="right")
    table.add_column("source")
    table.add_row("this model", f"{mse['model']:.5f}", str(checkpoint))
    table.add_row("identity (no motion)", f"{mse['identity']:.5f}", "computed")
    table.add_row("constant velocity", f"{mse['constant_velocity']:.5f}", "computed")
    if cfg.data.dataset == "nbody" and (cfg.data.frame_in, cfg.data.frame_out) == (30, 40) and data is None:
        for model, value in REFERENCE_NBODY_MSE.items():
            table.add_row(model, f"{value:.4f}", "Satorras et al. 2021, Table 2")
    out_console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps({"data": name, "n_trajectories": n, "checkpoint": str(checkpoint),
                                        "frame_in": cfg.data.frame_in, "frame_out": cfg.data.frame_out,
                                        "mse": mse}, indent=2))
