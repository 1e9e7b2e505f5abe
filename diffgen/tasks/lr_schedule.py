"""The learning-rate schedule of every task: linear warm-up, then constant or a linear / cosine decay to a floor.

Pure Python (no torch import), so configs can use :func:`lr_factor` without the training stack; the tasks' Lightning
modules wrap it with :func:`step_scheduler`.
"""
from __future__ import annotations

import math
from typing import Literal

Decay = Literal["none", "linear", "cosine"]


def lr_factor(step: int, warmup_steps: int = 0, decay: Decay = "none", decay_steps: int = 1,
              floor: float = 0.0) -> float:
    """Learning-rate multiplier at 0-based optimizer step ``step``.

    Linear warm-up from 0 over ``warmup_steps`` (``(step + 1) / warmup_steps``); then 1 (``decay="none"``), or over
    the next ``decay_steps`` steps a linear or cosine (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts)
    decay from 1 to ``floor``, held at ``floor`` afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none":
        return 1.0
    frac = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    shape = 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return floor + (1.0 - floor) * shape


def step_scheduler(optimizer, factor) -> dict:
    """Lightning's optimizer dict with a per-step ``LambdaLR`` of ``factor(step)``.

    Every task uses one, constant schedules included: the scheduler's step count is saved in the checkpoint and
    the factor is recomputed from the resumed run's config at every step, so a resume never keeps a stale lr from
    the optimizer state (without a scheduler, a run resumed mid-warm-up kept that step's warm-up lr for good). The
    base lr is the checkpoint's (``LambdaLR`` saves it): changing ``optim.lr`` on a resume does not take effect.
    """
    import torch

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
