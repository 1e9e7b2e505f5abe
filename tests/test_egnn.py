"""E(3) and permutation equivariance of the EGNN backbone (float64), on random and real QM9 graphs."""
from __future__ import annotations

import pytest
import torch

from diffgen.data.graphs import fully_connected_edges
from diffgen.diffusion.vp import encode_types
from diffgen.models.egnn import EGNN

TOL = 1e-4


def random_orthogonal(det: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    assert torch.allclose(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert round(float(torch.det(q))) == det
    return q


def make_model(in_dim=5, edge_dim=0, invariant=False, seed=0, **kw) -> EGNN:
    torch.manual_seed(seed)
    model = EGNN(in_dim, hidden=24, out_dim=7, n_layers=2, edge_dim=edge_dim, invariant=invariant, **kw).double()
    # the last coordinate layer starts ~0 (gain 1e-3); make the position update large so equivariance is tested
    for layer in model.layers:
        if layer.update_pos:
            torch.nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.5)
    return model.eval()


@pytest.fixture
def random_batch():
    torch.manual_seed(1)
    sizes = torch.tensor([4, 6, 9])
    batch = torch.repeat_interleave(torch.arange(3), sizes)
    h = torch.randn(int(sizes.sum()), 5, dtype=torch.float64)
    pos = 2.0 * torch.randn(int(sizes.sum()), 3, dtype=torch.float64)
    return h, pos, batch, fully_connected_edges(batch)


@pytest.fixture
def real_batch(qm9_batch):
    h = encode_types(qm9_batch.z).double()
    pos = qm9_batch.pos.double()
    return h, pos, qm9_batch.batch, fully_connected_edges(qm9_batch.batch)


def _check_e3(model, h, pos, edge_index, edge_attr=None):
    h1, p1 = model(h, pos, edge_index, edge_attr)
    assert torch.isfinite(h1).all() and torch.isfinite(p1).all()
    moved = (p1 - pos).norm(dim=-1).mean()
    assert moved > 0.05, "position update too small for a meaningful equivariance check"
    t = torch.tensor([1.5, -3.0, 0.7], dtype=torch.float64)
    for det, seed in ((1, 10), (-1, 11)):
        q = random_orthogonal(det, seed)
        h2, p2 = model(h, pos @ q.T + t, edge_index, edge_attr)
        assert torch.allclose(h2, h1, atol=TOL), (det, (h2 - h1).abs().max())
        assert torch.allclose(p2, p1 @ q.T + t, atol=TOL), (det, (p2 - p1 @ q.T - t).abs().max())
    return h1, p1


def test_e3_equivariance_random(random_batch):
    h, pos, batch, ei = random_batch
    _check_e3(make_model(), h, pos, ei)


def test_e3_equivariance_real_qm9(real_batch):
    h, pos, batch, ei = real_batch
    _check_e3(make_model(in_dim=6), h, pos, ei)


def test_e3_equivariance_with_norm_factor_and_no_attention(random_batch):
    h, pos, batch, ei = random_batch
    _check_e3(make_model(attention=False, norm_factor=10.0), h, pos, ei)


def test_not_equivariant_to_nonrigid_maps(random_batch):
    """Control: a shear is not an isometry, so the model output must not follow it."""
    h, pos, batch, ei = random_batch
    model = make_model()
    h1, p1 = model(h, pos, ei)
    shear = torch.eye(3, dtype=torch.float64)
    shear[0, 1] = 0.5
    h2, p2 = model(h, pos @ shear.T, ei)
    assert (h2 - h1).abs().max() > 1e-3
    assert (p2 - p1 @ shear.T).abs().max() > 1e-3


def _within_graph_permutation(batch: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    perm = torch.arange(batch.numel())
    for b in torch.unique(batch):
        nodes = (batch == b).nonzero().flatten()
        perm[nodes] = nodes[torch.randperm(nodes.numel(), generator=g)]
    assert torch.equal(batch[perm], batch) and not torch.equal(perm, torch.arange(batch.numel()))
    return perm


@pytest.mark.parametrize("which", ["random", "real"])
def test_permutation_equivariance(which, random_batch, real_batch):
    h, pos, batch, ei = random_batch if which == "random" else real_batch
    model = make_model(in_dim=h.shape[1])
    perm = _within_graph_permutation(batch, seed=3)  # new node k = old node perm[k]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    ei_p = inv[ei]  # relabel old ids -> new ids
    # shuffle the edge order too: the output must not depend on it
    ei_p = ei_p[:, torch.randperm(ei_p.shape[1], generator=torch.Generator().manual_seed(4))]
    h1, p1 = model(h, pos, ei)
    h2, p2 = model(h[perm], pos[perm], ei_p)
    assert torch.allclose(h2, h1[perm], atol=TOL)
    assert torch.allclose(p2, p1[perm], atol=TOL)


def test_invariant_mode(random_batch):
    h, pos, batch, ei = random_batch
    model = make_model(invariant=True)
    assert all(not layer.update_pos for layer in model.layers)
    h1, p1 = model(h, pos, ei)
    assert torch.equal(p1, pos)
    t = torch.tensor([0.3, 2.0, -1.0], dtype=torch.float64)
    for det, seed in ((1, 20), (-1, 21)):
        q = random_orthogonal(det, seed)
        pos2 = pos @ q.T + t
        h2, p2 = model(h, pos2, ei)
        assert torch.equal(p2, pos2)
        assert torch.allclose(h2, h1, atol=TOL)
    # h does depend on the geometry: moving one atom changes it
    pos3 = pos.clone()
    pos3[0] += 0.5
    h3, _ = model(h, pos3, ei)
    assert (h3 - h1).abs().max() > 1e-4


def test_edge_attributes(random_batch):
    h, pos, batch, ei = random_batch
    model = make_model(edge_dim=2)
    torch.manual_seed(5)
    # invariant extra edge features: symmetric per-pair values from node features
    edge_attr = torch.stack([h[ei[0], 0] * h[ei[1], 0], torch.rand(ei.shape[1], dtype=torch.float64)], dim=-1)
    h1, p1 = _check_e3(model, h, pos, ei, edge_attr)
    assert h1.shape == (h.shape[0], 7) and p1.shape == pos.shape
    # the extra features are used
    h2, p2 = model(h, pos, ei, edge_attr + 1.0)
    assert (h2 - h1).abs().max() > 1e-4 and (p2 - p1).abs().max() > 1e-6


def test_output_shapes_and_dtypes(random_batch):
    h, pos, batch, ei = random_batch
    model = make_model()
    h1, p1 = model(h, pos, ei)
    assert h1.shape == (h.shape[0], 7) and p1.shape == (h.shape[0], 3)
    assert h1.dtype == p1.dtype == torch.float64
    # out_dim defaults to hidden
    assert EGNN(5, hidden=12, n_layers=1)(h.float(), pos.float(), ei)[0].shape == (h.shape[0], 12)


def test_wrong_shapes_raise(random_batch):
    h, pos, batch, ei = random_batch
    model = make_model()
    with pytest.raises(ValueError):
        model(h[:, :4], pos, ei)  # wrong feature width
    with pytest.raises(ValueError):
        model(h[0], pos, ei)  # 1-D features
    with pytest.raises(ValueError):
        model(h, pos[:, :2], ei)  # 2-D positions
    with pytest.raises(ValueError):
        model(h, pos[:-1], ei)  # node-count mismatch
    with pytest.raises(ValueError):
        model(h, pos, ei, torch.zeros(ei.shape[1], 2, dtype=torch.float64))  # edge_dim=0: would be ignored
    with_edges = make_model(edge_dim=2)
    with pytest.raises(ValueError):
        with_edges(h, pos, ei)  # edge_attr missing
    with pytest.raises(ValueError):
        with_edges(h, pos, ei, torch.zeros(ei.shape[1], 3, dtype=torch.float64))  # wrong width
    with pytest.raises(ValueError):
        with_edges(h, pos, ei, torch.zeros(ei.shape[1] - 1, 2, dtype=torch.float64))  # wrong edge count
    with pytest.raises(ValueError):
        EGNN(5, hidden=8, n_layers=0)
    with pytest.raises(ValueError):
        EGNN(0, hidden=8, n_layers=1)
