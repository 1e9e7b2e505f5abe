"""Typed configuration: nested dataclasses loaded from YAML, overridable with ``section.key=value``.

Example::

    cfg = load_config("configs/qm9_egnn.yaml", ["model.hidden=128", "trainer.max_epochs=5"])

Unknown keys and values of the wrong type raise :class:`~diffgen.errors.DiffgenError` with one line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from diffgen.errors import DiffgenError


@dataclass
class DataConfig:
    root: str | None = None  # cache folder; None -> $DIFFGEN_CACHE or ~/.cache/diffgen
    remove_h: bool = False
    batch_size: int = 64
    num_workers: int = 0
    subset: str | None = None  # None, "half0" or "half1" (EDM conditional-generation halves)


@dataclass
class ModelConfig:
    hidden: int = 256
    n_layers: int = 9
    attention: bool = True
    norm_factor: float = 1.0
    coords_range: float = 15.0
    graph: str = "full"  # full | radius | knn
    cutoff: float | None = None
    k: int | None = None


@dataclass
class DiffusionConfig:
    schedule: str = "polynomial"  # polynomial | cosine
    T: int = 1000
    s: float = 1.0e-5
    parameterization: str = "eps"  # eps (EDM) | x0
    loss_weight: str = "uniform"  # uniform (EDM) | min_snr (Hang et al. 2023)
    min_snr: float = 5.0


@dataclass
class OptimConfig:
    lr: float = 1.0e-4
    weight_decay: float = 1.0e-12
    ema_decay: float = 0.999
    clip_adaptive: bool = True  # EDM: clip at 1.5 x mean + 2 x std of recent gradient norms
    clip_value: float = 1.0  # fixed clip value used when clip_adaptive is False (0 = off)
    warmup_steps: int = 0  # linear learning-rate warm-up from 0 over this many steps (0 = off)
    init_from: str | None = None  # start from these generator weights (.safetensors/.ckpt, fresh optimizer) unless resuming


@dataclass
class TrainerConfig:
    out_dir: str = "runs/qm9_egnn"
    max_epochs: int = 1000
    max_steps: int = -1
    max_time: str | None = None  # e.g. "00:02:00:00" (DD:HH:MM:SS)
    accelerator: str = "auto"
    devices: Any = "auto"
    precision: str = "32-true"
    seed: int = 0
    log_every_n_steps: int = 50
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    ckpt_every_n_steps: int = 1000
    sample_every_n_epochs: int = 5  # periodic sampling metrics (0 = off)
    n_eval_samples: int = 100
    eval_steps: int = 100


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a YAML value against a dataclass field type hint."""
    text = str(hint)
    if value is None:
        if "None" in text or hint is Any:
            return None
        raise DiffgenError(f"config key {key} may not be null")
    if hint is Any:
        return value
    if hint is bool or text == "bool":
        if isinstance(value, bool):
            return value
        raise DiffgenError(f"config key {key} must be true or false, got {value!r}")
    for typ in (int, float, str):
        if hint is typ or text in (typ.__name__, f"{typ.__name__} | None"):
            if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if typ is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, typ) and not isinstance(value, bool):
                return value
            raise DiffgenError(f"config key {key} must be {typ.__name__}, got {value!r}")
    return value


def _update(obj: Any, values: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise DiffgenError(f"unknown config key {name}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DiffgenError(f"config section {name} must be a mapping")
            _update(current, value, prefix=f"{name}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], name))


def config_from_dict(values: dict | None) -> Config:
    """Build a :class:`Config` from a (possibly partial) nested dict."""
    cfg = Config()
    _update(cfg, values or {})
    return cfg


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["model.hidden=128", "trainer.devices=2"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise DiffgenError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = path.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def trainer_overrides(accelerator: str | None = None, devices: str | None = None,
                      out_dir: str | None = None) -> list[str]:
    """``trainer.*`` overrides for the CLI's ``--accelerator/--devices/--out-dir`` options (unset ones are skipped)."""
    given = {"accelerator": accelerator, "devices": devices, "out_dir": out_dir}
    return [f"trainer.{key}={value}" for key, value in given.items() if value]


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def read_config_values(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Nested dict of a YAML config file (``{}`` if ``path`` is None) with ``section.key=value`` overrides merged in.

    Shared by every task's config loader (generation, regression, dynamics).

    Raises:
        DiffgenError: unreadable file, invalid YAML, non-mapping document or malformed override.
    """
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DiffgenError(f"config file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DiffgenError(f"cannot parse config {p}: {str(exc).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise DiffgenError(f"config {p} must be a YAML mapping")
    return _merge(values, parse_overrides(overrides))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults if ``path`` is None) and apply ``section.key=value`` overrides.

    Raises:
        DiffgenError: unreadable file, invalid YAML, unknown key, wrongly typed or unknown choice.
    """
    cfg = config_from_dict(read_config_values(path, overrides))
    choices = {"diffusion.schedule": ("polynomial", "cosine"), "diffusion.parameterization": ("eps", "x0"),
               "diffusion.loss_weight": ("uniform", "min_snr"), "model.graph": ("full", "radius", "knn")}
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise DiffgenError(f"config key {key} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.optim.warmup_steps < 0:
        raise DiffgenError(f"config key optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.optim.init_from is not None and not Path(cfg.optim.init_from).is_file():
        raise DiffgenError(f"optim.init_from: checkpoint not found: {cfg.optim.init_from}")
    return cfg
