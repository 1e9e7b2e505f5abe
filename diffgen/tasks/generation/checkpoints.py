"""Generator checkpoints: Lightning ``.ckpt`` files from training and shipped ``.safetensors`` weights.

A shipped checkpoint is a safetensors file of the EMA weights of a :class:`~diffgen.diffusion.vp.VPDiffusion`
(fp16 by default, loaded back as fp32) whose metadata carries the training config and the
training atom-count histogram, so sampling needs neither the dataset nor the training run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.checkpoint_files import PRETRAINED_DIR, first_line, read_lightning, read_safetensors, write_safetensors
from diffgen.tasks.generation.config import GenerationConfig, config_from_dict
from diffgen.diffusion.samplers import NodeCountDistribution
from diffgen.diffusion.vp import VPDiffusion
from diffgen.errors import DiffgenError

DEFAULT_CHECKPOINT = PRETRAINED_DIR / "qm9_egnn.safetensors"
_FORMAT = "diffgen-generator-v1"


@dataclass
class Generator:
    """A loaded generator: the diffusion process (eval mode), its atom-count prior and its config."""

    diffusion: VPDiffusion
    node_dist: NodeCountDistribution
    config: GenerationConfig
    source: Path


def _ema_state_from_lightning(ckpt: dict) -> dict[str, torch.Tensor]:
    state = ckpt["state_dict"]
    prefix = "ema.module."
    ema = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not ema:  # no EMA stored: fall back to the raw weights
        ema = {k[len("diffusion."):]: v for k, v in state.items() if k.startswith("diffusion.")}
    return ema


def _read_lightning(path: Path) -> tuple[dict, list[int], dict[str, torch.Tensor]]:
    ckpt = read_lightning(path)
    try:
        hp = ckpt["hyper_parameters"]
        return hp["config"], list(hp["node_histogram"]), _ema_state_from_lightning(ckpt)
    except (KeyError, TypeError) as exc:
        raise DiffgenError(f"{path} is not a diffgen generator checkpoint (missing {exc})") from None


def _read_safetensors(path: Path) -> tuple[dict, list[int], dict[str, torch.Tensor]]:
    meta, state = read_safetensors(path, _FORMAT, "generator")
    return json.loads(meta["config"]), json.loads(meta["node_histogram"]), state


def load_generator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Generator:
    """Load a generator from a ``.safetensors`` export or a Lightning ``.ckpt`` (EMA weights are used).

    Args:
        path: checkpoint file; None -> the weights shipped with diffgen (:data:`DEFAULT_CHECKPOINT`).
        device: where to put the model.

    Raises:
        DiffgenError: missing file, unreadable/corrupt file, or weights that do not fit the stored config.
    """
    from diffgen.tasks.generation.build import build_diffusion

    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        hint = " (the shipped weights are missing from this installation)" if path == DEFAULT_CHECKPOINT else ""
        raise DiffgenError(f"checkpoint not found: {path}{hint}")
    if path.suffix == ".safetensors":
        cfg_dict, hist, state = _read_safetensors(path)
    else:
        cfg_dict, hist, state = _read_lightning(path)
    cfg = config_from_dict(cfg_dict)
    diffusion = build_diffusion(cfg)
    try:
        diffusion.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise DiffgenError(f"checkpoint {path} does not match its config: {first_line(exc)}") from None
    return Generator(diffusion.to(device).eval(), NodeCountDistribution(hist), cfg, path)


def export_generator(ckpt_path: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float16,
                     overwrite: bool = False) -> Path:
    """Write the EMA weights of a training checkpoint as safetensors (+ a YAML of its config beside it).

    Raises:
        DiffgenError: unreadable checkpoint, or ``out_path`` exists and ``overwrite`` is False.
    """
    import yaml

    out_path = Path(out_path)
    for p in (out_path, out_path.with_suffix(".yaml")):
        if p.exists() and not overwrite:
            raise DiffgenError(f"{p} exists; pass --overwrite to replace it")
    cfg_dict, hist, state = _read_lightning(Path(ckpt_path))
    config_from_dict(cfg_dict)  # validate
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta = {"format": _FORMAT, "config": json.dumps(cfg_dict), "node_histogram": json.dumps(hist)}
    write_safetensors(tensors, meta, out_path)
    out_path.with_suffix(".yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    return out_path
