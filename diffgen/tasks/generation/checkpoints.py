"""Generator checkpoints: Lightning ``.ckpt`` files from training and shipped ``.safetensors`` weights.

The task's side of the contract of :mod:`diffgen.checkpoint_files`: :func:`load` gives ``(Generator, GenerationConfig)``,
:func:`export` writes a safetensors file. An export holds the EMA weights of a
:class:`~diffgen.diffusion.vp.VPDiffusion` (fp16 by default, loaded back as fp32) and, as metadata,
``format = diffgen-generator-v1``, ``config`` (JSON) and ``node_histogram`` (JSON list: the training atom-count
histogram), so sampling needs neither the dataset nor the training run. A YAML copy of the config is written beside it.
An export made with ``with_raw=True`` also holds the trained (non-EMA) weights under keys ``raw.*``: with it a
training run can go on where its Lightning checkpoint is gone (``optim.init_from``, :func:`read_training_weights`);
loading it for sampling ignores them. An export of several checkpoints (their averaged EMA weights) also records
``averaged_from`` (JSON list of the input file names).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.checkpoint_files import (
    PRETRAINED_DIR, average_states, check_writable, existing_checkpoint, export_tensors, lightning_parts, load_weights,
    metadata_json, read_safetensors, stored_config, write_safetensors, write_text,
)
from diffgen.diffusion.samplers import NodeCountDistribution
from diffgen.diffusion.vp import VPDiffusion
from diffgen.errors import DiffgenError
from diffgen.tasks.generation.config import GenerationConfig, config_from_dict

#: The generator shipped with diffgen (used when no checkpoint is given).
DEFAULT_CHECKPOINT = PRETRAINED_DIR / "qm9_egnn.safetensors"
FORMAT = "diffgen-generator-v1"


@dataclass
class Generator:
    """A loaded generator: the diffusion process (eval mode), its atom-count prior, its config and its file."""

    diffusion: VPDiffusion
    node_dist: NodeCountDistribution
    config: GenerationConfig
    source: Path


def _ema_state_from_lightning(state: dict) -> dict[str, torch.Tensor]:
    prefix = "ema.module."
    ema = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not ema:  # no EMA stored: fall back to the raw weights
        ema = {k[len("diffusion."):]: v for k, v in state.items() if k.startswith("diffusion.")}
    return ema


RAW = "raw."  # key prefix of the trained (non-EMA) weights in an export made with ``with_raw=True``


def _raw_state_from_lightning(state: dict) -> dict[str, torch.Tensor]:
    return {k[len("diffusion."):]: v for k, v in state.items() if k.startswith("diffusion.")}


def _read(path: Path, raw: bool = False) -> tuple[dict, list, dict[str, torch.Tensor]]:
    """``(config dict, node histogram, diffusion state)`` of a ``.safetensors`` export or a Lightning ``.ckpt``:
    the EMA weights, or with ``raw`` the trained weights (``{}`` if the file holds none)."""
    if path.suffix == ".safetensors":
        meta, state = read_safetensors(path, FORMAT, "generator")
        if raw:
            state = {k[len(RAW):]: v for k, v in state.items() if k.startswith(RAW)}
        else:
            state = {k: v for k, v in state.items() if not k.startswith(RAW)}
        return metadata_json(meta, "config", path, dict), metadata_json(meta, "node_histogram", path, list), state
    hp, state = lightning_parts(path, "generator", ("config", "node_histogram"))
    weights = _raw_state_from_lightning(state) if raw else _ema_state_from_lightning(state)
    return hp["config"], list(hp["node_histogram"]), weights


def _node_distribution(hist: list, path: Path) -> NodeCountDistribution:
    try:
        return NodeCountDistribution(hist)
    except (TypeError, ValueError) as exc:
        raise DiffgenError(f"{path}: invalid node_histogram ({exc})") from None


def load(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[Generator, GenerationConfig]:
    """Load a generator from a ``.safetensors`` export or a Lightning ``.ckpt`` (whose EMA weights are used).

    Args:
        path: checkpoint file; None -> the weights shipped with diffgen (:data:`DEFAULT_CHECKPOINT`).
        device: where to put the model.

    Returns:
        ``(generator, config)``: the :class:`Generator` (fp32, eval mode, on ``device``) and its config
        (``generator.config`` too).

    Raises:
        DiffgenError: missing, unreadable or foreign file; metadata without ``config``/``node_histogram``, not JSON,
            or a config that does not validate; weights that do not fit the stored config.
    """
    from diffgen.tasks.generation.build import build_diffusion

    path = existing_checkpoint(path, DEFAULT_CHECKPOINT)
    cfg_dict, hist, state = _read(path)
    cfg = stored_config(config_from_dict, cfg_dict, path)
    node_dist = _node_distribution(hist, path)
    diffusion = build_diffusion(cfg)
    load_weights(diffusion, state, path)
    return Generator(diffusion.to(device).eval(), node_dist, cfg, path), cfg


def load_generator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Generator:
    """``load(path, device)[0]``: the :class:`Generator` alone (see :func:`load`)."""
    return load(path, device)[0]


def read_training_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(ema, raw)`` diffusion state dicts of a checkpoint, to go on training from it: a Lightning ``.ckpt`` has
    both; an export has ``raw`` only if made with ``with_raw=True`` (else None: start the trained weights at the EMA).

    Raises:
        DiffgenError: missing, unreadable or foreign file.
    """
    path = existing_checkpoint(path)
    ema = _read(path)[2]
    raw = _read(path, raw=True)[2]
    return ema, (raw or None)


