"""Regressor checkpoints: Lightning ``.ckpt`` files from ``diffgen regress train`` and ``.safetensors`` exports.

The task's side of the contract of :mod:`diffgen.checkpoint_files`: :func:`load` gives
``(PropertyRegressor, RegressionConfig)`` (a plain ``nn.Module``: inference needs no Lightning), :func:`export` writes
a safetensors file.

An export (``format = diffgen-regressor-v2``) holds the :class:`~diffgen.models.regressor.PropertyRegressor` state
dict (floating-point weights in fp32 by default, fp16 optional, loaded back as fp32; the ``mean``/``mad`` statistics
always float64) and, as JSON metadata, ``config`` plus the ``targets`` and ``units`` for people reading the file.
Files of the first layout (``diffgen-regressor-v1``, e.g. the shipped gap model) name the network weights
``model.<name>`` (the Lightning module's names); they load unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from diffgen.checkpoint_files import (
    PRETRAINED_DIR, check_writable, existing_checkpoint, export_tensors, lightning_parts, load_weights,
    metadata_json, read_safetensors, stored_config, write_safetensors,
)
from diffgen.models.regressor import PropertyRegressor
from diffgen.tasks.regression.config import RegressionConfig, regression_config_from_dict
from diffgen.tasks.regression.targets import REPORT_UNITS, atomref_table

#: The gap regressor shipped with diffgen (used when no checkpoint is given).
DEFAULT_REGRESSOR = PRETRAINED_DIR / "qm9_regress_gap.safetensors"
FORMAT = "diffgen-regressor-v2"
_FORMAT_V1 = "diffgen-regressor-v1"  # network weights under "model.", mean/mad at the top level


def build_model(cfg: RegressionConfig, stats: dict | None = None) -> PropertyRegressor:
    """The regressor described by ``cfg`` (random weights), with the atom references and units of its targets.

    Args:
        cfg: the regression config (``cfg.task.targets``, ``cfg.model``).
        stats: ``{"mean": [T], "mad": [T]}`` training statistics (reported units); None -> 0 and 1, to be filled by
            loading a checkpoint.

    Raises:
        ValueError: ``stats`` does not have one mean and one positive MAD per target.
    """
    targets, m = list(cfg.task.targets), cfg.model
    stats = stats or {}
    return PropertyRegressor(targets, stats.get("mean"), stats.get("mad"), atomref=atomref_table(targets),
                             units=[REPORT_UNITS[t] for t in targets], hidden=m.hidden, n_layers=m.n_layers,
                             attention=m.attention, norm_factor=m.norm_factor, charge_power=m.charge_power,
                             graph=m.graph, cutoff=m.cutoff, k=m.k, backbone=m.backbone,
                             transformer=m.transformer_kwargs())


def _strip_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Lightning (``model.egnn...``, ``model.mean`` or, before the re-layout, ``mean``) and v1 names -> the
    regressor's own names."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, regressor state)`` of a ``.safetensors`` export or a Lightning ``.ckpt``."""
    if path.suffix == ".safetensors":
        meta, state = read_safetensors(path, (FORMAT, _FORMAT_V1), "regression")
        return metadata_json(meta, "config", path, dict), _strip_model_prefix(state)
    hp, state = lightning_parts(path, "regression")
    return hp["config"], _strip_model_prefix(state)


def load(path: str | Path | None = None, device: str | torch.device = "cpu",
         ) -> tuple[PropertyRegressor, RegressionConfig]:
    """Load a regressor from a ``.safetensors`` export or a Lightning ``.ckpt``.

    Args:
        path: checkpoint file; None -> the shipped gap model (:data:`DEFAULT_REGRESSOR`).
        device: where to put the model.

    Returns:
        ``(model, config)``: the :class:`~diffgen.models.regressor.PropertyRegressor` (eval mode, on ``device``,
        statistics float64) and its config.

    Raises:
        DiffgenError: missing, unreadable or foreign file; metadata without ``config``, not JSON, or a config that
            does not validate; weights or statistics that do not fit the stored config.
    """
    path = existing_checkpoint(path, DEFAULT_REGRESSOR)
    cfg_dict, state = _read(path)
    cfg = stored_config(regression_config_from_dict, cfg_dict, path)
    model = build_model(cfg)
    load_weights(model, state, path)
    return model.to(device).eval(), cfg


def load_regressor(path: str | Path | None = None, device: str | torch.device = "cpu") -> PropertyRegressor:
    """``load(path, device)[0]``: the regressor alone (see :func:`load`)."""
    return load(path, device)[0]


def save(model: PropertyRegressor, config: RegressionConfig, out_path: str | Path,
         dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write ``model`` (with its ``config``) as a ``diffgen-regressor-v2`` safetensors file.

    Floating-point weights are stored in ``dtype``; the mean/MAD statistics always stay float64.

    Raises:
        DiffgenError: ``out_path`` does not end in ``.safetensors``, exists and ``overwrite`` is False, or its folder
            does not exist.
    """
    out_path = check_writable(out_path, overwrite, (".safetensors",))
    meta = {"format": FORMAT, "config": json.dumps(config.to_dict()), "targets": json.dumps(list(model.targets)),
            "units": json.dumps(list(model.units))}
    return write_safetensors(export_tensors(model.state_dict(), dtype, keep=("mean", "mad")), meta, out_path)


def export(ckpt_path: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float32,
           overwrite: bool = False) -> Path:
    """Export a Lightning training checkpoint (or re-write a ``.safetensors`` export) to a small safetensors file.

    Args:
        ckpt_path: Lightning ``.ckpt`` from ``diffgen regress train`` (or a ``.safetensors``).
        out_path: the ``.safetensors`` file to write.
        dtype: storage type of the floating-point weights (the statistics stay float64).
        overwrite: replace ``out_path`` if it exists.

    Returns:
        ``out_path`` as a Path.

    Raises:
        DiffgenError: as :func:`save` (checked before the checkpoint is read) and as :func:`load`.
    """
    check_writable(out_path, overwrite, (".safetensors",))
    model, cfg = load(existing_checkpoint(ckpt_path))
    return save(model, cfg, out_path, dtype=dtype, overwrite=overwrite)


#: Former name of :func:`export` (the CLI and older scripts use it).
export_regressor = export
