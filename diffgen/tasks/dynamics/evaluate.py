"""Position MSE of a dynamics model on input/target pairs, beside two analytic baselines and the published N-body
numbers. Imports only torch (not Lightning)."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

#: Test MSE on the N-body benchmark, from Satorras et al. 2021, Table 2.
REFERENCE_NBODY_MSE = {"Linear": 0.0819, "SE(3)-Transformer": 0.0244, "TFN": 0.0155, "GNN": 0.0107,
                       "Radial Field": 0.0104, "EGNN": 0.0071}


@torch.no_grad()
def run_model(model, pos, vel, charges, types):
    """``model(pos, vel, charges, types)`` with the inputs moved to the device of the model's parameters (a model
    without parameters, e.g. a plain function, gets them as they are; ``types`` may be None); the prediction comes
    back on the CPU."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if param is not None:
        pos, vel, charges, types = (None if t is None else t.to(param.device) for t in (pos, vel, charges, types))
    return model(pos, vel, charges, types).cpu()


def evaluate_pairs(model, dataset: TensorDataset, batch_size: int = 500, progress=None) -> dict[str, float]:
    """MSE of ``model`` and of two analytic baselines on input/target pairs.

    Args:
        model: ``(pos, vel, charges, types) -> pos`` ahead (put in eval mode), or None for the baselines only.
        dataset: ``TensorDataset(pos, vel, charges, target[, types])``, pos/vel/target ``[M, n, 3]``.
        batch_size: pairs per forward pass.
        progress: optional callable, called with the number of pairs done after each batch.

    Returns:
        ``{"model", "identity", "constant_velocity"}`` MSEs (mean over pairs, particles and coordinates; squared units
        of the positions; no ``"model"`` if ``model`` is None). Identity predicts no motion; constant velocity
        predicts ``x + v * dt_ahead`` with ``dt_ahead`` fitted in closed form to the pairs (a cheap reference, not
        the learned linear model of the EGNN table).
    """
    pos, vel, charges, target = dataset.tensors[:4]
    types = dataset.tensors[4] if len(dataset.tensors) > 4 else None
    sq, n = 0.0, 0
    if model is not None:
        model.eval()
        for start in range(0, pos.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            pred = run_model(model, pos[sl], vel[sl], charges[sl], None if types is None else types[sl])
            sq += float((pred - target[sl]).pow(2).sum())
            n += pred.numel()
            if progress is not None:
                progress(pred.shape[0])
    disp = (target - pos).double()
    v = vel.double()
    tau = float((disp * v).sum() / v.pow(2).sum().clamp_min(1e-12))
    out = {"identity": float(disp.pow(2).mean()), "constant_velocity": float((disp - tau * v).pow(2).mean())}
    if model is not None:
        out["model"] = sq / max(n, 1)
    return out
