"""Lightning-free parts of the dynamics task: model construction, data pairs, evaluation, checkpoint loading.

Evaluation and prediction import only torch (not Lightning), so ``diffgen dynamics evaluate`` starts fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from diffgen.checkpoint_files import first_line, read_lightning
from diffgen.tasks.dynamics.config import DynamicsConfig, dynamics_config_from_dict
from diffgen.errors import DiffgenError
from diffgen.models.dynamics import VelocityEGNNDynamics

#: Test MSE on the N-body benchmark, from Satorras et al. 2021, Table 2.
REFERENCE_NBODY_MSE = {"Linear": 0.0819, "SE(3)-Transformer": 0.0244, "TFN": 0.0155, "GNN": 0.0107,
                       "Radial Field": 0.0104, "EGNN": 0.0071}


def build_model(cfg: DynamicsConfig) -> VelocityEGNNDynamics:
    m = cfg.model
    return VelocityEGNNDynamics(hidden=m.hidden, n_layers=m.n_layers, attention=m.attention,
                                norm_factor=m.norm_factor, coords_range=m.coords_range,
                                use_velocity=m.use_velocity, use_charges=m.use_charges, n_types=m.n_types,
                                vel_init=m.vel_init, pool_clusters=m.pool_clusters, pool_layers=m.pool_layers,
                                vector_channels=m.vector_channels)


def _tensors(*arrays) -> TensorDataset:
    return TensorDataset(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))


def md_settings(cfg: DynamicsConfig):
    from diffgen.data.md import MDSettings

    d = cfg.data
    return MDSettings(n_runs=d.md_runs, n_frames=d.md_frames, frame_ps=d.md_frame_ps, seed=d.md_seed)


def pairs_dataset(cfg: DynamicsConfig, split: str) -> TensorDataset:
    """``TensorDataset(pos, vel, charges, target, types)`` of one split.

    pos/vel/target ``[M, n, 3]`` float32, charges ``[M, n]`` float32, types ``[M, n]`` long.
    N-body: one pair (frame_in -> frame_out) per trajectory, types all 0. Alanine dipeptide: runs are
    split by trajectory (train = first runs, then valid, then test), every ``(t, t + lag)`` pair of a run.
    """
    from diffgen.data.nbody import frame_pairs

    d = cfg.data
    if d.dataset == "nbody":
        from diffgen.data.nbody import load_nbody_split

        n = {"train": d.n_train, "valid": d.n_valid, "test": d.n_test}[split]
        data = load_nbody_split(split, n, d.root, d.seed_offset)
        p = frame_pairs(data, d.frame_in, d.frame_out, name=f"nbody {split}")
        types = np.zeros(p.charges.shape, dtype=np.int64)
        return _tensors(p.pos.astype(np.float32), p.vel.astype(np.float32), p.charges.astype(np.float32),
                        p.target.astype(np.float32), types)
    from diffgen.data.md import load_md

    data = load_md(md_settings(cfg), d.root)
    n_train = d.md_runs - d.md_valid_runs - d.md_test_runs
    runs = {"train": slice(0, n_train), "valid": slice(n_train, n_train + d.md_valid_runs),
            "test": slice(n_train + d.md_valid_runs, d.md_runs)}[split]
    loc, vel, charges = data["loc"][runs], data["vel"][runs], data["charges"][runs]
    lag = d.frame_out - d.frame_in
    _, n_frames, n_atoms, _ = loc.shape
    pos = loc[:, :-lag].reshape(-1, n_atoms, 3)
    target = loc[:, lag:].reshape(-1, n_atoms, 3)
    v = vel[:, :-lag].reshape(-1, n_atoms, 3)
    q = np.repeat(charges, n_frames - lag, axis=0)
    types = np.broadcast_to(data["types"], q.shape).astype(np.int64)
    return _tensors(pos.astype(np.float32), v.astype(np.float32), q.astype(np.float32), target.astype(np.float32),
                    types)


@torch.no_grad()
def evaluate_pairs(model, dataset: TensorDataset, batch_size: int = 500, progress=None) -> dict[str, float]:
    """MSE of ``model`` and of two analytic baselines on input/target pairs.

    Returns ``{"model", "identity", "constant_velocity"}`` MSEs; identity predicts no motion and
    constant velocity predicts ``x + v * dt_ahead`` with ``dt_ahead`` fitted in closed form to the pairs
    (a cheap reference, not the learned linear model of the EGNN table).
    """
    pos, vel, charges, target = dataset.tensors[:4]
    types = dataset.tensors[4] if len(dataset.tensors) > 4 else None
    sq, n = 0.0, 0
    if model is not None:
        model.eval()
        for start in range(0, pos.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            pred = model(pos[sl], vel[sl], charges[sl], None if types is None else types[sl])
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


def load_model(checkpoint: str | Path) -> tuple[VelocityEGNNDynamics, DynamicsConfig]:
    """Model (CPU, eval mode) and config from a ``diffgen dynamics train`` Lightning checkpoint.

    Raises:
        DiffgenError: missing, unreadable or foreign checkpoint (one line).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise DiffgenError(f"checkpoint not found: {path}")
    ckpt = read_lightning(path)
    try:
        cfg = dynamics_config_from_dict(ckpt["hyper_parameters"]["config"])
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model = build_model(cfg)
        model.load_state_dict(state)
    except DiffgenError:
        raise
    except Exception as exc:  # noqa: BLE001 - foreign file or weights that do not fit the config
        raise DiffgenError(f"cannot load dynamics checkpoint {path}: {first_line(exc)}") from None
    return model.eval(), cfg
