"""``diffgen regress``: QM9 property regression with the invariant EGNN (train, evaluate, predict, export).

User errors raise :class:`~diffgen.errors.DiffgenError`; ``diffgen.cli.main`` prints them as one line
and exits with code 2. Heavy imports (torch, Lightning) happen inside the commands.
"""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from diffgen.cli.common import (
    check_device, check_positive, check_split, check_writable, console, out_console, progress, set_threads, write_json,
)
from diffgen.errors import DiffgenError

regress_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                          help="QM9 property regression with the invariant EGNN (Satorras et al. 2021).")

DEFAULT_CONFIG = "qm9_regress"  # packaged config (diffgen/configs)






@regress_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    target: Optional[List[str]] = typer.Option(None, "--target", help="Target(s): mu, alpha, homo, lumo, gap, r2, "
                                               "zpve, U0, U, H, G, Cv; repeat or comma-separate for one multi-target model."),
    config: str = typer.Option(DEFAULT_CONFIG, help="YAML config: a file, or the name of a packaged config."),
    out_dir: Optional[str] = typer.Option(None, help="Run folder (overrides trainer.out_dir); resumes from its newest checkpoint."),
    subset: Optional[str] = typer.Option(None, help="Train on one half of the train split: half0 or half1 (EDM protocol)."),
    accelerator: Optional[str] = typer.Option(None, help="cpu, gpu or auto (overrides trainer.accelerator)."),
    devices: Optional[str] = typer.Option(None, help="Number of devices or 'auto'."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Train a regressor. Extra arguments are config overrides: section.key=value (e.g. optim.lr=5e-4)."""
    from diffgen.config import trainer_overrides
    from diffgen.tasks.regression.config import load_regression_config
    from diffgen.tasks.regression.config import resolve_targets

    overrides = list(ctx.args)
    if target:
        overrides.append("task.targets=" + ",".join(resolve_targets(target)))
    if subset is not None:
        if subset not in ("half0", "half1"):
            raise DiffgenError(f"unknown --subset {subset!r}: choose half0 or half1")
        overrides.append(f"data.subset={subset}")
    overrides += trainer_overrides(accelerator, devices, out_dir)
    cfg = load_regression_config(config, overrides)
    set_threads(threads)
    from diffgen.tasks.regression.module import train_regression

    train_regression(cfg)
    console.print(f"checkpoints in {Path(cfg.trainer.out_dir) / 'checkpoints'}; "
                  f"test MAE: diffgen regress evaluate --checkpoint {Path(cfg.trainer.out_dir) / 'checkpoints' / 'best.ckpt'}",
                  markup=False, highlight=False)


@regress_app.command()
def evaluate(
    checkpoint: Optional[Path] = typer.Option(None, help="Regressor (.safetensors or .ckpt); default: shipped gap model."),
    split: str = typer.Option("test", help="QM9 split: test, valid or train."),
    limit: Optional[int] = typer.Option(None, help="Only the first LIMIT molecules of the split."),
    batch_size: int = typer.Option(256, help="Molecules per forward pass."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the MAEs to this JSON file."),
    overwrite: bool = typer.Option(False, help="Replace the --json file if it exists."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
):
    """MAE per target on a QM9 split (standard split), in the units of the EGNN table, beside published models."""
    check_positive("--limit", limit)
    check_positive("--batch-size", batch_size)
    check_device(device)
    check_split(split)
    if json_out is not None:
        check_writable(json_out, overwrite, (".json",))
    set_threads(threads)
    from diffgen.data.qm9 import QM9
    from diffgen.tasks.regression.checkpoints import load
    from diffgen.tasks.regression.predict import evaluate_dataset
    from diffgen.tasks.regression.targets import REFERENCE_MAE

    model, _ = load(checkpoint, device=device)
    ds = QM9(split=split)
    if limit is not None:
        ds = ds[: min(limit, len(ds))]
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"QM9 {split}", total=len(ds))
        mae = evaluate_dataset(model, ds, batch_size=batch_size, progress=lambda k: bar.advance(task, k))
    seconds = time.perf_counter() - start
    table = Table(title=f"QM9 {split}: {len(ds)} molecules, MAE ({seconds:.1f} s)")
    for col in ("target", "unit", "this model", *REFERENCE_MAE):
        table.add_column(col, justify="left" if col in ("target", "unit") else "right")
    for t, u in zip(model.targets, model.units):
        table.add_row(t, u, f"{mae[t]:.4g}", *(f"{REFERENCE_MAE[m][t]:g}" for m in REFERENCE_MAE))
    out_console.print(table)
    if json_out is not None:
        src = str(checkpoint) if checkpoint is not None else "shipped"
        write_json(json_out, {"split": split, "n_molecules": len(ds), "checkpoint": src,
                                        "mae": mae, "units": dict(zip(model.targets, model.units))})


#: QM9's domain: at most 29 atoms, of which at most 9 heavy (C, N, O, F); interatomic distances of a few Å.
QM9_MAX_ATOMS, QM9_MAX_HEAVY, MAX_ABS_COORD = 29, 9, 1.0e3


def _check_domain(molecules, file: Path) -> None:
    """Refuse coordinates that cannot be a molecule (non-finite or beyond 1000 Å); warn, on one stderr line, about
    molecules outside QM9's size range, for which the predictions are extrapolations."""
    import numpy as np

    for k, (z, pos) in enumerate(molecules, start=1):
        pos = np.asarray(pos, dtype=np.float64)
        if not np.isfinite(pos).all() or np.abs(pos).max(initial=0.0) > MAX_ABS_COORD:
            raise DiffgenError(f"molecule {k} of {file} has coordinates that are not finite or beyond "
                               f"{MAX_ABS_COORD:g} Å")
    big = [k for k, (z, _) in enumerate(molecules, start=1)
           if len(z) > QM9_MAX_ATOMS or int((np.asarray(z) > 1).sum()) > QM9_MAX_HEAVY]
    if big:
        console.print(f"warning: {len(big)} molecule(s) (first: molecule {big[0]}) are larger than QM9's "
                      f"({QM9_MAX_ATOMS} atoms, {QM9_MAX_HEAVY} heavy): their predictions are out of domain",
                      markup=False, highlight=False, soft_wrap=True)


@regress_app.command()
def predict(
    file: Path = typer.Argument(..., help="Molecules with 3D coordinates: .sdf or .xyz (H, C, N, O, F only)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Regressor (.safetensors or .ckpt); default: shipped gap model."),
    out: Optional[Path] = typer.Option(None, help="CSV file to write (default: print the CSV to stdout)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    batch_size: int = typer.Option(256, help="Molecules per forward pass."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
):
    """Predict properties: a CSV with one row per molecule, units in the column names (e.g. gap_meV)."""
    from diffgen.io import read_molecules

    check_positive("--batch-size", batch_size)
    check_device(device)
    if out is not None:
        check_writable(out, overwrite)
    molecules = read_molecules(file)  # validates the file before the model is loaded
    _check_domain(molecules, file)
    set_threads(threads)
    from diffgen.tasks.regression.checkpoints import load
    from diffgen.tasks.regression.predict import predict as run_predict
    from diffgen.tasks.regression.targets import column_name

    model, _ = load(checkpoint, device=device)
    values = run_predict(model, molecules, batch_size=batch_size)
    bad = [k for k, row in enumerate(values, start=1) if not all(map(math.isfinite, row))]
    if bad:
        raise DiffgenError(f"non-finite prediction for {len(bad)} molecule(s) of {file} (first: molecule {bad[0]}); "
                           "check their coordinates")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["molecule", "n_atoms", *(column_name(t) for t in model.targets)])
    for k, ((z, _), row) in enumerate(zip(molecules, values), start=1):
        writer.writerow([k, len(z), *(f"{v:.6g}" for v in row)])
    if out is None:
        sys.stdout.write(buf.getvalue())
        return
    out.write_text(buf.getvalue())
    console.print(f"wrote {len(molecules)} predictions to {out}", markup=False, highlight=False)


@regress_app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Lightning .ckpt from `diffgen regress train` (or a .safetensors)."),
    out: Path = typer.Argument(..., help="Output .safetensors (weights and mean/MAD; metadata: config, targets, units)."),
    fp16: bool = typer.Option(False, help="Store the weights as fp16 instead of fp32."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Export a regression checkpoint to a small self-contained safetensors file."""
    check_writable(out, overwrite, (".safetensors",))
    import torch

    from diffgen.tasks.regression.checkpoints import export as export_checkpoint

    path = export_checkpoint(checkpoint, out, dtype=torch.float16 if fp16 else torch.float32, overwrite=overwrite)
    out_console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
