"""Typed configuration of QM9 property regression (``diffgen/configs/qm9_regress.yaml``).

Built with the one mechanism of :mod:`diffgen.config` (YAML + ``section.key=value`` overrides, choices as
``Literal``, bounds on the fields, one-line :class:`~diffgen.errors.DiffgenError`); the trainer section is the
shared :class:`~diffgen.config.TrainerConfig`. Defaults follow Satorras et al. 2021 (EGNN, QM9):
invariant EGNN 7 layers x 128, batch 96, Adam lr 1e-3 with cosine decay, one target per model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from diffgen.config import (
    BackboneConfig, ConfigRoot, GraphKind, TrainerConfig, bounded, build_config, drop_legacy_keys, load_config,
)
from diffgen.errors import DiffgenError
from diffgen.data.qm9 import TARGETS


_BY_LOWER = {t.lower(): t for t in TARGETS}


def resolve_targets(names) -> list[str]:
    """Canonical target names from user input: a list, or a comma-separated string; case-insensitive.

    ``"gap"`` -> ``["gap"]``; ``"u0,cv"`` -> ``["U0", "Cv"]``.

    Raises:
        DiffgenError: empty list, unknown or repeated target.
    """
    if isinstance(names, str):
        names = [names]
    flat = [part.strip() for name in (names or []) for part in str(name).split(",") if part.strip()]
    if not flat:
        raise DiffgenError(f"no regression target given: choose from {', '.join(TARGETS)}")
    out = []
    for name in flat:
        canon = _BY_LOWER.get(name.lower())
        if canon is None:
            raise DiffgenError(f"unknown target {name!r}: choose from {', '.join(TARGETS)}")
        if canon in out:
            raise DiffgenError(f"target {canon} given twice")
        out.append(canon)
    return out


@dataclass
class RegressionDataConfig:
    root: str | None = None  # cache folder; None -> $DIFFGEN_CACHE or ~/.cache/diffgen
    batch_size: int = bounded(96, ge=1)
    num_workers: int = bounded(0, ge=0)
    subset: Literal["half0", "half1"] | None = None  # None (100k train) or an EDM conditional-generation half


@dataclass
class RegressionTaskConfig:
    targets: list = field(default_factory=lambda: ["gap"])  # one or more of diffgen.data.qm9.TARGETS

    def check(self) -> None:
        self.targets = resolve_targets(self.targets)


@dataclass
class RegressionModelConfig(BackboneConfig):
    hidden: int = bounded(128, ge=1)
    n_layers: int = bounded(7, ge=1)
    norm_factor: float = bounded(1.0, gt=0)  # EGNN QM9 sums messages without normalisation
    charge_power: int = bounded(2, ge=0)  # node features: one-hot x (Z/9)^k, k = 0..charge_power (EGNN QM9)
    graph: GraphKind = "full"
    cutoff: float | None = bounded(None, gt=0)
    k: int | None = bounded(None, ge=1)


@dataclass
class RegressionOptimConfig:
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = bounded(1.0e-3, gt=0)
    weight_decay: float = bounded(1.0e-16, ge=0)
    scheduler: Literal["cosine", "none"] = "cosine"  # cosine: per step, to 0 over the planned steps
    warmup_steps: int = bounded(0, ge=0)


@dataclass
class RegressionConfig(ConfigRoot):
    data: RegressionDataConfig = field(default_factory=RegressionDataConfig)
    task: RegressionTaskConfig = field(default_factory=RegressionTaskConfig)
    model: RegressionModelConfig = field(default_factory=RegressionModelConfig)
    optim: RegressionOptimConfig = field(default_factory=RegressionOptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(out_dir="runs/qm9_regress"))

    def check(self) -> None:
        """The cosine schedule decays over the planned steps: it needs trainer.max_steps or max_epochs."""
        if self.optim.scheduler == "cosine" and self.trainer.max_steps < 0 and self.trainer.max_epochs < 0:
            raise DiffgenError("optim.scheduler=cosine needs trainer.max_steps or trainer.max_epochs (no end to "
                               "decay towards); set one, or optim.scheduler=none")


def regression_config_from_dict(values: dict | None) -> RegressionConfig:
    """Build and validate a :class:`RegressionConfig` from a (possibly partial) nested dict, e.g. a checkpoint's.

    Raises:
        DiffgenError: unknown key, wrong type, out-of-bounds value, unknown choice or target (one line).
    """
    return build_config(RegressionConfig, drop_legacy_keys(values))


def load_regression_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RegressionConfig:
    """Load a YAML config (defaults if ``path`` is None) and apply ``section.key=value`` overrides.

    Raises:
        DiffgenError: unreadable file, invalid YAML, unknown key, wrongly typed or invalid value.
    """
    return load_config(RegressionConfig, path, overrides)
