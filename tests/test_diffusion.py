"""The EDM diffusion: schedules, zero-CoM noise, type encoding, the denoiser, training signal and the sampler."""
from __future__ import annotations

import math

import pytest
import torch
from equivariance import assert_e3_equivariant
from torch import nn
from torch_geometric.utils import scatter

from diffgen.tasks.generation.config import config_from_dict
from diffgen.data.qm9 import node_count_histogram
from diffgen.diffusion.samplers import NodeCountDistribution, _posterior_step, ancestral_sample
from diffgen.diffusion.schedules import NoiseSchedule, alpha, sigma
from diffgen.data.elements import index_to_z, z_to_index
from diffgen.diffusion.vp import (N_FEATURES, Denoiser, VPDiffusion, com_free_noise, decode_types, encode_types,
                                  remove_mean)
from diffgen.errors import DiffgenError
from diffgen.models.egnn import EGNN
from diffgen.tasks.generation.build import build_diffusion, sample_molecules

F64 = torch.float64


def _batch(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def _com(pos, batch):
    return scatter(pos, batch, dim=0, reduce="mean")


def small_diffusion(seed=0, **model) -> VPDiffusion:
    torch.manual_seed(seed)
    cfg = config_from_dict({"model": {"hidden": 16, "n_layers": 2, "norm_factor": 10.0, **model}})
    return build_diffusion(cfg).eval()


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind", ["polynomial", "cosine"])
def test_schedule_alpha_sigma_identity(kind):
    sched = NoiseSchedule(kind)
    torch.manual_seed(0)
    t = torch.cat([torch.linspace(0, 1, 2001, dtype=F64), torch.rand(500, dtype=F64)])
    g = sched.gamma(t)
    a, s = alpha(g), sigma(g)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(t), atol=1e-12)
    assert torch.allclose(torch.log(a ** 2 / s ** 2), -g, atol=1e-8)  # gamma = -log SNR
    assert bool((a > 0).all() and (s > 0).all())


@pytest.mark.parametrize("kind", ["polynomial", "cosine"])
def test_schedule_gamma_strictly_increasing_and_bounded(kind):
    g = NoiseSchedule(kind).gamma(torch.linspace(0, 1, 10_001, dtype=F64))
    assert bool((g.diff() > 0).all())
    assert float(g[0]) == pytest.approx(-11.5, abs=0.3)
    assert float(g[-1]) == pytest.approx(11.5, abs=0.3)


def test_polynomial_gamma_ends():
    sched = NoiseSchedule("polynomial")
    g0, g1 = float(sched.gamma(torch.tensor(0.0, dtype=F64))), float(sched.gamma(torch.tensor(1.0, dtype=F64)))
    assert g0 == pytest.approx(-11.5, abs=0.3) and g1 == pytest.approx(11.5, abs=0.3)
    # at t = 0 alpha^2 = 1 - s exactly (s = 1e-5): gamma = log(s / (1 - s))
    assert g0 == pytest.approx(math.log(1e-5 / (1 - 1e-5)), abs=1e-6)


def _table_check(sched, alpha2_of_x):
    T = sched.T
    j = torch.arange(T, dtype=F64)  # all table points but the last (where EDM's clipping acts)
    a2 = alpha2_of_x(j / T)
    s = 1e-5
    a2 = (1 - 2 * s) * a2 + s
    expected = torch.log((1 - a2) / a2)
    assert torch.allclose(sched.gamma(j / T), expected, rtol=1e-6, atol=1e-6)
    # linear interpolation between table points
    mid = sched.gamma((j[:-1] + 0.5) / T)
    assert torch.allclose(mid, 0.5 * (expected[:-1] + expected[1:]), rtol=1e-6, atol=1e-6)


def test_polynomial_schedule_is_edm_polynomial_2():
    _table_check(NoiseSchedule("polynomial"), lambda x: (1 - x ** 2) ** 2)


