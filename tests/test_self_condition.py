"""Self-conditioning (diffusion.self_condition; Chen et al. 2022, Analog Bits): equivariance with the x0 estimate as
input, the training coin flip, the samplers feeding each step the previous estimate, and the config rules."""
from __future__ import annotations

import pytest
import torch
from equivariance import assert_e3_equivariant
from torch import nn

from diffgen.diffusion.samplers import ancestral_sample, sde_dpm_solver_sample
from diffgen.diffusion.vp import remove_mean
from diffgen.errors import DiffgenError
from diffgen.tasks.generation.build import build_diffusion
from diffgen.tasks.generation.config import load_generation_config

F64 = torch.float64
TINY = ["model.hidden=16", "model.n_layers=2", "diffusion.parameterization=x0", "diffusion.self_condition=true"]


def _diffusion(*extra: str):
    torch.manual_seed(0)
    diff = build_diffusion(load_generation_config(None, [*TINY, *extra])).double().eval()
    for layer in diff.denoiser.backbone.layers:  # coordinate and vector outputs large enough to test
        nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.5)
        if layer.update.vector_channels:
            nn.init.normal_(layer.update.vec_edge.weight, std=0.5)
    return diff


@pytest.mark.parametrize("extra", [(), ("model.vector_channels=2",)])
def test_self_conditioned_eps_is_e3_equivariant(extra):
    """eps_hat with an x0 estimate as input: position noise rotates and reflects with z_t and the estimate, type
    noise is invariant, atoms permute within molecules; the estimate changes the output."""
    diff = _diffusion(*extra)
    g = torch.Generator().manual_seed(0)
    batch = torch.tensor([0] * 5 + [1] * 7)
    pos = remove_mean(torch.randn(12, 3, dtype=F64, generator=g), batch)
    h = torch.randn(12, 6, dtype=F64, generator=g)
    pos_c = remove_mean(pos + 0.3 * torch.randn(12, 3, dtype=F64, generator=g), batch)
    h_c = torch.randn(12, 6, dtype=F64, generator=g)
    t = torch.tensor([0.3, 0.8], dtype=F64)

    def fn(pos, h, t, batch, pos_c, h_c):
        return diff.predict_eps(pos, h, t, batch, cond=(pos_c, h_c))

    inputs = [("pos", pos), ("scalar", h), ("global", t), ("scalar", batch), ("pos", pos_c), ("scalar", h_c)]
    with torch.no_grad():
        e_pos, e_h = assert_e3_equivariant(fn, inputs, ["vec", "scalar"], batch=batch, translate=False)
        e_pos0, _ = diff.predict_eps(pos, h, t, batch)
        shifted = diff.predict_eps(pos, h, t, batch, cond=(pos_c + torch.tensor([1.0, -2.0, 3.0], dtype=F64), h_c))
    assert e_pos.abs().mean() > 0.05
    assert (e_pos - e_pos0).abs().max() > 1e-3
    torch.testing.assert_close(shifted[0], e_pos, atol=1e-9, rtol=1e-9)  # only the estimate's shape counts


def test_training_conditions_about_half_of_the_batches_on_the_models_own_estimate():
    """loss(): the denoiser runs twice (a no-gradient pass, then the conditioned one) for about half of the calls;
    gradients reach the weights; the estimate passed is x0_from_eps of the first pass."""
    diff = _diffusion().float().train()
    calls = []
    original = diff.denoiser.forward

    def spy(pos_t, h_t, t, batch, edge_index=None, cond=None):
        out = original(pos_t, h_t, t, batch, edge_index, cond)
        calls.append((cond, pos_t, h_t, t, out))
        return out

    diff.denoiser.forward = spy
    pos, z, batch = torch.randn(6, 3), torch.tensor([6, 1, 1, 1, 1, 8]), torch.zeros(6, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    doubled = 0
    for _ in range(40):
        calls.clear()
        loss = diff.loss(pos, z, batch, generator=gen)
        assert len(calls) in (1, 2) and calls[0][0] is None
        if len(calls) == 2:
            doubled += 1
            _, pos_t, h_t, t, (out_pos, out_h) = calls[0]
            with torch.no_grad():
                e_pos, e_h = diff.predict_eps(pos_t, h_t, t, batch)
                want = diff.x0_from_eps(pos_t, h_t, t, batch, e_pos, e_h)
            torch.testing.assert_close(calls[1][0][0], want[0])
            torch.testing.assert_close(calls[1][0][1], want[1])
    assert 10 <= doubled <= 30
    loss.backward()
    assert all(p.grad is not None for p in diff.parameters() if p.requires_grad)


@pytest.mark.parametrize("sampler", [ancestral_sample, sde_dpm_solver_sample])
def test_samplers_feed_each_step_the_previous_x0_estimate(sampler):
    """First step: no estimate; every later step: the x0 computed from the previous step's eps."""
    diff = _diffusion().float()
    seen = []
    original = diff.predict_eps

    def spy(pos, h, t, batch, edge_index=None, cond=None):
        eps = original(pos, h, t, batch, edge_index, cond)
        seen.append((cond, diff.x0_from_eps(pos, h, t, batch, *eps)))
        return eps

    diff.predict_eps = spy
    out = sampler(diff, torch.tensor([4, 6]), steps=5, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 5 and seen[0][0] is None
    for (_, x0_prev), (cond, _) in zip(seen[:-1], seen[1:]):
        torch.testing.assert_close(cond[0], x0_prev[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond[1], x0_prev[1], atol=1e-5, rtol=1e-5)
    assert out.pos.shape == (10, 3) and torch.isfinite(out.pos).all()


def test_self_condition_config_rules():
    with pytest.raises(DiffgenError, match="diffusion.self_condition"):
        load_generation_config(None, ["diffusion.parameterization=eps", "diffusion.self_condition=true"])
    with pytest.raises(DiffgenError, match="diffusion.self_condition"):
        load_generation_config(None, ["diffusion.parameterization=x0", "diffusion.self_condition=true",
                                      "model.backbone=e3transformer"])
    diff = build_diffusion(load_generation_config(None, TINY))
    with pytest.raises(ValueError, match="self_condition"):
        build_diffusion(load_generation_config(None, TINY[:3])).denoiser(
            torch.zeros(2, 3), torch.zeros(2, 6), torch.zeros(1), torch.zeros(2, dtype=torch.long),
            cond=(torch.zeros(2, 3), torch.zeros(2, 6)))
    assert diff.self_condition and diff.denoiser.backbone.in_dim == 13 and diff.denoiser.backbone.edge_dim == 1


def test_validation_loss_is_the_same_every_epoch(qm9_batch, monkeypatch):
    """validation_step draws its times, noise and self-conditioning coin from seeded generators: the same weights
    give the same val/loss (and val/eps_mse) twice, whatever the global RNG did in between."""
    from diffgen.tasks.generation.module import GenerationTask

    task = GenerationTask(load_generation_config(None, [*TINY, "diffusion.loss_weight=min_snr"]).to_dict(), [0] * 29 + [1])
    logged = []
    monkeypatch.setattr(task, "log", lambda name, value, **kw: logged.append((name, float(value))))
    for _ in range(2):
        for idx in range(4):  # several batch indices: both sides of the coin are taken
            task.validation_step(qm9_batch, idx)
        torch.rand(1000)  # global RNG moves between epochs
    assert len(logged) == 16 and {name for name, _ in logged} == {"val/loss", "val/eps_mse"}
    assert logged[:8] == logged[8:]
    assert len({v for _, v in logged[:8]}) > 2  # the batch index changes the draw
