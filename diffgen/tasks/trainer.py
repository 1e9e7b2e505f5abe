"""Shared Lightning trainer set-up: loggers, atomic checkpoints, resume, progress bar.

Every task (generation, regression, dynamics) trains through :func:`make_trainer`, so all
of them get CSV + TensorBoard logs, periodic and last checkpoints written atomically
(temporary file + ``os.replace``), automatic resume from ``out_dir/checkpoints/last.ckpt`` and
multi-GPU DDP via ``accelerator``/``devices``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from diffgen.config import TrainerConfig


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<path>.tmp`` then renames it, so a crash never leaves a torn file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class SaveLastOnTrainEnd(Callback):
    """Refresh ``last.ckpt`` when fitting ends (``max_time``/``max_steps``/``max_epochs``), so a resume never
    repeats the steps done since the last periodic checkpoint. Only one ModelCheckpoint may own ``save_last``
    (two would write ``last-v1.ckpt``), hence this separate callback."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(str(self.path))


def make_trainer(tc: TrainerConfig, monitor: str = "val/loss", extra_callbacks: list | None = None) -> pl.Trainer:
    """A ``pl.Trainer`` writing to ``tc.out_dir`` (``checkpoints/``, ``csv/``, ``tb/``)."""
    out = Path(tc.out_dir)
    ckpt_dir = out / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=tc.ckpt_every_n_steps,
                        save_last=True, save_top_k=1, monitor=None, auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1,
                        auto_insert_metric_name=False),
        SaveLastOnTrainEnd(ckpt_dir / "last.ckpt"),
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
    """``out_dir/checkpoints/last.ckpt`` if it exists (training resumes from it), else None."""
    last = Path(tc.out_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None