def test_cosine_schedule_is_nichol_dhariwal():
    o = 0.008
    f = lambda x: torch.cos((x + o) / (1 + o) * math.pi / 2) ** 2  # noqa: E731
    _table_check(NoiseSchedule("cosine"), lambda x: f(x) / f(torch.zeros(1, dtype=F64)))


def test_schedule_shape_dtype_and_clamp():
    sched = NoiseSchedule()
    t = torch.rand(4, 5)
    g = sched.gamma(t)
    assert g.shape == (4, 5) and g.dtype == torch.float32
    assert torch.equal(sched(t), g)  # forward = gamma
    assert float(sched.gamma(torch.tensor(-0.3))) == float(sched.gamma(torch.tensor(0.0)))
    assert float(sched.gamma(torch.tensor(1.7))) == float(sched.gamma(torch.tensor(1.0)))


def test_unknown_schedule_raises():
    with pytest.raises(ValueError):
        NoiseSchedule("linear")


# ---------------------------------------------------------------- zero-CoM

def test_remove_mean_zero_com_per_graph():
    torch.manual_seed(0)
    sizes = [1, 3, 5, 29]
    batch = _batch(sizes)
    pos = torch.randn(batch.numel(), 3, dtype=F64) * 3 + torch.tensor([10.0, -4.0, 2.0], dtype=F64)
    out = remove_mean(pos, batch)
    assert torch.allclose(_com(out, batch), torch.zeros(len(sizes), 3, dtype=F64), atol=1e-12)
    assert torch.equal(out[0], torch.zeros(3, dtype=F64))  # single-atom graph
    # the change is one translation per graph (the negative CoM): internal geometry unchanged
    shift = out - pos
    first = torch.cumsum(torch.tensor(sizes), 0) - torch.tensor(sizes)
    assert torch.allclose(shift, shift[first][batch], atol=1e-12)
    assert torch.allclose(shift[first], -_com(pos, batch), atol=1e-12)


def test_com_free_noise():
    sizes = [10] * 500 + [1, 2]
    batch = _batch(sizes)
    g = torch.Generator().manual_seed(0)
    eps = com_free_noise(batch, g, dtype=F64)
    assert eps.shape == (batch.numel(), 3) and eps.dtype == F64
    assert torch.allclose(_com(eps, batch), torch.zeros(len(sizes), 3, dtype=F64), atol=1e-12)
    # projected standard normal: per-coordinate variance (n - 1) / n for n-atom graphs
    var = eps[:5000].pow(2).mean()
    assert float(var) == pytest.approx(0.9, abs=0.03)
    assert torch.equal(com_free_noise(batch, torch.Generator().manual_seed(0), dtype=F64), eps)
    assert not torch.equal(com_free_noise(batch, torch.Generator().manual_seed(1), dtype=F64), eps)


# ---------------------------------------------------------------- types

def test_encode_decode_round_trip_real(qm9_train, qm9_batch):
    for z in (qm9_batch.z, qm9_train.z):
        h = encode_types(z)
        assert h.shape == (z.numel(), N_FEATURES)
        assert torch.equal(decode_types(h), z)
    h = encode_types(qm9_batch.z)
    assert torch.allclose(h[:, :5].sum(-1), torch.full((h.shape[0],), 0.25))  # one-hot / 4
    assert torch.allclose(h[:, 5], qm9_batch.z.float() / 10)  # Z / 10
    # the one-hot column follows H, C, N, O, F
    assert torch.equal(h[:, :5].argmax(-1), torch.tensor([0, 1, 2, 3, 4])[
        torch.searchsorted(torch.tensor([1, 6, 7, 8, 9]), qm9_batch.z)])


def test_encode_rejects_unknown_elements():
    for z in ([6, 2], [17], [0]):
        with pytest.raises(DiffgenError):
            encode_types(torch.tensor(z))


# ---------------------------------------------------------------- denoiser