def _fitted_state(cfg: GenerationConfig, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state`` as the configured network's own fp32 state dict (older key names renamed by the modules' load hooks,
    exports of any dtype alike); weights that do not fit ``cfg`` are a one-line DiffgenError."""
    from diffgen.tasks.generation.build import build_diffusion

    diffusion = build_diffusion(cfg)
    load_weights(diffusion, state, path)
    return diffusion.state_dict()


def export(ckpt_path: str | Path | Sequence[str | Path], out_path: str | Path, dtype: torch.dtype = torch.float16,
           overwrite: bool = False, with_raw: bool = False) -> Path:
    """Write the EMA weights of a training checkpoint (or re-write an export) as safetensors, and the config as YAML
    beside it (``out_path`` with the suffix ``.yaml``).

    Given several checkpoints (e.g. periodic checkpoints of one run, ``trainer.keep_every_n_steps``), writes the
    uniform mean of their EMA weights (checkpoint averaging, Izmailov et al. 2018;
    :func:`~diffgen.checkpoint_files.average_states`), with the config and atom-count histogram of the first.

    Args:
        ckpt_path: Lightning ``.ckpt`` from ``diffgen train`` (or a ``.safetensors`` export), or a sequence of them
            to average.
        out_path: the ``.safetensors`` file to write.
        dtype: storage type of the floating-point weights (fp16 by default; loaded back as fp32).
        overwrite: replace ``out_path`` and the YAML beside it if they exist.
        with_raw: also store the trained (non-EMA) weights, under ``raw.*`` keys (to continue training from the file;
            one checkpoint only).

    Returns:
        ``out_path`` as a Path.

    Raises:
        DiffgenError: ``out_path`` does not end in ``.safetensors``, it or its YAML exists and ``overwrite`` is False,
            its folder does not exist; unreadable or foreign checkpoint, or one whose config does not validate;
            checkpoints to average whose model, diffusion or atom-count histogram differ, whose weights do not fit
            that config, or that are given with ``with_raw``; an empty sequence.
    """
    import yaml

    out_path = check_writable(out_path, overwrite, (".safetensors",))
    yaml_path = check_writable(out_path.with_suffix(".yaml"), overwrite)
    single = ckpt_path is None or isinstance(ckpt_path, (str, os.PathLike))
    sources = [ckpt_path] if single else list(ckpt_path)
    if not sources:
        raise DiffgenError("export needs at least one checkpoint")
    if with_raw and len(sources) > 1:
        raise DiffgenError("--with-raw takes one checkpoint, not an average of several")
    paths = [existing_checkpoint(p) for p in sources]
    path = paths[0]
    cfg_dict, hist, state = _read(path)
    cfg = stored_config(config_from_dict, cfg_dict, path)
    _node_distribution(hist, path)
    if len(paths) > 1:
        states = [state]
        for other in paths[1:]:
            other_cfg_dict, other_hist, other_state = _read(other)
            other_cfg = stored_config(config_from_dict, other_cfg_dict, other)
            for section in ("model", "diffusion"):
                if getattr(other_cfg, section) != getattr(cfg, section):
                    raise DiffgenError(f"cannot average {other} with {path}: their {section} configs differ")
            if list(other_hist) != list(hist):
                raise DiffgenError(f"cannot average {other} with {path}: their atom-count histograms differ")
            states.append(other_state)
        state = average_states([_fitted_state(cfg, st, p) for st, p in zip(states, paths)], paths)
    cfg_dict = cfg.to_dict()
    meta = {"format": FORMAT, "config": json.dumps(cfg_dict), "node_histogram": json.dumps(list(hist))}
    if len(paths) > 1:
        meta["averaged_from"] = json.dumps([p.name for p in paths])
    tensors = export_tensors(state, dtype)
    if with_raw:
        raw = _read(path, raw=True)[2]
        if not raw:
            raise DiffgenError(f"{path} holds no trained (non-EMA) weights to export with them")
        tensors.update({RAW + k: v for k, v in export_tensors(raw, dtype).items()})
    write_safetensors(tensors, meta, out_path)
    write_text(yaml.safe_dump(cfg_dict, sort_keys=False), yaml_path)
    return out_path


#: Former name of :func:`export` (CLI, tests and benchmarks use both).
export_generator = export
