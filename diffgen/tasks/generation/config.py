"""Configuration of the generator (``diffgen/configs/qm9_egnn.yaml``): EDM on QM9 (Hoogeboom et al. 2022, App. B).

Built with the one mechanism of :mod:`diffgen.config` (YAML + ``section.key=value`` overrides, choices as
``Literal``, bounds on the fields, one-line :class:`~diffgen.errors.DiffgenError`). Defaults are EDM's
published model (9 x 256 EGNN, eps-prediction, polynomial schedule, T = 1000); the shipped config changes
them as its comments say.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from diffgen.config import BackboneConfig, ConfigRoot, GraphKind, TrainerConfig, bounded, build_config, load_config
from diffgen.errors import DiffgenError
from diffgen.tasks.lr_schedule import lr_factor


@dataclass
class DataConfig:
    root: str | None = None  # cache folder; None -> $DIFFGEN_CACHE or ~/.cache/diffgen
    remove_h: bool = False
    batch_size: int = bounded(64, ge=1)
    num_workers: int = bounded(0, ge=0)
    subset: Literal["half0", "half1"] | None = None  # EDM conditional-generation halves of the train split
    # pyg: PyG DataLoader over the QM9 cache; resident: the splits as flat tensors on the training device, batches
    # built by indexing (diffgen.data.packed). packed: a packed file (diffgen pack-qm9) to train from instead of
    # the QM9 cache (no qm9pack/RDKit needed; implies resident)
    loader: Literal["pyg", "resident"] = "pyg"
    packed: str | None = None

    def check(self) -> None:
        if (self.loader == "resident" or self.packed) and (self.subset or self.num_workers):
            raise DiffgenError("data.subset and data.num_workers need data.loader=pyg without data.packed")
        if self.packed and self.remove_h:
            raise DiffgenError("data.remove_h cannot apply to a packed file (it stores what it was packed with)")


@dataclass
class ModelConfig(BackboneConfig):
    coords_range: float = bounded(15.0, gt=0)
    graph: GraphKind = "full"
    cutoff: float | None = bounded(None, gt=0)
    k: int | None = bounded(None, ge=1)
    # EGNN only: C equivariant vector channels per atom, started at zero (with self-conditioning: channel 0 at
    # pos_cond - pos_t) and updated by every layer from the atoms' relative positions and their neighbours' vectors
    # (diffgen.models.egnn.EGNN vector_channels); 0 = EDM
    vector_channels: int = bounded(0, ge=0)

    def check(self) -> None:
        super().check()
        if self.vector_channels and self.backbone != "egnn":
            raise DiffgenError("config key model.vector_channels needs model.backbone=egnn (the e3transformer "
                               "carries vectors in model.l_channels)")
        if self.graph == "radius" and self.cutoff is None:
            raise DiffgenError("config key model.cutoff is needed with model.graph=radius")
        if self.graph == "knn" and self.k is None:
            raise DiffgenError("config key model.k is needed with model.graph=knn")


@dataclass
class DiffusionConfig:
    schedule: Literal["polynomial", "cosine"] = "polynomial"
    T: int = bounded(1000, ge=1)
    s: float = bounded(1.0e-5, gt=0, le=0.5)
    parameterization: Literal["eps", "x0"] = "eps"  # eps (EDM) | x0
    loss_weight: Literal["uniform", "min_snr"] = "uniform"  # uniform (EDM) | min_snr (Hang et al. 2023)
    min_snr: float = bounded(5.0, gt=0)
    t_sampling: Literal["uniform", "low_noise"] = "uniform"  # training t: U(0, 1) (EDM) | Beta(1, 2), toward t = 0
    # types: mse (EDM: part of the Gaussian eps-MSE) | ce (x0 only: cross-entropy on x0 type logits, x type_weight)
    type_loss: Literal["mse", "ce"] = "mse"
    type_weight: float = bounded(1.0, ge=0)
    # self-conditioning on the previous x0 estimate (Chen et al. 2022, Analog Bits; x0 and EGNN only)
    self_condition: bool = False

    def check(self) -> None:
        if self.type_loss == "ce" and self.parameterization != "x0":
            raise DiffgenError("config key diffusion.type_loss=ce needs diffusion.parameterization=x0")
        if self.type_loss == "mse" and self.type_weight != 1.0:
            raise DiffgenError("config key diffusion.type_weight applies to diffusion.type_loss=ce only")
        if self.self_condition and self.parameterization != "x0":
            raise DiffgenError("config key diffusion.self_condition=true needs diffusion.parameterization=x0")


@dataclass
class OptimConfig:
    lr: float = bounded(1.0e-4, gt=0)
    weight_decay: float = bounded(1.0e-12, ge=0)
    ema_decay: float = bounded(0.999, ge=0, le=1)
    clip_adaptive: bool = True  # EDM: clip at 1.5 x mean + 2 x std of recent gradient norms
    clip_value: float = bounded(1.0, ge=0)  # fixed clip value used when clip_adaptive is False (0 = off)
    warmup_steps: int = bounded(0, ge=0)  # linear learning-rate warm-up from 0 over this many steps (0 = off)
    # after the warm-up: constant lr (none), or a decay over decay_steps steps to lr_min, then held there. A
    # "cooldown" of a constant-lr run (warmup-stable-decay; Hagele et al. 2024, arXiv:2405.18392): a branch of the
    # long run started with init_from decays while the run itself goes on at constant lr
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    decay_steps: int = bounded(0, ge=0)
    lr_min: float = bounded(0.0, ge=0)
    init_from: str | None = None  # start from these generator weights (.safetensors/.ckpt, fresh optimizer) unless resuming

    def check(self) -> None:
        if self.lr_decay == "none" and (self.decay_steps or self.lr_min):
            raise DiffgenError("config keys optim.decay_steps and optim.lr_min apply to optim.lr_decay=linear|cosine")
        if self.lr_decay != "none" and self.decay_steps < 1:
            raise DiffgenError(f"optim.lr_decay={self.lr_decay} needs optim.decay_steps >= 1")
        if self.lr_min > self.lr:
            raise DiffgenError(f"optim.lr_min={self.lr_min:g} is above optim.lr={self.lr:g}")

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier (of ``lr``) at 0-based optimizer step ``step`` of this run: the warm-up, then
        constant or the decay to ``lr_min / lr`` (:func:`diffgen.tasks.lr_schedule.lr_factor`)."""
        return lr_factor(step, self.warmup_steps, self.lr_decay, self.decay_steps, self.lr_min / self.lr)