def _double_denoiser(graph="full", cutoff=None, k=None, seed=0):
    torch.manual_seed(seed)
    backbone = EGNN(N_FEATURES + 1, hidden=24, out_dim=N_FEATURES, n_layers=2).double()
    for layer in backbone.layers:  # make the coordinate output large enough to test
        nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.5)
    return Denoiser(backbone, graph=graph, cutoff=cutoff, k=k).eval()


@pytest.mark.parametrize("graph,cutoff,k", [("full", None, None), ("radius", 2.5, None), ("knn", None, 5)])
def test_denoiser_zero_com_and_equivariant(qm9_batch, graph, cutoff, k):
    den = _double_denoiser(graph, cutoff, k)
    batch = qm9_batch.batch
    B = qm9_batch.num_graphs
    torch.manual_seed(1)
    pos_t = qm9_batch.pos.double() + 0.3 * torch.randn(batch.numel(), 3, dtype=F64)
    h_t = encode_types(qm9_batch.z).double() + 0.3 * torch.randn(batch.numel(), N_FEATURES, dtype=F64)
    t = torch.rand(B, dtype=F64)
    # position noise rotates but does not translate; type noise is invariant; atoms permuted within molecules
    eps_pos, eps_h = assert_e3_equivariant(den, [("pos", pos_t), ("scalar", h_t), ("global", t), ("scalar", batch)],
                                           ["vec", "scalar"], batch=batch)
    assert eps_pos.shape == pos_t.shape and eps_h.shape == h_t.shape
    assert torch.allclose(_com(eps_pos, batch), torch.zeros(B, 3, dtype=F64), atol=1e-10)
    assert eps_pos.abs().mean() > 0.05
    # control: the backbone's raw displacement is not zero-CoM, so the projection does work
    from diffgen.data.graphs import build_edges
    ei = build_edges(pos_t, batch, graph, cutoff, k)
    _, pos_out = den.backbone(torch.cat([h_t, t[batch, None]], -1), pos_t, ei)
    assert _com(pos_out - pos_t, batch).abs().max() > 1e-3
    # time is an input: changing t changes the prediction
    e_pos3, e_h3 = den(pos_t, h_t, 1 - t, batch)
    assert (e_h3 - eps_h).abs().max() > 1e-4


# ---------------------------------------------------------------- forward process and training

def test_noise_uses_each_molecules_time(qm9_batch):
    diff = small_diffusion()
    batch = qm9_batch.batch
    B = qm9_batch.num_graphs
    pos = remove_mean(qm9_batch.pos, batch)
    h = encode_types(qm9_batch.z)
    t = torch.linspace(0, 1, B)
    pos_t, h_t, eps_pos, eps_h = diff.noise(pos, h, t, batch, torch.Generator().manual_seed(0))
    assert torch.allclose(_com(eps_pos, batch), torch.zeros(B, 3), atol=1e-5)
    assert torch.allclose(_com(pos_t, batch), torch.zeros(B, 3), atol=1e-5)
    first, last = batch == 0, batch == B - 1
    assert torch.allclose(pos_t[first], pos[first], atol=0.02) and torch.allclose(h_t[first], h[first], atol=0.02)
    assert torch.allclose(pos_t[last], eps_pos[last], atol=0.02) and torch.allclose(h_t[last], eps_h[last], atol=0.02)
    g = diff.gamma(t)[batch, None]
    assert torch.allclose(pos_t, alpha(g) * pos + sigma(g) * eps_pos, atol=1e-5)
    assert torch.allclose(h_t, alpha(g) * h + sigma(g) * eps_h, atol=1e-5)


def test_loss_and_one_optimizer_step(qm9_batch):
    diff = small_diffusion().train()
    loss = diff.loss(qm9_batch.pos, qm9_batch.z, qm9_batch.batch, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    before = [p.detach().clone() for p in diff.parameters()]
    opt = torch.optim.Adam(diff.parameters(), lr=1e-3)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad for p in diff.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, diff.parameters())]
    assert sum(changed) >= 0.9 * len(changed)


