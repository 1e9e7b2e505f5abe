"""QM9 property regression: training with Lightning around the :class:`~diffgen.models.regressor.PropertyRegressor`
(Satorras et al. 2021, Sec. 5.3).

The regressor (:mod:`diffgen.models.regressor`) predicts normalised values ``(v - mean) / MAD`` of the regression
values ``v`` of :func:`~diffgen.tasks.regression.targets.regression_values` (reported units, atom references
subtracted); mean and MAD (mean absolute deviation) come from the training split (:func:`target_stats`) and live in
the regressor. Loss: L1 on the normalised values. Inference needs no Lightning: :mod:`diffgen.tasks.regression.predict`.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from diffgen.tasks.lr_schedule import lr_factor, step_scheduler
from diffgen.tasks.regression.checkpoints import build_model
from diffgen.tasks.regression.config import RegressionConfig, regression_config_from_dict
from diffgen.tasks.regression.targets import REPORT_UNITS, regression_values


def target_stats(dataset, targets: list[str]) -> dict[str, list[float]]:
    """Mean and MAD (mean absolute deviation) of the regression values over a whole QM9 split.

    Returns ``{"mean": [T], "mad": [T]}`` in reported units (atom references subtracted), computed in float64.
    """
    data, slices = dataset._data, dataset.slices  # the whole stored split, vectorised
    counts = slices["z"][1:] - slices["z"][:-1]
    batch = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    values = regression_values(data.y, data.z, batch, targets)
    rows = getattr(dataset, "_indices", None)  # a sliced dataset (e.g. ``ds[:64]``) views some rows only
    if rows is not None:
        values = values[torch.as_tensor(list(rows) if not isinstance(rows, torch.Tensor) else rows)]
    mean = values.mean(0)
    mad = (values - mean).abs().mean(0)
    return {"mean": mean.tolist(), "mad": mad.clamp_min(1e-12).tolist()}


def _move_legacy_stats(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of :class:`RegressionTask`: checkpoints written before the statistics moved into
    the regressor hold ``mean``/``mad`` at the top level; now they are ``model.mean``/``model.mad``."""
    for name in ("mean", "mad"):
        if prefix + name in state_dict and prefix + "model." + name not in state_dict:
            state_dict[prefix + "model." + name] = state_dict.pop(prefix + name)


class RegressionTask(pl.LightningModule):
    """Lightning wrapper of a :class:`~diffgen.models.regressor.PropertyRegressor` (``self.model``): L1 loss on
    normalised targets, validation/test MAE per target in reported units.

    Args:
        config: nested dict of a :class:`~diffgen.tasks.regression.config.RegressionConfig`.
        stats: ``{"mean": [T], "mad": [T]}`` from :func:`target_stats` on the training split.

    The checkpoint's hyperparameters hold ``config``, ``stats``, ``targets`` and ``units``; its state dict holds the
    regressor's under ``model.`` (statistics included: ``model.mean``, ``model.mad``).

    Raises:
        DiffgenError: invalid config. ValueError: ``stats`` without one mean and one positive MAD per target.
    """

    def __init__(self, config: dict, stats: dict, targets: list[str] | None = None, units: list[str] | None = None):
        super().__init__()
        self.cfg: RegressionConfig = regression_config_from_dict(config)
        targets = list(self.cfg.task.targets)  # the stored ``targets``/``units`` are derived, never trusted
        units = [REPORT_UNITS[t] for t in targets]
        self.save_hyperparameters({"config": self.cfg.to_dict(), "stats": stats, "targets": targets, "units": units})
        self.model = build_model(self.cfg, stats)
        self.register_load_state_dict_pre_hook(_move_legacy_stats)

    @property
    def targets(self) -> list[str]:
        return self.model.targets

    @property
    def units(self) -> list[str]:
        return self.model.units

    def forward(self, z, pos, batch, num_graphs=None) -> torch.Tensor:
        """Normalised predictions ``[B, T]`` (:meth:`PropertyRegressor.forward`)."""
        return self.model(z, pos, batch, num_graphs)

    def _step(self, batch):
        target = regression_values(batch.y, batch.z, batch.batch, self.targets)
        out = self(batch.z, batch.pos, batch.batch, batch.num_graphs)
        norm_target = ((target - self.model.mean) / self.model.mad).to(out.dtype)
        loss = (out - norm_target).abs().mean()
        return loss, (self.model.denormalise(out.detach()) - target).abs()

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.num_graphs)
        return loss

    def _eval_step(self, batch, stage: str):
        loss, err = self._step(batch)
        n = batch.num_graphs
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        for j, t in enumerate(self.targets):
            self.log(f"{stage}/mae_{t}", err[:, j].mean().float(), prog_bar=len(self.targets) == 1, batch_size=n,
                     sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        o = self.cfg.optim
        opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        warm = max(0, o.warmup_steps)
        if o.scheduler == "none":
            return step_scheduler(opt, lambda step: lr_factor(step, warm))
        total = max(1, int(self.trainer.estimated_stepping_batches))  # cosine to 0 over the planned steps
        return step_scheduler(opt, lambda step: lr_factor(step, warm, "cosine", total - warm))


def train_regression(cfg: RegressionConfig) -> RegressionTask:
    """Train (or resume from the newest checkpoint in ``cfg.trainer.out_dir``) a regressor on QM9
    (:func:`diffgen.tasks.trainer.fit`).

    Mean/MAD are computed on the training split actually used (``cfg.data.subset`` half if set).
    Checkpoints (best by ``val/loss``, last, periodic) land in ``cfg.trainer.out_dir/checkpoints``.
    """
    from diffgen.data.datamodule import QM9DataModule
    from diffgen.tasks.trainer import fit, seed_everything

    seed_everything(cfg.trainer.seed)
    d = cfg.data
    dm = QM9DataModule(d.root, d.batch_size, remove_h=False, num_workers=d.num_workers, subset=d.subset)
    dm.setup()
    task = RegressionTask(cfg.to_dict(), target_stats(dm.train_set, cfg.task.targets))
    fit(task, dm, cfg.trainer, monitor="val/loss")
    return task
