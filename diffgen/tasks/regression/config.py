"""Typed configuration of QM9 property regression (``configs/qm9_regress.yaml``).

Same mechanics as :mod:`diffgen.config` (YAML + ``section.key=value`` overrides, one-line
:class:`~diffgen.errors.DiffgenError` on unknown keys or wrong types); the trainer section is the
shared :class:`~diffgen.config.TrainerConfig`. Defaults follow Satorras et al. 2021 (EGNN, QM9):
invariant EGNN 7 layers x 128, batch 96, Adam lr 1e-3 with cosine decay, one target per model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


from diffgen.config import TrainerConfig, _update, read_config_values
from diffgen.errors import DiffgenError


@dataclass
class RegressionDataConfig:
    root: str | None = None  # cache folder; None -> $DIFFGEN_CACHE or ~/.cache/diffgen
    batch_size: int = 96
    num_workers: int = 0
    subset: str | None = None  # None (100k train), "half0" or "half1" (EDM conditional-generation halves)


@dataclass
class RegressionTaskConfig:
    targets: list = field(default_factory=lambda: ["gap"])  # one or more of diffgen.data.qm9.TARGETS


@dataclass
class RegressionModelConfig:
    hidden: int = 128
    n_layers: int = 7
    attention: bool = True
    norm_factor: float = 1.0  # EGNN QM9 sums messages without normalisation
    charge_power: int = 2  # node features: one-hot x (Z/9)^k, k = 0..charge_power (EGNN QM9)
    graph: str = "full"  # full | radius | knn
    cutoff: float | None = None
    k: int | None = None


@dataclass
class RegressionOptimConfig:
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-16
    scheduler: str = "cosine"  # cosine (per step, to 0 over the planned steps) | none
    warmup_steps: int = 0


@dataclass
class RegressionConfig:
    data: RegressionDataConfig = field(default_factory=RegressionDataConfig)
    task: RegressionTaskConfig = field(default_factory=RegressionTaskConfig)
    model: RegressionModelConfig = field(default_factory=RegressionModelConfig)
    optim: RegressionOptimConfig = field(default_factory=RegressionOptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(out_dir="runs/qm9_regress"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _validate(cfg: RegressionConfig) -> RegressionConfig:
    from diffgen.tasks.regression.targets import resolve_targets

    cfg.task.targets = resolve_targets(cfg.task.targets)
    if cfg.data.subset not in (None, "half0", "half1"):
        raise DiffgenError(f"unknown data.subset {cfg.data.subset!r}: choose half0 or half1 (or null)")
    if cfg.data.batch_size < 1:
        raise DiffgenError(f"data.batch_size must be positive, got {cfg.data.batch_size}")
    if cfg.optim.optimizer not in ("adam", "adamw"):
        raise DiffgenError(f"unknown optim.optimizer {cfg.optim.optimizer!r}: choose adam or adamw")
    if cfg.optim.scheduler not in ("cosine", "none"):
        raise DiffgenError(f"unknown optim.scheduler {cfg.optim.scheduler!r}: choose cosine or none")
    if cfg.model.graph not in ("full", "radius", "knn"):
        raise DiffgenError(f"unknown model.graph {cfg.model.graph!r}: choose full, radius or knn")
    if cfg.model.hidden < 1 or cfg.model.n_layers < 1 or cfg.model.charge_power < 0:
        raise DiffgenError("model.hidden and model.n_layers must be >= 1 and model.charge_power >= 0")
    return cfg


def regression_config_from_dict(values: dict | None) -> RegressionConfig:
    """Build and validate a :class:`RegressionConfig` from a (possibly partial) nested dict."""
    cfg = RegressionConfig()
    _update(cfg, values or {})
    return _validate(cfg)


def load_regression_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RegressionConfig:
    """Load a YAML config (defaults if ``path`` is None) and apply ``section.key=value`` overrides.

    Raises:
        DiffgenError: unreadable file, invalid YAML, unknown key, wrongly typed or invalid value.
    """
    return regression_config_from_dict(read_config_values(path, overrides))
