"""QM9 property regression with the invariant EGNN backbone (Satorras et al. 2021, Sec. 5.3).

Architecture (EGNN QM9 model): node features ``one-hot(type) x (Z/9)^k`` (k = 0..charge_power),
:class:`~diffgen.models.egnn.EGNN` with ``invariant=True`` (no coordinate updates; edge features
are squared interatomic distances in Å^2) on the fully connected molecular graph, a node MLP, sum
pooling over atoms and a graph MLP giving one output per target. The network predicts normalised
values ``(v - mean) / MAD`` of the regression values ``v`` of
:func:`~diffgen.tasks.regression.targets.regression_values` (reported units, atom references
subtracted); mean and MAD (mean absolute deviation) come from the training split. Loss: L1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

from diffgen.data.elements import NUM_TYPES, z_to_index
from diffgen.data.graphs import build_edges
from diffgen.models.egnn import EGNN
from diffgen.tasks.regression.config import RegressionConfig, regression_config_from_dict
from diffgen.tasks.regression.targets import (
    REPORT_UNITS, atomref_table, molecule_atomref, regression_values,
)

MAX_Z = 9.0  # charge scale of the node features (fluorine)


class PropertyRegressor(nn.Module):
    """Invariant EGNN + sum pooling + MLP head: ``(z, pos, batch) -> [B, n_targets]`` normalised values.

    Args:
        n_targets: outputs per molecule.
        hidden, n_layers, attention, norm_factor: EGNN width/depth/attention/aggregation scale.
        charge_power: node features ``one-hot [N, 5] x (Z/9)^k`` for k = 0..charge_power -> ``[N, 5 (p+1)]``.
        graph, cutoff, k: edge construction (:func:`diffgen.data.graphs.build_edges`).

    Shapes: ``z [N]`` long, ``pos [N, 3]`` Å, ``batch [N]`` long -> ``[num_graphs, n_targets]``.
    Invariant to rotations, reflections, translations and permutations of the atoms of each molecule.
    """

    def __init__(self, n_targets: int, hidden: int = 128, n_layers: int = 7, attention: bool = True,
                 norm_factor: float = 1.0, charge_power: int = 2, graph: str = "full",
                 cutoff: float | None = None, k: int | None = None):
        super().__init__()
        self.charge_power, self.graph, self.cutoff, self.k = charge_power, graph, cutoff, k
        in_dim = NUM_TYPES * (charge_power + 1)
        self.egnn = EGNN(in_dim=in_dim, hidden=hidden, out_dim=hidden, n_layers=n_layers, attention=attention,
                         invariant=True, norm_factor=norm_factor)
        self.node_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.graph_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n_targets))

    def features(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[N, 5 (charge_power + 1)]`` node features in ``dtype``."""
        onehot = nn.functional.one_hot(z_to_index(z).to(z.device), NUM_TYPES).to(dtype)
        charge = (z.to(dtype) / MAX_Z).unsqueeze(-1)
        powers = torch.arange(self.charge_power + 1, device=z.device, dtype=dtype)
        return (onehot.unsqueeze(-1) * charge.unsqueeze(-1).pow(powers)).flatten(1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None,
                ) -> torch.Tensor:
        num_graphs = int(batch.max()) + 1 if num_graphs is None else num_graphs
        edge_index = build_edges(pos, batch, self.graph, cutoff=self.cutoff, k=self.k)
        h, _ = self.egnn(self.features(z, pos.dtype), pos, edge_index)
        pooled = scatter(self.node_mlp(h), batch, dim=0, dim_size=num_graphs, reduce="sum")
        return self.graph_mlp(pooled)


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