def test_loss_translation_invariant_and_reproducible(qm9_batch):
    diff = small_diffusion()
    b = qm9_batch
    t = torch.rand(b.num_graphs, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        l1 = diff.loss(b.pos, b.z, b.batch, t=t, generator=torch.Generator().manual_seed(0))
        l2 = diff.loss(b.pos + torch.tensor([5.0, -2.0, 1.0]), b.z, b.batch, t=t,
                       generator=torch.Generator().manual_seed(0))
        l3 = diff.loss(b.pos, b.z, b.batch, t=t, generator=torch.Generator().manual_seed(1))
    assert float(l2) == pytest.approx(float(l1), rel=1e-4)
    assert float(l3) != pytest.approx(float(l1), rel=1e-4)


def test_training_lowers_loss_on_fixed_batch(qm9_batch):
    """A real learning check: Adam on one batch with fixed t and noise must fit it."""
    diff = small_diffusion(hidden=32).train()
    b = qm9_batch
    t = torch.full((b.num_graphs,), 0.5)
    opt = torch.optim.Adam(diff.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = diff.loss(b.pos, b.z, b.batch, t=t, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])


# ---------------------------------------------------------------- sampler

def test_posterior_step_matches_closed_form():
    """q(z_s | z_t, x) of VDM eqs. 26-27 with x recovered from the true eps."""
    sched = NoiseSchedule()
    torch.manual_seed(0)
    x = torch.randn(40, 6, dtype=F64)
    eps = torch.randn(40, 6, dtype=F64)
    for t, s in ((1.0, 0.9), (0.5, 0.49), (0.3, 0.05), (0.01, 0.0)):
        gt, gs = sched.gamma(torch.tensor(t, dtype=F64)), sched.gamma(torch.tensor(s, dtype=F64))
        a_t, s_t, a_s, s_s = alpha(gt), sigma(gt), alpha(gs), sigma(gs)
        z_t = a_t * x + s_t * eps
        mean, std = _posterior_step(z_t, eps, gt, gs)
        a_ts = a_t / a_s
        s2_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
        mu = a_ts * s_s ** 2 / s_t ** 2 * z_t + a_s * s2_ts / s_t ** 2 * x
        assert torch.allclose(mean, mu, atol=1e-8), (t, s)
        assert float(std) == pytest.approx(float((s2_ts * s_s ** 2 / s_t ** 2).sqrt()), rel=1e-8)


class _OracleBackbone(nn.Module):
    """Knows the data point (x*, h*): returns the exact eps of z_t, and records the sampler's states."""

    def __init__(self, gamma, x_star, h_star):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # ancestral_sample reads the device from a parameter
        self.gamma, self.x_star, self.h_star = gamma, x_star, h_star
        self.record = []

    def forward(self, h_in, pos, edge_index):
        h_t, t = h_in[:, :-1].double(), h_in[:, -1].double()
        self.record.append((float(t[0]), h_t.clone(), pos.double().clone()))
        g = self.gamma(t)[:, None]
        eps_h = (h_t - alpha(g) * self.h_star) / sigma(g)
        eps_pos = (pos.double() - alpha(g) * self.x_star) / sigma(g)
        return eps_h.float(), (pos.double() + eps_pos).float()


def test_ancestral_sampler_marginals_with_oracle_denoiser():
    """With the exact eps, every state of the chain must be distributed as q(z_t | x*)."""
    n_mol, steps = 1000, 8
    tri = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 0.8, 0.0], [-0.5, -0.8, 0.0]], dtype=F64)  # zero CoM
    x_star = tri.repeat(n_mol, 1)
    z_star = torch.tensor([6, 8, 1]).repeat(n_mol)
    h_star = encode_types(z_star).double()
    sched = NoiseSchedule()
    oracle = _OracleBackbone(sched.gamma, x_star, h_star)
    diff = VPDiffusion(Denoiser(oracle), sched)
    out = ancestral_sample(diff, torch.full((n_mol,), 3), steps=steps, generator=torch.Generator().manual_seed(0))
    assert [round(r[0], 6) for r in oracle.record] == [round(1 - i / steps, 6) for i in range(steps)]
    for t, h_t, pos_t in oracle.record:
        g = sched.gamma(torch.tensor(t, dtype=F64))
        r_h = (h_t - alpha(g) * h_star) / sigma(g)
        assert abs(float(r_h.mean())) < 0.03, t
        assert float(r_h.std()) == pytest.approx(1.0, abs=0.03), t
        r_pos = (pos_t - alpha(g) * x_star) / sigma(g)
        assert abs(float(r_pos.mean())) < 0.03, t
        assert float(r_pos.std()) == pytest.approx(math.sqrt(2 / 3), abs=0.03), t  # zero-CoM, n = 3
    assert torch.equal(out.z, z_star)
    assert torch.allclose(out.pos.double(), x_star, atol=1e-3)


