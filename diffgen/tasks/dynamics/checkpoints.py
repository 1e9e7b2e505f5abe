"""Dynamics checkpoints: Lightning ``.ckpt`` files from ``diffgen dynamics train`` and ``.safetensors`` exports.

The task's side of the contract of :mod:`diffgen.checkpoint_files`: :func:`load` gives
``(VelocityEGNNDynamics, DynamicsConfig)``, :func:`export` writes a safetensors file
(``format = diffgen-dynamics-v1``) holding the model's state dict (fp32 by default) and its ``config`` as JSON
metadata. :func:`build_model` builds the model from a config. No Lightning is imported here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from diffgen.checkpoint_files import (
    check_writable, existing_checkpoint, export_tensors, lightning_parts, load_weights, metadata_json,
    read_safetensors, stored_config, write_safetensors,
)
from diffgen.models.dynamics import VelocityEGNNDynamics
from diffgen.tasks.dynamics.config import DynamicsConfig, dynamics_config_from_dict

FORMAT = "diffgen-dynamics-v1"


def build_model(cfg: DynamicsConfig) -> VelocityEGNNDynamics:
    """The dynamics model described by ``cfg.model`` (random weights)."""
    m = cfg.model
    return VelocityEGNNDynamics(hidden=m.hidden, n_layers=m.n_layers, attention=m.attention,
                                norm_factor=m.norm_factor, coords_range=m.coords_range,
                                use_velocity=m.use_velocity, use_charges=m.use_charges, n_types=m.n_types,
                                vel_init=m.vel_init, pool_clusters=m.pool_clusters, pool_layers=m.pool_layers,
                                vector_channels=m.vector_channels, backbone=m.backbone,
                                transformer=m.transformer_kwargs())


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, model state)`` of a ``.safetensors`` export or a Lightning ``.ckpt``."""
    if path.suffix == ".safetensors":
        meta, state = read_safetensors(path, FORMAT, "dynamics")
        return metadata_json(meta, "config", path, dict), state
    hp, state = lightning_parts(path, "dynamics")
    return hp["config"], {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[VelocityEGNNDynamics, DynamicsConfig]:
    """Load a dynamics model from a Lightning ``.ckpt`` of ``diffgen dynamics train`` or a ``.safetensors`` export.

    Args:
        path: checkpoint file.
        device: where to put the model.

    Returns:
        ``(model, config)``: the model (fp32, eval mode, on ``device``) and its config.

    Raises:
        DiffgenError: missing, unreadable or foreign file; metadata without ``config``, not JSON, or a config that
            does not validate; weights that do not fit the stored config.
    """
    path = existing_checkpoint(path)
    cfg_dict, state = _read(path)
    cfg = stored_config(dynamics_config_from_dict, cfg_dict, path)
    model = build_model(cfg)
    load_weights(model, state, path)
    return model.to(device).eval(), cfg


def save(model: VelocityEGNNDynamics, config: DynamicsConfig, out_path: str | Path,
         dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write ``model`` (with its ``config``) as a ``diffgen-dynamics-v1`` safetensors file, floating-point weights in
    ``dtype``.

    Raises:
        DiffgenError: ``out_path`` does not end in ``.safetensors``, exists and ``overwrite`` is False, or its folder
            does not exist.
    """
    out_path = check_writable(out_path, overwrite, (".safetensors",))
    meta = {"format": FORMAT, "config": json.dumps(config.to_dict())}
    return write_safetensors(export_tensors(model.state_dict(), dtype), meta, out_path)


def export(ckpt_path: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float32,
           overwrite: bool = False) -> Path:
    """Export a Lightning training checkpoint (or re-write a ``.safetensors`` export) to a small safetensors file.

    Args:
        ckpt_path: Lightning ``.ckpt`` from ``diffgen dynamics train`` (or a ``.safetensors``).
        out_path: the ``.safetensors`` file to write.
        dtype: storage type of the floating-point weights (fp32 by default; loaded back as fp32).
        overwrite: replace ``out_path`` if it exists.

    Returns:
        ``out_path`` as a Path.

    Raises:
        DiffgenError: as :func:`save` (checked before the checkpoint is read) and as :func:`load`.
    """
    check_writable(out_path, overwrite, (".safetensors",))
    model, cfg = load(ckpt_path)
    return save(model, cfg, out_path, dtype=dtype, overwrite=overwrite)
