"""Regressor checkpoints: Lightning ``.ckpt`` files from ``diffgen regress train`` and shipped ``.safetensors``.

A shipped file holds the weights of a :class:`~diffgen.tasks.regression.module.RegressionTask` (fp32 by
default; fp16 optional, loaded back as fp32) and, as safetensors metadata (JSON strings), the
training config, target names, reported units and the training mean/MAD, so predicting needs
neither the dataset nor the training run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from diffgen.checkpoint_files import PRETRAINED_DIR, first_line, read_lightning, read_safetensors, write_safetensors
from diffgen.errors import DiffgenError

DEFAULT_REGRESSOR = PRETRAINED_DIR / "qm9_regress_gap.safetensors"
_FORMAT = "diffgen-regressor-v1"


def _read_lightning(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    ckpt = read_lightning(path)
    try:
        hp = ckpt["hyper_parameters"]
        return hp["config"], hp["stats"], ckpt["state_dict"]
    except (KeyError, TypeError) as exc:
        raise DiffgenError(f"{path} is not a diffgen regression checkpoint (missing {exc})") from None


def _read_safetensors(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    meta, state = read_safetensors(path, _FORMAT, "regression")
    stats = {"mean": json.loads(meta["mean"]), "mad": json.loads(meta["mad"])}
    return json.loads(meta["config"]), stats, state


def load_regressor(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Load a :class:`~diffgen.tasks.regression.module.RegressionTask` (eval mode) from ``.safetensors`` or ``.ckpt``.

    Args:
        path: checkpoint; None -> the shipped gap model (:data:`DEFAULT_REGRESSOR`).
        device: where to put the model.

    Raises:
        DiffgenError: missing, unreadable or foreign file, or weights that do not fit the stored config.
    """
    from diffgen.tasks.regression.module import RegressionTask

    path = Path(path) if path is not None else DEFAULT_REGRESSOR
    if not path.is_file():
        hint = " (the shipped regression weights are missing from this installation)" if path == DEFAULT_REGRESSOR else ""
        raise DiffgenError(f"checkpoint not found: {path}{hint}")
    config, stats, state = (_read_safetensors if path.suffix == ".safetensors" else _read_lightning)(path)
    task = RegressionTask(config, stats)
    own = task.state_dict()
    try:
        task.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise DiffgenError(f"checkpoint {path} does not match its config: {first_line(exc)}") from None
    return task.to(device).eval()


def save_regressor(task, out_path: str | Path, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write ``task`` (a RegressionTask) as safetensors with its config/targets/units/mean/MAD as metadata.

    Floating-point weights are stored in ``dtype``; the mean/MAD buffers always stay float64.

    Raises:
        DiffgenError: ``out_path`` exists and ``overwrite`` is False, or its folder does not exist.
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise DiffgenError(f"{out_path} exists; pass --overwrite to replace it")
    if not out_path.parent.is_dir():
        raise DiffgenError(f"cannot write {out_path}: directory {out_path.parent} does not exist")
    tensors = {}
    for k, v in task.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point() and k not in ("mean", "mad"):
            v = v.to(dtype)
        tensors[k] = v
    hp = task.hparams
    meta = {
        "format": _FORMAT,
        "config": json.dumps(hp["config"]),
        "targets": json.dumps(list(task.targets)),
        "units": json.dumps(list(task.units)),
        "mean": json.dumps(task.mean.tolist()),
        "mad": json.dumps(task.mad.tolist()),
    }
    return write_safetensors(tensors, meta, out_path)


def export_regressor(ckpt_path: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float32,
                     overwrite: bool = False) -> Path:
    """Export a Lightning training checkpoint (``.ckpt``) to a small ``.safetensors`` file."""
    if Path(out_path).suffix != ".safetensors":
        raise DiffgenError("the export file name must end in .safetensors")
    if Path(out_path).exists() and not overwrite:
        raise DiffgenError(f"{out_path} exists; pass --overwrite to replace it")
    return save_regressor(load_regressor(ckpt_path), out_path, dtype=dtype, overwrite=overwrite)
