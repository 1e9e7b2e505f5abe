"""Dynamics task: predict positions a fixed time ahead with the velocity-aware EGNN (N-body protocol).

Protocol of Satorras et al. 2021 (EGNN, Sec. 5.1 / Table 2) on the charged-particle system of
Kipf et al. 2018 (:mod:`diffgen.data.nbody`): inputs are positions and velocities at frame 30 plus
charges, the target is the positions at frame 40; MSE loss (mean over particles and coordinates),
Adam lr 5e-4, batch 100; the reported number is the test MSE at the best-validation checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from diffgen.tasks.dynamics.checkpoints import build_model
from diffgen.tasks.dynamics.config import DynamicsConfig, dynamics_config_from_dict
from diffgen.tasks.dynamics.data import pairs_dataset
from diffgen.tasks.lr_schedule import step_scheduler


class DynamicsTask(pl.LightningModule):
    """Lightning wrapper: MSE between predicted and true future positions.

    Args:
        config: nested dict of a :class:`~diffgen.tasks.dynamics.config.DynamicsConfig` (stored in the checkpoint).
    """

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = dynamics_config_from_dict(config)
        self.model = build_model(self.cfg)

    def forward(self, pos, vel, charges, types=None):
        return self.model(pos, vel, charges, types)

    def _loss(self, batch, with_reg: bool = False):
        """MSE of the predicted positions; with ``with_reg`` and pooling on, ``(mse + w * reg, reg)`` instead.

        ``reg`` is the EGHN assignment regulariser of :mod:`diffgen.models.eghn` and ``w`` = ``model.pool_reg_weight``.
        """
        pos, vel, charges, target, types = batch
        pred, reg = self.model(pos, vel, charges, types, return_reg=True)
        mse = torch.nn.functional.mse_loss(pred, target)
        if not with_reg:
            return mse
        return (mse, None) if reg is None else (mse + self.cfg.model.pool_reg_weight * reg, reg)

    def training_step(self, batch, batch_idx):
        loss, reg = self._loss(batch, with_reg=True)
        if not torch.isfinite(loss):  # skip the step (Lightning: None = no backward, no update): keep weights finite
            self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum", batch_size=batch[0].shape[0])
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        if reg is not None:
            self.log("train/pool_reg", reg, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):  # pure MSE (no regulariser): comparable with the flat model
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=batch[0].shape[0], sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.cfg.optim.clip_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
            self.log("train/grad_norm", norm, batch_size=1)

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.Adam(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        if o.lr_schedule == "constant":  # a scheduler all the same, as every task has (lr_schedule.step_scheduler)
            return step_scheduler(opt, lambda step: 1.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.cfg.trainer.max_epochs, 1),
                                                           eta_min=o.lr_min)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class PairsDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DynamicsConfig):
        super().__init__()
        self.cfg = cfg
        self.train_set = pairs_dataset(cfg, "train")
        self.valid_set = pairs_dataset(cfg, "valid")

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.cfg.data.batch_size, shuffle=True,
                          num_workers=self.cfg.data.num_workers, drop_last=False)

    def val_dataloader(self):
        return DataLoader(self.valid_set, batch_size=max(self.cfg.data.batch_size, 500), shuffle=False,
                          num_workers=self.cfg.data.num_workers)


def train_dynamics(cfg: DynamicsConfig) -> DynamicsTask:
    """Train (or resume from the newest checkpoint in ``cfg.trainer.out_dir``) the dynamics model
    (:func:`diffgen.tasks.trainer.fit`); ``optim.init_from`` gives starting weights for a fresh run."""
    from diffgen.tasks.trainer import fit, seed_everything

    dm = PairsDataModule(cfg)  # validates the data (frames, shapes) before anything is printed
    seed_everything(cfg.trainer.seed)
    task = DynamicsTask(cfg.to_dict())

    def init(t: DynamicsTask) -> None:
        from diffgen.checkpoint_files import load_weights
        from diffgen.tasks.dynamics.checkpoints import load

        load_weights(t.model, load(cfg.optim.init_from)[0].state_dict(), Path(cfg.optim.init_from))

    fit(task, dm, cfg.trainer, init=None if cfg.optim.init_from is None else init)
    return task
