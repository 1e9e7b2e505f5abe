"""Typed configuration of dynamics prediction (``configs/nbody_egnn.yaml``).

Same mechanics as :mod:`diffgen.config` (YAML + ``section.key=value`` overrides, one-line
:class:`~diffgen.errors.DiffgenError` on unknown keys or wrong types); the trainer section is the shared
:class:`~diffgen.config.TrainerConfig`. Defaults follow the N-body protocol of Satorras et al. 2021
(EGNN, Sec. 5.1): 3,000/2,000/2,000 trajectories, frame 30 -> 40, velocity-aware EGNN 4 layers x 64,
MSE loss, Adam lr 5e-4, batch 100.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


from diffgen.config import TrainerConfig, _update, read_config_values
from diffgen.data.md import MDSettings
from diffgen.errors import DiffgenError

DATASETS = ("nbody", "alanine_dipeptide")


@dataclass
class DynamicsDataConfig:
    dataset: str = "nbody"
    root: str | None = None  # cache root; None -> $DIFFGEN_CACHE or ~/.cache/diffgen
    n_train: int = 3000
    n_valid: int = 2000
    n_test: int = 2000
    frame_in: int = 30
    frame_out: int = 40
    seed_offset: int = 0  # 0 = the benchmark's data seeds
    batch_size: int = 100
    num_workers: int = 0
    # alanine_dipeptide (OpenMM, diffgen.data.md): runs split by trajectory, pairs (t, t + frame_out - frame_in)
    md_runs: int = MDSettings.n_runs  # simulation defaults live in one place: diffgen.data.md.MDSettings
    md_frames: int = MDSettings.n_frames
    md_frame_ps: float = MDSettings.frame_ps
    md_seed: int = MDSettings.seed
    md_valid_runs: int = 2
    md_test_runs: int = 2


@dataclass
class DynamicsModelConfig:
    hidden: int = 64
    n_layers: int = 4
    attention: bool = False
    norm_factor: float = 1.0
    coords_range: float = 10.0
    use_velocity: bool = True  # False: flat EGNN (positions only)
    use_charges: bool = True
    vel_init: float = 1.0  # initial velocity scale: 1 = constant-velocity guess x + v, 0 = identity
    # C equivariant vector channels per node, initialised [v, 0, ...] and updated in every layer, with their pairwise
    # invariants as edge features (diffgen.models.egnn.EGNN vector_channels); 0 = EGNN's eq. 7 model exactly
    vector_channels: int = 0
    n_types: int = 0  # one-hot atom types appended to |v| (4 for alanine dipeptide: H, C, N, O)
    # EGHN hierarchy block (Han et al. 2022; diffgen.models.eghn): K soft clusters per system, 0 = off (flat model)
    pool_clusters: int = 0
    pool_layers: int = 2  # layers of the cluster EGNN
    pool_reg_weight: float = 0.01  # weight of the assignment regulariser (crispness + balance) in the training loss


@dataclass
class DynamicsOptimConfig:
    lr: float = 5.0e-4
    weight_decay: float = 1.0e-12
    clip_grad_norm: float = 1.0  # clip the gradient norm (0 = off); guards against rare close-encounter spikes
    lr_schedule: str = "constant"  # constant | cosine (cosine decay to lr_min over trainer.max_epochs)
    lr_min: float = 0.0
    init_from: str | None = None  # start from this dynamics checkpoint's weights (fresh optimizer), e.g. to fine-tune


@dataclass
class DynamicsConfig:
    data: DynamicsDataConfig = field(default_factory=DynamicsDataConfig)
    model: DynamicsModelConfig = field(default_factory=DynamicsModelConfig)
    optim: DynamicsOptimConfig = field(default_factory=DynamicsOptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        out_dir="runs/nbody_egnn", max_epochs=10000, ckpt_every_n_steps=3000, log_every_n_steps=30,
        sample_every_n_epochs=0))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _validate(cfg: DynamicsConfig) -> DynamicsConfig:
    d = cfg.data
    if d.dataset not in DATASETS:
        raise DiffgenError(f"unknown dataset {d.dataset!r}: choose {', '.join(DATASETS)}")
    if min(d.n_train, d.n_valid, d.n_test, d.batch_size) < 1:
        raise DiffgenError("data.n_train, data.n_valid, data.n_test and data.batch_size must be positive")
    if d.frame_in < 0 or d.frame_out < 0:
        raise DiffgenError(f"frames must be >= 0, got frame_in={d.frame_in}, frame_out={d.frame_out}")
    if d.dataset == "nbody":
        from diffgen.data.nbody import N_FRAMES

        for label, f in (("input", d.frame_in), ("target", d.frame_out)):
            if f >= N_FRAMES:
                raise DiffgenError(f"nbody: {label} frame {f} missing (trajectories have frames 0..{N_FRAMES - 1})")
    if d.dataset == "alanine_dipeptide":
        if d.md_valid_runs < 1 or d.md_test_runs < 1 or d.md_runs - d.md_valid_runs - d.md_test_runs < 1:
            raise DiffgenError(f"data.md_runs={d.md_runs} leaves no training run after {d.md_valid_runs} valid "
                               f"and {d.md_test_runs} test runs")
        if d.frame_out <= d.frame_in or d.frame_out - d.frame_in >= d.md_frames:
            raise DiffgenError(f"MD lag frame_out - frame_in must be in 1..{d.md_frames - 1}, "
                               f"got {d.frame_out - d.frame_in}")
    if d.frame_in == d.frame_out:
        raise DiffgenError("data.frame_in and data.frame_out must differ")
    if cfg.model.hidden < 1 or cfg.model.n_layers < 1:
        raise DiffgenError("model.hidden and model.n_layers must be >= 1")
    if cfg.optim.lr_schedule not in ("constant", "cosine"):
        raise DiffgenError(f"unknown optim.lr_schedule {cfg.optim.lr_schedule!r}: choose constant or cosine")
    if cfg.optim.init_from is not None and not Path(cfg.optim.init_from).is_file():
        raise DiffgenError(f"optim.init_from: checkpoint not found: {cfg.optim.init_from}")
    m = cfg.model
    if m.pool_clusters < 0:
        raise DiffgenError(f"model.pool_clusters must be >= 0 (0 = no pooling), got {m.pool_clusters}")
    if m.pool_clusters and m.pool_layers < 1:
        raise DiffgenError(f"model.pool_layers must be >= 1 with pooling, got {m.pool_layers}")
    if m.vector_channels < 0:
        raise DiffgenError(f"model.vector_channels must be >= 0, got {m.vector_channels}")
    if m.vector_channels and not m.use_velocity:
        raise DiffgenError("model.vector_channels needs model.use_velocity=true")
    if m.pool_reg_weight < 0:
        raise DiffgenError(f"model.pool_reg_weight must be >= 0, got {m.pool_reg_weight}")
    if cfg.optim.lr <= 0:
        raise DiffgenError(f"optim.lr must be positive, got {cfg.optim.lr}")
    return cfg


def dynamics_config_from_dict(values: dict | None) -> DynamicsConfig:
    """Build and validate a :class:`DynamicsConfig` from a (possibly partial) nested dict."""
    cfg = DynamicsConfig()
    _update(cfg, values or {})
    return _validate(cfg)


def load_dynamics_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DynamicsConfig:
    """Load a YAML config (defaults if ``path`` is None) and apply ``section.key=value`` overrides.

    Raises:
        DiffgenError: unreadable file, invalid YAML, unknown key, wrongly typed or invalid value.
    """
    return dynamics_config_from_dict(read_config_values(path, overrides))