def test_ancestral_sample_outputs():
    diff = small_diffusion()
    n_atoms = [3, 7, 12]
    calls = []
    out = ancestral_sample(diff, torch.tensor(n_atoms), steps=5, generator=torch.Generator().manual_seed(0),
                           progress=calls.append)
    assert calls == [1] * 5
    assert out.pos.shape == (22, 3) and out.z.shape == (22,)
    assert out.n_atoms.tolist() == n_atoms
    assert torch.bincount(out.batch).tolist() == n_atoms
    assert torch.isfinite(out.pos).all()
    assert torch.allclose(_com(out.pos, out.batch), torch.zeros(3, 3), atol=1e-4)
    assert set(out.z.tolist()) <= {1, 6, 7, 8, 9}
    mols = out.molecules()
    assert [(z.numel(), p.shape) for z, p in mols] == [(n, (n, 3)) for n in n_atoms]


@pytest.mark.parametrize("steps", [1, 5])
def test_ancestral_sample_steps_and_determinism(steps):
    diff = small_diffusion()
    n_atoms = torch.tensor([3, 7, 12])

    def draw(seed):
        return ancestral_sample(diff, n_atoms, steps=steps, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.isfinite(a.pos).all()
    assert torch.allclose(_com(a.pos, a.batch), torch.zeros(3, 3), atol=1e-3)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.z, b.z)
    assert not torch.allclose(a.pos, c.pos)


def test_ancestral_sample_small_molecules_and_sparse_graph():
    diff = small_diffusion(graph="knn", k=3)
    out = ancestral_sample(diff, [1, 2, 6], steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.pos).all()
    assert torch.equal(out.pos[0], torch.zeros(3))  # a single atom sits at its centre of mass
    assert torch.allclose(out.pos[1], -out.pos[2], atol=1e-5)


def test_ancestral_sample_invalid():
    diff = small_diffusion()
    for kwargs in (dict(n_atoms=[3, 4], steps=0), dict(n_atoms=[3, 0], steps=2), dict(n_atoms=[], steps=2),
                   dict(n_atoms=[-1], steps=2)):
        with pytest.raises(ValueError):
            ancestral_sample(diff, **kwargs)


def test_sample_molecules():
    diff = small_diffusion()
    hist = torch.zeros(30, dtype=torch.long)
    hist[3], hist[5] = 2, 1
    dist = NodeCountDistribution(hist)
    calls = []
    mols = sample_molecules(diff, dist, n=5, steps=2, batch_size=2, seed=0, progress=calls.append)
    assert len(mols) == 5 and len(calls) == 3 * 2  # 3 batches x 2 steps
    for z, pos in mols:
        assert z.numel() in (3, 5) and pos.shape == (z.numel(), 3)
        assert torch.isfinite(pos).all() and pos.mean(0).abs().max() < 1e-4
    again = sample_molecules(diff, dist, n=5, steps=2, batch_size=2, seed=0)
    assert all(torch.equal(p1, p2) and torch.equal(z1, z2) for (z1, p1), (z2, p2) in zip(mols, again))
    with pytest.raises(ValueError):
        sample_molecules(diff, dist, n=0, steps=2)
    with pytest.raises(ValueError):
        sample_molecules(diff, dist, n=2, steps=2, batch_size=0)
    with pytest.raises(ValueError):
        sample_molecules(diff, dist, n=2, steps=0)


