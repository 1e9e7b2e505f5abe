"""Dynamics data as input/target pairs: N-body trajectories (:mod:`diffgen.data.nbody`) and alanine-dipeptide MD runs
(:mod:`diffgen.data.md`), turned into ``TensorDataset(pos, vel, charges, target, types)`` for a config's frames.

Imports only torch and numpy (not Lightning), so evaluation and prediction start fast.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from diffgen.tasks.dynamics.config import DynamicsConfig


def _tensors(*arrays) -> TensorDataset:
    return TensorDataset(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))


def md_settings(cfg: DynamicsConfig):
    """The :class:`~diffgen.data.md.MDSettings` (runs, frames, frame spacing, seed) of ``cfg.data``."""
    from diffgen.data.md import MDSettings

    d = cfg.data
    return MDSettings(n_runs=d.md_runs, n_frames=d.md_frames, frame_ps=d.md_frame_ps, seed=d.md_seed)


def pairs_dataset(cfg: DynamicsConfig, split: str) -> TensorDataset:
    """``TensorDataset(pos, vel, charges, target, types)`` of one split.

    pos/vel/target ``[M, n, 3]`` float32, charges ``[M, n]`` float32, types ``[M, n]`` long.
    N-body: one pair (frame_in -> frame_out) per trajectory, types all 0. Alanine dipeptide: runs are
    split by trajectory (train = first runs, then valid, then test), every ``(t, t + lag)`` pair of a run.

    Raises:
        DiffgenError: missing or broken cache files, frames the data do not have.
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


def trajectory_pairs(trajectories: dict, cfg: DynamicsConfig, name: str) -> TensorDataset:
    """``TensorDataset(pos, vel, charges, target)`` (float32) of user trajectories at the config's frames.

    Args:
        trajectories: ``{"loc", "vel": [B, F, n, 3], "charges": [B, n]}`` (:func:`diffgen.data.nbody.load_trajectories`).
        cfg: gives ``data.frame_in`` and ``data.frame_out``.
        name: the data's name in error messages (e.g. the file).

    Raises:
        DiffgenError: the trajectories lack those frames or have inconsistent shapes.
    """
    from diffgen.data.nbody import frame_pairs

    p = frame_pairs(trajectories, cfg.data.frame_in, cfg.data.frame_out, name=name)
    return _tensors(*(np.asarray(a, dtype=np.float32) for a in (p.pos, p.vel, p.charges, p.target)))
