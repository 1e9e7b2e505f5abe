"""Typed configuration of dynamics prediction (``diffgen/configs/nbody_egnn.yaml``).

Built with the one mechanism of :mod:`diffgen.config` (YAML + ``section.key=value`` overrides, choices as
``Literal``, bounds on the fields, one-line :class:`~diffgen.errors.DiffgenError`); the trainer section is the
shared :class:`~diffgen.config.TrainerConfig`. Defaults follow the N-body protocol of Satorras et al. 2021
(EGNN, Sec. 5.1): 3,000/2,000/2,000 trajectories, frame 30 -> 40, velocity-aware EGNN 4 layers x 64,
MSE loss, Adam lr 5e-4, batch 100.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from diffgen.config import (
    BackboneConfig, ConfigRoot, TrainerConfig, bounded, build_config, drop_legacy_keys, load_config,
)
from diffgen.data.md import MDSettings
from diffgen.errors import DiffgenError

Dataset = Literal["nbody", "alanine_dipeptide"]
DATASETS = get_args(Dataset)


@dataclass
class DynamicsDataConfig:
    dataset: Dataset = "nbody"
    root: str | None = None  # cache root; None -> $DIFFGEN_CACHE or ~/.cache/diffgen
    n_train: int = bounded(3000, ge=1)
    n_valid: int = bounded(2000, ge=1)
    n_test: int = bounded(2000, ge=1)
    frame_in: int = bounded(30, ge=0)
    frame_out: int = bounded(40, ge=0)
    seed_offset: int = 0  # 0 = the benchmark's data seeds
    batch_size: int = bounded(100, ge=1)
    num_workers: int = bounded(0, ge=0)
    # alanine_dipeptide (OpenMM, diffgen.data.md): runs split by trajectory, pairs (t, t + frame_out - frame_in)
    md_runs: int = bounded(MDSettings.n_runs, ge=1)  # simulation defaults live in one place: diffgen.data.md.MDSettings
    md_frames: int = bounded(MDSettings.n_frames, ge=2)
    md_frame_ps: float = bounded(MDSettings.frame_ps, gt=0)
    md_seed: int = MDSettings.seed
    md_valid_runs: int = bounded(2, ge=1)
    md_test_runs: int = bounded(2, ge=1)


@dataclass
class DynamicsModelConfig(BackboneConfig):
    hidden: int = bounded(64, ge=1)
    n_layers: int = bounded(4, ge=1)
    attention: bool = False
    coords_range: float = bounded(10.0, gt=0)
    use_velocity: bool = True  # False: flat EGNN (positions only)
    use_charges: bool = True
    vel_init: float = 1.0  # initial velocity scale: 1 = constant-velocity guess x + v, 0 = identity
    # C equivariant vector channels per node, initialised [v, 0, ...] and updated in every layer, with their pairwise
    # invariants as edge features (diffgen.models.egnn.EGNN vector_channels); 0 = EGNN's eq. 7 model exactly
    vector_channels: int = bounded(0, ge=0)
    n_types: int = bounded(0, ge=0)  # one-hot atom types appended to |v| (4 for alanine dipeptide: H, C, N, O)
    # EGHN hierarchy block (Han et al. 2022; diffgen.models.eghn): K soft clusters per system, 0 = off (flat model)
    pool_clusters: int = bounded(0, ge=0)
    pool_layers: int = bounded(2, ge=1)  # layers of the cluster EGNN
    pool_reg_weight: float = bounded(0.01, ge=0)  # weight of the assignment regulariser (crispness + balance) in the training loss


@dataclass
class DynamicsOptimConfig:
    lr: float = bounded(5.0e-4, gt=0)
    weight_decay: float = bounded(1.0e-12, ge=0)
    clip_grad_norm: float = bounded(1.0, ge=0)  # clip the gradient norm (0 = off); guards against rare close-encounter spikes
    lr_schedule: Literal["constant", "cosine"] = "constant"  # (cosine decay to lr_min over trainer.max_epochs)
    lr_min: float = bounded(0.0, ge=0)
    init_from: str | None = None  # start from this dynamics checkpoint's weights (fresh optimizer), e.g. to fine-tune


@dataclass
class DynamicsConfig(ConfigRoot):
    data: DynamicsDataConfig = field(default_factory=DynamicsDataConfig)
    model: DynamicsModelConfig = field(default_factory=DynamicsModelConfig)
    optim: DynamicsOptimConfig = field(default_factory=DynamicsOptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        out_dir="runs/nbody_egnn", max_epochs=10000, ckpt_every_n_steps=3000, log_every_n_steps=30))

    def check(self) -> None:
        """Cross-field rules (field types, choices and bounds are checked by :func:`diffgen.config.build_config`)."""
        d = self.data
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
        if self.model.vector_channels and not self.model.use_velocity:
            raise DiffgenError("model.vector_channels needs model.use_velocity=true")
        if self.model.backbone != "egnn":
            for key in ("vector_channels", "pool_clusters"):  # EGNN-only parts: the transformer has l_channels
                if getattr(self.model, key):
                    raise DiffgenError(f"config key model.{key} needs model.backbone=egnn "
                                       f"(got {self.model.backbone})")
        if self.optim.lr_schedule == "cosine" and self.trainer.max_epochs < 1:
            raise DiffgenError("optim.lr_schedule=cosine decays over trainer.max_epochs: set it to >= 1")


def dynamics_config_from_dict(values: dict | None) -> DynamicsConfig:
    """Build and validate a :class:`DynamicsConfig` from a (possibly partial) nested dict, e.g. a checkpoint's.

    Raises:
        DiffgenError: unknown key, wrong type, out-of-bounds value, unknown choice or inconsistent frames (one line).
    """
    return build_config(DynamicsConfig, drop_legacy_keys(values))


def load_dynamics_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DynamicsConfig:
    """Load a config for training: YAML (defaults if ``path`` is None) + overrides; ``optim.init_from`` must exist.

    Raises:
        DiffgenError: unreadable file, invalid YAML, unknown key, wrongly typed or invalid value, missing init file.
    """
    cfg = load_config(DynamicsConfig, path, overrides)
    if cfg.optim.init_from is not None and not Path(cfg.optim.init_from).is_file():
        raise DiffgenError(f"optim.init_from: checkpoint not found: {cfg.optim.init_from}")
    return cfg
