"""Shared Lightning training for every task: loggers, atomic checkpoints, safe resume, Ctrl-C handling.

Every task (generation, regression, dynamics) trains through :func:`fit`, so all of them get

* CSV + TensorBoard logs and a progress bar;
* periodic, best and last checkpoints written atomically (temporary file + ``os.replace``), always under the same
  names (no ``last-v1.ckpt``: Lightning's version counter is off);
* automatic resume from the **newest** checkpoint of ``out_dir/checkpoints`` (by global step), read with
  ``torch.load(weights_only=True)`` (a checkpoint is never unpickled) and checked against the model before
  training starts, so a truncated file or one of another model size is a one-line error;
* Ctrl-C (SIGINT): ``last.ckpt`` is saved at the current step, then :class:`KeyboardInterrupt` propagates
  (the CLI exits with code 130);
* multi-GPU / multi-process DDP via ``accelerator`` / ``devices``.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from diffgen.checkpoint_files import first_line, read_lightning
from diffgen.config import TrainerConfig
from diffgen.errors import DiffgenError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<path>.tmp`` then renames it, so a crash never leaves a torn file; reads with
    ``weights_only=True`` (tensors and plain data only), so resuming never runs code stored in a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_lightning(Path(path))


class SaveLastCheckpoint(Callback):
    """Refresh ``last.ckpt`` when fitting ends (``max_time``/``max_steps``/``max_epochs``) and on Ctrl-C, so a resume
    never repeats the steps done since the last periodic checkpoint. Only one ModelCheckpoint may own ``save_last``
    (two would write ``last-v1.ckpt``), hence this separate callback."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(str(self.path))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0:
            trainer.save_checkpoint(str(self.path))


def make_trainer(tc: TrainerConfig, monitor: str = "val/loss", extra_callbacks: list | None = None) -> pl.Trainer:
    """A ``pl.Trainer`` writing to ``tc.out_dir`` (``checkpoints/``, ``csv/``, ``tb/``)."""
    out = Path(tc.out_dir)
    ckpt_dir = out / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=tc.ckpt_every_n_steps,
                        save_last=True, save_top_k=1, monitor=None, auto_insert_metric_name=False,
                        enable_version_counter=False),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        SaveLastCheckpoint(ckpt_dir / "last.ckpt"),
        LearningRateMonitor(),
        RichProgressBar(),
        *(extra_callbacks or []),
    ]
    return pl.Trainer(
        default_root_dir=str(out),
        max_epochs=tc.max_epochs,
        max_steps=tc.max_steps,
        max_time=tc.max_time,
        accelerator=tc.accelerator,
        devices=tc.devices,
        precision=tc.precision,
        log_every_n_steps=tc.log_every_n_steps,
        limit_train_batches=tc.limit_train_batches,
        limit_val_batches=tc.limit_val_batches,
        logger=[CSVLogger(str(out), name="csv"), TensorBoardLogger(str(out), name="tb")],
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def resume_path(tc: TrainerConfig) -> str | None:
    """The checkpoint in ``out_dir/checkpoints`` with the highest global step, or None.

    Every ``*.ckpt`` there is considered (``last.ckpt``, periodic ``stepN.ckpt``, ``best.ckpt``), so a stale
    ``last.ckpt`` never sends a run back. The step is read from the file (``weights_only=True``). On a tie
    ``last.ckpt`` wins, then a periodic one, then ``best.ckpt`` (the same step, saved after validation), then the
    name, so the choice never depends on the order the folder is listed in.

    Raises:
        DiffgenError: a checkpoint there cannot be read (truncated, corrupt, not a Lightning checkpoint).
    """
    folder = Path(tc.out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    best: tuple | None = None
    for path in folder.glob("*.ckpt"):
        step = read_lightning(path).get("global_step")
        if not isinstance(step, int):
            raise DiffgenError(f"cannot resume from {path}: it holds no global_step (not a Lightning checkpoint)")
        key = (step, path.name == "last.ckpt", path.name != "best.ckpt", path.name)
        if best is None or key > best[0]:
            best = (key, path)
    return None if best is None else str(best[1])


def check_resumable(task: pl.LightningModule, path: str) -> None:
    """Raise a one-line DiffgenError if the weights in checkpoint ``path`` do not fit ``task`` (e.g. another model
    size in the config than the run was started with); the message names the first differing tensor. The weights
    are loaded into ``task`` (as resuming will)."""
    state = read_lightning(Path(path)).get("state_dict")
    if not isinstance(state, dict):
        raise DiffgenError(f"cannot resume from {path}: it holds no state_dict")
    own = task.state_dict()
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if shapes:
        key, theirs, ours = shapes[0]
        detail = (f"{key} has shape {list(theirs)} in the checkpoint, {list(ours)} in the model"
                  + (f", and {len(shapes) - 1} more tensors differ" if len(shapes) > 1 else ""))
    elif missing or extra:
        detail = f"{len(missing)} tensors missing, {len(extra)} unexpected, e.g. {(missing or extra)[0]}"
    else:
        try:
            task.load_state_dict(state, strict=True)
            return
        except RuntimeError as exc:
            detail = first_line(exc)
    raise DiffgenError(f"cannot resume from {path}: it does not fit the configured model ({detail}); "
                       "use the run's own config or another --out-dir")


def seed_everything(seed: int) -> None:
    """``pl.seed_everything(seed, workers=True)`` without its "Seed set to N" line on stderr (which would precede
    a one-line error raised before training)."""
    if "verbose" in inspect.signature(pl.seed_everything).parameters:
        pl.seed_everything(seed, workers=True, verbose=False)
    else:  # older Lightning
        pl.seed_everything(seed, workers=True)


def fit(task: pl.LightningModule, datamodule: pl.LightningDataModule, tc: TrainerConfig,
        monitor: str = "val/loss", init: Callable[[pl.LightningModule], None] | None = None) -> pl.Trainer:
    """Train ``task`` on ``datamodule``: resume from the newest checkpoint in ``tc.out_dir`` if there is one, else call
    ``init(task)`` (e.g. load starting weights) and start fresh.

    Raises:
        DiffgenError: unreadable checkpoint or one that does not fit ``task`` (before any training step).
        KeyboardInterrupt: Ctrl-C during training, after ``last.ckpt`` was saved at the current step.
    """
    ckpt = resume_path(tc)
    if ckpt is not None:
        check_resumable(task, ckpt)
    elif init is not None:
        init(task)
    trainer = make_trainer(tc, monitor=monitor)
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1) after the on_exception hooks ran
            raise KeyboardInterrupt from None
        raise
    return trainer