def test_node_count_distribution(qm9_train):
    hist = node_count_histogram(qm9_train)
    dist = NodeCountDistribution(hist)
    n = dist.sample(20_000, torch.Generator().manual_seed(0))
    assert n.shape == (20_000,) and n.dtype == torch.long
    assert bool((hist[n] > 0).all())  # never 0-2 or 28 atoms
    freq = torch.bincount(n, minlength=30).double() / n.numel()
    assert torch.allclose(freq, hist.double() / hist.sum(), atol=0.01)
    for bad in (torch.zeros(30), torch.tensor([1.0, -1.0, 2.0]), torch.ones(2, 3), torch.tensor([])):
        with pytest.raises(ValueError):
            NodeCountDistribution(bad)


@pytest.mark.parametrize("param,vector_channels", [("eps", 0), ("x0", 0), ("x0", 3)])
def test_parameterizations_give_equivariant_eps(param, vector_channels):
    """Both parameterisations, with and without vector channels: eps_hat positions rotate and reflect with the
    input and stay zero-CoM, types are invariant, atoms permute. No translation: the diffusion lives on zero-CoM
    positions (x0 reads pos_t itself)."""
    from diffgen.tasks.generation.config import GenerationConfig as Config
    from diffgen.tasks.generation.build import build_diffusion

    torch.manual_seed(0)
    cfg = Config()
    cfg.model.hidden, cfg.model.n_layers, cfg.diffusion.parameterization = 16, 2, param
    cfg.model.vector_channels = vector_channels
    diff = build_diffusion(cfg).double().eval()
    for layer in diff.denoiser.backbone.layers:  # make the coordinate output large enough to test
        nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.5)
        if vector_channels:  # and the vector channels, which start near zero
            nn.init.normal_(layer.update.vec_edge.weight, std=0.5)
    batch = torch.tensor([0] * 5 + [1] * 7)
    pos = torch.randn(12, 3, dtype=F64)
    pos = remove_mean(pos, batch)
    h = torch.randn(12, 6, dtype=F64)
    t = torch.tensor([0.3, 0.8], dtype=F64)
    inputs = [("pos", pos), ("scalar", h), ("global", t), ("scalar", batch)]
    e_pos, e_h = assert_e3_equivariant(diff.predict_eps, inputs, ["vec", "scalar"], batch=batch, translate=False)
    assert e_pos.abs().mean() > 0.05
    assert _com(e_pos, batch).abs().max() < 1e-12


def test_vector_channels_change_the_generator_and_need_the_egnn():
    """model.vector_channels builds a different function (the channels, built from relative positions in each
    layer, move the positions), and is refused with the e3transformer backbone by a one-line config error."""
    from diffgen.errors import DiffgenError
    from diffgen.tasks.generation.build import build_diffusion
    from diffgen.tasks.generation.config import load_generation_config

    cfg = load_generation_config(None, ["model.hidden=16", "model.n_layers=2", "model.vector_channels=2"])
    diff = build_diffusion(cfg).double().eval()
    assert diff.denoiser.backbone.vector_channels == 2
    for layer in diff.denoiser.backbone.layers:
        nn.init.normal_(layer.update.vec_edge.weight, std=0.5)
    batch = torch.zeros(6, dtype=torch.long)
    pos = remove_mean(torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0)), batch)
    h, t = torch.randn(6, 6, dtype=F64), torch.tensor([0.5], dtype=F64)
    with torch.no_grad():
        with_vec = diff.predict_eps(pos, h, t, batch)[0]
        for layer in diff.denoiser.backbone.layers:
            nn.init.zeros_(layer.update.vel_mlp[-1].weight)
            nn.init.zeros_(layer.update.vel_mlp[-1].bias)
        without = diff.predict_eps(pos, h, t, batch)[0]
    assert (with_vec - without).abs().max() > 1e-3
    with pytest.raises(DiffgenError, match="model.vector_channels"):
        load_generation_config(None, ["model.backbone=e3transformer", "model.vector_channels=2"])


