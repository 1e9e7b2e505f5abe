"""The dynamics task (diffgen.tasks.dynamics): Lightning training step and the evaluation baselines."""
from __future__ import annotations

import pytest
import torch


def test_training_step_skips_non_finite_losses():
    """A non-finite loss must not reach the optimiser: ``training_step`` returns None, so Lightning runs neither the
    backward pass nor the optimiser step."""
    from diffgen.tasks.dynamics.module import DynamicsTask

    task = DynamicsTask({"model": {"hidden": 8, "n_layers": 1}})
    task.log = lambda *a, **k: None  # no trainer attached
    g = torch.Generator().manual_seed(0)
    pos, vel = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    q, types = torch.ones(2, 5), torch.zeros(2, 5, dtype=torch.long)
    good = (pos, vel, q, pos + 0.1, types)
    assert torch.isfinite(task.training_step(good, 0))
    bad = (pos, vel, q, torch.full_like(pos, float("nan")), types)
    assert task.training_step(bad, 0) is None


class _Shift(torch.nn.Module):
    """Predicts ``pos + tau * vel``: tau = 0 is the identity, the true tau is exact on linear motion."""

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    def forward(self, pos, vel, charges, types=None):
        return pos + self.tau * vel


def test_baselines_on_exactly_linear_motion():
    """Target ``x + tau v`` exactly: the constant-velocity baseline (tau fitted in closed form) has MSE 0, the identity
    baseline MSE ``mean((tau v)^2)``; a model's MSE is accumulated correctly over uneven batches."""
    from torch.utils.data import TensorDataset

    from diffgen.tasks.dynamics.common import evaluate_pairs

    g = torch.Generator().manual_seed(0)
    pos = 3.0 * torch.randn(7, 5, 3, generator=g, dtype=torch.float64)
    vel = torch.randn(7, 5, 3, generator=g, dtype=torch.float64)
    tau = 0.37
    target = pos + tau * vel
    data = TensorDataset(pos, vel, torch.ones(7, 5, dtype=torch.float64), target, torch.zeros(7, 5, dtype=torch.long))
    identity = float((tau * vel).pow(2).mean())
    assert identity > 0.05
    mse = evaluate_pairs(None, data)
    assert set(mse) == {"identity", "constant_velocity"}
    assert mse["constant_velocity"] < 1e-28
    assert mse["identity"] == pytest.approx(identity, rel=1e-12)
    assert evaluate_pairs(_Shift(tau), data, batch_size=3)["model"] < 1e-28  # batches of 3, 3 and 1 pairs
    assert evaluate_pairs(_Shift(0.0), data, batch_size=3)["model"] == pytest.approx(identity, rel=1e-12)
