"""Noise schedules of the variance-preserving diffusion, as ``gamma(t) = -log SNR(t)``.

Conventions (Kingma et al. 2021 "Variational Diffusion Models"; Hoogeboom et al. 2022 EDM):
``t`` is continuous in [0, 1] (t = 0 data, t = 1 noise),
``alpha_t^2 = sigmoid(-gamma_t)``, ``sigma_t^2 = sigmoid(gamma_t)``, so ``alpha^2 + sigma^2 = 1``
and ``log_snr = -gamma``.

Both schedules are tabulated on ``T + 1`` points like EDM's discrete schedules and
linearly interpolated in ``t`` in between, so any number of sampling steps works.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def _clip_and_shift(alpha2: np.ndarray, s: float, clip_min: float = 0.001) -> np.ndarray:
    """EDM's stabilisation: clip ``alpha^2_t / alpha^2_{t-1}`` below at ``clip_min``, then
    ``alpha^2 <- (1 - 2s) alpha^2 + s`` so that neither end is exactly 0 or 1."""
    alpha2 = np.concatenate([[1.0], alpha2])
    ratio = np.clip(alpha2[1:] / alpha2[:-1], clip_min, 1.0)
    alpha2 = np.cumprod(ratio)
    return (1 - 2 * s) * alpha2 + s


def polynomial_alpha2(T: int = 1000, power: float = 2.0, s: float = 1e-5) -> np.ndarray:
    """EDM "polynomial_2": ``alpha^2(t) = (1 - (t/T)^power)^2`` at t = 0..T (EDM eq. in App. B)."""
    x = np.linspace(0.0, 1.0, T + 1)
    return _clip_and_shift((1 - x ** power) ** 2, s)


def cosine_alpha2(T: int = 1000, s_offset: float = 0.008, s: float = 1e-5) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ``alpha^2(t) = cos^2(((t/T + o)/(1 + o)) pi/2) / cos^2(...)|_0``."""
    x = np.linspace(0.0, 1.0, T + 1)
    f = np.cos((x + s_offset) / (1 + s_offset) * math.pi / 2) ** 2
    return _clip_and_shift(f / f[0], s)


class NoiseSchedule(nn.Module):
    """Tabulated ``gamma(t)`` with linear interpolation; ``t`` is a tensor in [0, 1] of any shape.

    Args:
        kind: ``"polynomial"`` (EDM polynomial_2, default) or ``"cosine"``.
        T: number of table intervals (EDM: 1000).
        s: precision shift (EDM: 1e-5).
        power: exponent of the polynomial schedule.

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(self, kind: str = "polynomial", T: int = 1000, s: float = 1e-5, power: float = 2.0):
        super().__init__()
        if kind == "polynomial":
            alpha2 = polynomial_alpha2(T, power, s)
        elif kind == "cosine":
            alpha2 = cosine_alpha2(T, s=s)
        else:
            raise ValueError(f"unknown noise schedule {kind!r}: choose polynomial or cosine")
        self.kind, self.T = kind, T
        gamma = -(np.log(alpha2) - np.log1p(-alpha2))
        self.register_buffer("table", torch.tensor(gamma, dtype=torch.float64), persistent=False)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """``gamma(t) = -log(alpha_t^2 / sigma_t^2)``, increasing in t; same shape and dtype as ``t``."""
        u = t.double().clamp(0.0, 1.0) * self.T
        lo = u.floor().clamp(max=self.T - 1)
        w = u - lo
        lo = lo.long()
        g = self.table[lo] * (1 - w) + self.table[lo + 1] * w
        return g.to(t.dtype)

    forward = gamma

    def t_of_gamma(self, gamma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gamma` (the table is strictly increasing): ``t`` in [0, 1], same shape as ``gamma``."""
        g = gamma.double().clamp(float(self.table[0]), float(self.table[-1]))
        hi = torch.searchsorted(self.table, g.reshape(-1)).clamp(1, self.T).reshape(g.shape)
        lo = hi - 1
        w = (g - self.table[lo]) / (self.table[hi] - self.table[lo])
        return ((lo + w) / self.T).to(gamma.dtype)


def alpha(gamma: torch.Tensor) -> torch.Tensor:
    """``alpha_t = sqrt(sigmoid(-gamma_t))``."""
    return torch.sigmoid(-gamma).sqrt()


def sigma(gamma: torch.Tensor) -> torch.Tensor:
    """``sigma_t = sqrt(sigmoid(gamma_t))``."""
    return torch.sigmoid(gamma).sqrt()
