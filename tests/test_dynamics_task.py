"""The dynamics task (diffgen.tasks.dynamics): Lightning training step and evaluation."""
from __future__ import annotations

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
