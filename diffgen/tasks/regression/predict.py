"""Inference with a :class:`~diffgen.models.regressor.PropertyRegressor` (no Lightning): predictions for molecules
given as ``(z, pos)`` pairs, and the MAE over a QM9 split.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from diffgen.models.regressor import PropertyRegressor
from diffgen.tasks.regression.targets import regression_values


def _as_batch(molecules: Sequence, dtype: torch.dtype, device) -> Batch:
    data = []
    for z, pos in molecules:
        z = torch.as_tensor(np.asarray(z), dtype=torch.long)
        pos = torch.as_tensor(np.asarray(pos, dtype=np.float64)).to(dtype)
        data.append(Data(z=z, pos=pos))
    return Batch.from_data_list(data).to(device)


@torch.no_grad()
def predict(model: PropertyRegressor, molecules: Sequence, batch_size: int = 256, progress=None) -> np.ndarray:
    """Per-molecule predictions in reported units, atom references added back (total U0, U, H, G, Cv).

    Args:
        model: a regressor (e.g. from :func:`diffgen.tasks.regression.checkpoints.load`); put in eval mode.
        molecules: sequence of ``(z [n] int, pos [n, 3] Å)``.
        batch_size: molecules per forward pass.
        progress: optional callable, called with the number of molecules done after each batch.

    Returns:
        ``[len(molecules), T]`` float64, columns in the order of ``model.targets``.

    Raises:
        DiffgenError: atoms other than H, C, N, O, F.
    """
    model.eval()
    param = next(model.parameters())
    out = []
    for start in range(0, len(molecules), batch_size):
        b = _as_batch(molecules[start:start + batch_size], param.dtype, param.device)
        out.append(model.predict(b.z, b.pos, b.batch, b.num_graphs).cpu())
        if progress is not None:
            progress(b.num_graphs)
    if not out:
        return np.zeros((0, len(model.targets)))
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate_dataset(model: PropertyRegressor, dataset, batch_size: int = 256, progress=None) -> dict[str, float]:
    """Mean absolute error per target of ``model`` over a QM9 dataset (a split or a slice of one).

    Args:
        model: a regressor; put in eval mode.
        dataset: :class:`diffgen.data.qm9.QM9` (or a slice), whose ``y`` holds the stored targets.
        batch_size: molecules per forward pass.
        progress: optional callable, called with the number of molecules done after each batch.

    Returns:
        ``{target: MAE}`` in reported units (0.0 for an empty dataset).
    """
    from torch_geometric.loader import DataLoader

    model.eval()
    param = next(model.parameters())
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