def test_ce_type_loss_is_position_mse_plus_type_cross_entropy():
    """type_loss=ce: the loss is the position part of the eps-MSE (min-SNR weighted) plus type_weight x the mean
    cross-entropy of the x0 type logits; eps_hat's types are those of the expected one-hot; weighted=False is
    still the plain eps-MSE of positions and types; eps/ce is a one-line config error."""
    from diffgen.diffusion.schedules import alpha, sigma
    from diffgen.errors import DiffgenError
    from diffgen.tasks.generation.build import build_diffusion
    from diffgen.tasks.generation.config import load_generation_config

    torch.manual_seed(0)
    base = ["model.hidden=16", "model.n_layers=2", "diffusion.parameterization=x0", "diffusion.loss_weight=min_snr"]
    ce = build_diffusion(load_generation_config(None, base + ["diffusion.type_loss=ce",
                                                              "diffusion.type_weight=0.7"])).double().eval()
    batch = torch.tensor([0] * 5 + [1] * 4)
    z = torch.tensor([6, 1, 1, 1, 1, 8, 6, 1, 7])
    pos = torch.randn(9, 3, dtype=F64)
    t = torch.tensor([0.1, 0.7], dtype=F64)
    with torch.no_grad():
        loss = ce.loss(pos, z, batch, t=t, generator=torch.Generator().manual_seed(3))
        plain = ce.loss(pos, z, batch, t=t, generator=torch.Generator().manual_seed(3), weighted=False)
        # by hand, from the same noise
        pos0 = remove_mean(pos, batch)
        pos_t, h_t, eps_pos, eps_h = ce.noise(pos0, encode_types(z), t, batch,
                                              torch.Generator().manual_seed(3))
        out_pos, out_h = ce.denoiser(pos_t, h_t, t, batch)
        e_pos, e_h = ce.predict_eps(pos_t, h_t, t, batch)
    g = ce.gamma(t)[batch].unsqueeze(-1)
    logits = out_h[:, :5]
    p = torch.softmax(logits, -1)
    x0_h = torch.cat([p / 4, (p @ torch.tensor([1.0, 6, 7, 8, 9], dtype=F64)).unsqueeze(-1) / 10], -1)
    assert torch.allclose(e_h, (h_t - alpha(g) * x0_h) / sigma(g))
    snr = torch.exp(-ce.gamma(t))
    pos_part = scatter((e_pos - eps_pos).pow(2).sum(-1), batch, reduce="mean") / 9 * snr.clamp(max=5) / snr
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 0, 0, 0, 3, 1, 0, 2]), reduction="none")
    expected = (pos_part + 0.7 * scatter(nll, batch, reduce="mean")).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)  # h is float32 in loss()
    err = (e_pos - eps_pos).pow(2).sum(-1) + (e_h - eps_h).pow(2).sum(-1)
    assert float(plain) == pytest.approx(float((scatter(err, batch, reduce="mean") / 9).mean()), rel=1e-6)
    with pytest.raises(DiffgenError, match="diffusion.type_loss"):
        load_generation_config(None, ["diffusion.parameterization=eps", "diffusion.type_loss=ce"])
    with pytest.raises(DiffgenError, match="diffusion.type_weight"):
        load_generation_config(None, ["diffusion.type_weight=0.5"])