@dataclass
class GenerationTrainerConfig(TrainerConfig):
    out_dir: str = "runs/qm9_egnn"
    sample_every_n_epochs: int = bounded(5, ge=0)  # periodic sampling metrics (0 = off)
    n_eval_samples: int = bounded(100, ge=0)
    eval_steps: int = bounded(100, ge=1)
    # torch.compile the denoiser backbone for training (inductor, dynamic shapes; needs a C++ compiler on the CPU).
    # Same function as eager (tests/test_training.py); +10-20 % molecules/s on the CPU (benchmarks/results/speedrun.md)
    compile: bool = False


@dataclass
class GenerationConfig(ConfigRoot):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: GenerationTrainerConfig = field(default_factory=GenerationTrainerConfig)

    def check(self) -> None:
        if self.diffusion.self_condition and self.model.backbone != "egnn":
            raise DiffgenError("config key diffusion.self_condition=true needs model.backbone=egnn")


def config_from_dict(values: dict | None) -> GenerationConfig:
    """Build and validate a :class:`GenerationConfig` from a (possibly partial) nested dict, e.g. a checkpoint's.

    Raises:
        DiffgenError: unknown key, wrong type, out-of-bounds value or unknown choice (one line).
    """
    return build_config(GenerationConfig, values)


def load_generation_config(path: str | Path | None = None, overrides: list[str] | None = None) -> GenerationConfig:
    """Load a generator config for training: YAML + overrides, validated, and ``optim.init_from`` must exist.

    Raises:
        DiffgenError: as :func:`config_from_dict`, or unreadable YAML, or a missing ``optim.init_from`` file.
    """
    cfg = load_config(GenerationConfig, path, overrides)
    if cfg.optim.init_from is not None and not Path(cfg.optim.init_from).is_file():
        raise DiffgenError(f"optim.init_from: checkpoint not found: {cfg.optim.init_from}")
    return cfg