class RegressionTask(pl.LightningModule):
    """Lightning module: L1 loss on normalised targets, validation/test MAE per target in reported units.

    Args:
        config: nested dict of a :class:`~diffgen.tasks.regression.config.RegressionConfig`.
        stats: ``{"mean": [T], "mad": [T]}`` from :func:`target_stats` on the training split.

    The checkpoint's hyperparameters hold ``config``, ``stats``, ``targets`` and ``units``.
    """

    def __init__(self, config: dict, stats: dict, targets: list[str] | None = None, units: list[str] | None = None):
        super().__init__()
        self.cfg: RegressionConfig = regression_config_from_dict(config)
        targets = list(self.cfg.task.targets)  # the stored ``targets``/``units`` are derived, never trusted
        units = [REPORT_UNITS[t] for t in targets]
        self.save_hyperparameters({"config": self.cfg.to_dict(), "stats": stats, "targets": targets, "units": units})
        self.targets, self.units = targets, units
        m = self.cfg.model
        self.model = PropertyRegressor(len(targets), hidden=m.hidden, n_layers=m.n_layers, attention=m.attention,
                                       norm_factor=m.norm_factor, charge_power=m.charge_power, graph=m.graph,
                                       cutoff=m.cutoff, k=m.k)
        if len(stats["mean"]) != len(targets) or len(stats["mad"]) != len(targets):
            raise ValueError("stats must hold one mean and one MAD per target")
        self.register_buffer("mean", torch.tensor(stats["mean"], dtype=torch.float64))
        self.register_buffer("mad", torch.tensor(stats["mad"], dtype=torch.float64))

    # --- model in reported units ----------------------------------------------------
    def forward(self, z, pos, batch, num_graphs=None) -> torch.Tensor:
        """Normalised predictions ``[B, T]``."""
        return self.model(z, pos, batch, num_graphs)

    def denormalise(self, out: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, T]`` -> regression values (reported units, atom references subtracted), float64."""
        return out.double() * self.mad + self.mean

    def _step(self, batch):
        target = regression_values(batch.y, batch.z, batch.batch, self.targets)
        out = self(batch.z, batch.pos, batch.batch, batch.num_graphs)
        norm_target = ((target - self.mean) / self.mad).to(out.dtype)
        loss = (out - norm_target).abs().mean()
        return loss, (self.denormalise(out.detach()) - target).abs()

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
        if o.scheduler == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(0, o.warmup_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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


def _as_batch(molecules: Sequence, dtype: torch.dtype, device) -> Batch:
    data = []
    for z, pos in molecules:
        z = torch.as_tensor(np.asarray(z), dtype=torch.long)
        pos = torch.as_tensor(np.asarray(pos, dtype=np.float64)).to(dtype)
        data.append(Data(z=z, pos=pos))
    return Batch.from_data_list(data).to(device)


@torch.no_grad()
def predict(model: RegressionTask, molecules: Sequence, batch_size: int = 256, progress=None) -> np.ndarray:
    """Per-molecule predictions in reported units, atom references added back (total U0, U, H, G, Cv).

    Args:
        model: a :class:`RegressionTask` (e.g. from :func:`diffgen.tasks.regression.checkpoints.load_regressor`).
        molecules: sequence of ``(z [n] int, pos [n, 3] Å)``.
        batch_size: molecules per forward pass.
        progress: optional callable, called with the number of molecules done after each batch.

    Returns:
        ``[len(molecules), T]`` float64, columns in the order of ``model.targets``.

    Raises:
        DiffgenError: atoms other than H, C, N, O, F.
    """
    model.eval()
    param = next(model.model.parameters())
    table = atomref_table(model.targets)
    out = []
    for start in range(0, len(molecules), batch_size):
        b = _as_batch(molecules[start:start + batch_size], param.dtype, param.device)
        values = model.denormalise(model(b.z, b.pos, b.batch, b.num_graphs))
        out.append((values + molecule_atomref(b.z, b.batch, b.num_graphs, table)).cpu())
        if progress is not None:
            progress(b.num_graphs)
    if not out:
        return np.zeros((0, len(model.targets)))
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate_dataset(model: RegressionTask, dataset, batch_size: int = 256, progress=None) -> dict[str, float]:
    """Mean absolute error per target (reported units) of ``model`` over a QM9 split."""
    from torch_geometric.loader import DataLoader

    model.eval()
    param = next(model.model.parameters())
    total = torch.zeros(len(model.targets), dtype=torch.float64)
    n = 0
    for b in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        b = b.to(param.device)
        target = regression_values(b.y, b.z, b.batch, model.targets)
        pred = model.denormalise(model(b.z, b.pos.to(param.dtype), b.batch, b.num_graphs))
        total += (pred - target).abs().sum(0).cpu()
        n += b.num_graphs
        if progress is not None:
            progress(b.num_graphs)
    return {t: float(total[j] / max(n, 1)) for j, t in enumerate(model.targets)}