def test_ce_type_loss_learns_the_types_of_real_molecules(qm9_batch):
    """300 Adam steps on 16 real QM9 molecules at low noise (t = 0.05, where the noisy one-hot still shows the type:
    this checks that the cross-entropy reaches the type outputs and trains them): the cross-entropy of the x0 type logits
    falls by more than half, to below 0.75 (log 5 = 1.61 is a uniform guess), and their argmax beats calling every atom a hydrogen by 15 points."""
    from diffgen.tasks.generation.build import build_diffusion
    from diffgen.tasks.generation.config import load_generation_config

    torch.manual_seed(0)
    cfg = load_generation_config(None, ["model.hidden=32", "model.n_layers=2", "diffusion.parameterization=x0",
                                        "diffusion.type_loss=ce"])
    diff = build_diffusion(cfg)
    opt = torch.optim.Adam(diff.parameters(), lr=3e-3)
    pos, z, batch = qm9_batch.pos, qm9_batch.z, qm9_batch.batch
    t = torch.full((qm9_batch.num_graphs,), 0.05)

    def type_ce_and_accuracy():
        with torch.no_grad():
            pos_t, h_t, _, _ = diff.noise(remove_mean(pos, batch), encode_types(z), t, batch,
                                          torch.Generator().manual_seed(1))
            logits = diff._predict(pos_t, h_t, t, batch)[2]
        ce = torch.nn.functional.cross_entropy(logits, z_to_index(z))
        return float(ce), float((index_to_z(logits.argmax(-1)) == z).float().mean())

    ce0, _ = type_ce_and_accuracy()
    for _ in range(300):
        opt.zero_grad()
        diff.loss(pos, z, batch, t=t).backward()
        opt.step()
    ce, acc = type_ce_and_accuracy()
    assert ce < 0.75 and ce < ce0 / 2
    assert acc > float((z == 1).float().mean()) + 0.15


def test_min_snr_weighting_downweights_low_noise():
    """min_snr: the weighted loss equals the plain eps-MSE where SNR <= k, and is smaller where SNR > k."""
    from diffgen.tasks.generation.config import GenerationConfig as Config
    from diffgen.tasks.generation.build import build_diffusion

    torch.manual_seed(0)
    cfg = Config()
    cfg.model.hidden, cfg.model.n_layers = 16, 2
    cfg.diffusion.loss_weight = "min_snr"
    diff = build_diffusion(cfg).eval()
    pos, z, batch = torch.randn(6, 3), torch.tensor([6, 1, 1, 1, 1, 8]), torch.zeros(6, dtype=torch.long)
    for t, low_noise in ((0.05, True), (0.95, False)):
        tt = torch.tensor([t])
        w = diff.loss(pos, z, batch, t=tt, generator=torch.Generator().manual_seed(1))
        plain = diff.loss(pos, z, batch, t=tt, generator=torch.Generator().manual_seed(1), weighted=False)
        snr = float(torch.exp(-diff.gamma(tt)))
        assert (snr > 5) == low_noise
        assert float(w) == pytest.approx(float(plain) * min(snr, 5.0) / snr, rel=1e-5)


def test_unknown_parameterization_is_one_line_error():
    from diffgen.tasks.generation.config import load_generation_config as load_config
    from diffgen.errors import DiffgenError

    with pytest.raises(DiffgenError, match="diffusion.parameterization"):
        load_config(None, ["diffusion.parameterization=v"])


def test_low_noise_t_sampling_is_beta_1_2():
    """t_sampling=low_noise draws t with density 2 (1 - t): mean 1/3, P(t < 1/2) = 3/4; uniform: 1/2 and 1/2."""
    from diffgen.tasks.generation.build import build_diffusion
    from diffgen.tasks.generation.config import load_generation_config

    for kind, mean, below_half in (("uniform", 0.5, 0.5), ("low_noise", 1 / 3, 0.75)):
        cfg = load_generation_config(None, ["model.hidden=8", "model.n_layers=1", f"diffusion.t_sampling={kind}"])
        t = build_diffusion(cfg).sample_t(200_000, torch.Generator().manual_seed(0))
        assert t.min() >= 0 and t.max() <= 1
        assert float(t.mean()) == pytest.approx(mean, abs=0.005)
        assert float((t < 0.5).float().mean()) == pytest.approx(below_half, abs=0.005)
