"""EGNN backbone (diffgen.models.egnn): E(3) and permutation equivariance in float64 (tests/equivariance.py) on random
and real QM9 graphs, with every option; each block of a layer on its own; input validation."""
from __future__ import annotations

import pytest
import torch
from equivariance import assert_e3_equivariant

from diffgen.data.graphs import fully_connected_edges
from diffgen.diffusion.vp import encode_types
from diffgen.models.egnn import EGNN, EquivariantUpdate, MessageBlock

F64 = torch.float64


def make_model(in_dim=5, edge_dim=0, invariant=False, seed=0, **kw) -> EGNN:
    torch.manual_seed(seed)
    model = EGNN(in_dim, hidden=24, out_dim=7, n_layers=2, edge_dim=edge_dim, invariant=invariant, **kw).double()
    # the last coordinate layer starts ~0 (gain 1e-3), the vector updates ~identity: make every update large so
    # that equivariance is tested
    for layer in model.layers:
        if layer.update is not None:
            _enlarge(layer.update)
    return model.eval()


def _enlarge(update: EquivariantUpdate) -> None:
    torch.nn.init.normal_(update.coord_mlp[-1].weight, std=0.5)
    if update.velocity:
        torch.nn.init.normal_(update.vel_mlp[-1].weight, std=0.5)
    if update.vector_channels:
        torch.nn.init.normal_(update.vec_edge.weight, std=0.5)
        torch.nn.init.normal_(update.vec_mix.weight, std=0.5)


@pytest.fixture
def random_batch():
    torch.manual_seed(1)
    sizes = torch.tensor([4, 6, 9])
    batch = torch.repeat_interleave(torch.arange(3), sizes)
    h = torch.randn(int(sizes.sum()), 5, dtype=F64)
    pos = 2.0 * torch.randn(int(sizes.sum()), 3, dtype=F64)
    return h, pos, batch, fully_connected_edges(batch)


@pytest.fixture
def real_batch(qm9_batch):
    h = encode_types(qm9_batch.z).double()
    pos = qm9_batch.pos.double()
    return h, pos, qm9_batch.batch, fully_connected_edges(qm9_batch.batch)


def _check_e3(model, h, pos, edge_index, edge_attr=None, vel=None):
    """Equivariance under rotation and reflection + translation + node permutation (also across graphs: the
    edges carry the graph structure) + edge shuffling; the positions must really move."""
    h1, p1 = assert_e3_equivariant(
        model, [("scalar", h), ("pos", pos), ("edges", edge_index), ("edge_scalar", edge_attr), ("vec", vel)],
        ["scalar", "pos"])
    moved = (p1 - pos).norm(dim=-1).mean()
    assert model.invariant or moved > 0.05, "position update too small for a meaningful equivariance check"
    return h1, p1


@pytest.mark.parametrize("kw", [{}, {"attention": False, "norm_factor": 10.0}, {"velocity": True},
                                {"velocity": True, "vector_channels": 3}],
                         ids=["default", "no_attention_norm10", "velocity", "vector_channels"])
def test_e3_equivariance_random(random_batch, kw):
    h, pos, batch, ei = random_batch
    vel = torch.randn(pos.shape, generator=torch.Generator().manual_seed(2), dtype=F64) if kw.get("velocity") else None
    _check_e3(make_model(**kw), h, pos, ei, vel=vel)


def test_e3_equivariance_real_qm9(real_batch):
    h, pos, batch, ei = real_batch
    _check_e3(make_model(in_dim=6), h, pos, ei)


def test_not_equivariant_to_nonrigid_maps(random_batch):
    """Control: a shear is not an isometry, so the model output must not follow it."""
    h, pos, batch, ei = random_batch
    model = make_model()
    h1, p1 = model(h, pos, ei)
    shear = torch.eye(3, dtype=F64)
    shear[0, 1] = 0.5
    h2, p2 = model(h, pos @ shear.T, ei)
    assert (h2 - h1).abs().max() > 1e-3
    assert (p2 - p1 @ shear.T).abs().max() > 1e-3


def test_invariant_mode(random_batch):
    h, pos, batch, ei = random_batch
    model = make_model(invariant=True)
    assert all(not layer.update_pos and layer.update is None for layer in model.layers)
    h1, p1 = _check_e3(model, h, pos, ei)
    assert torch.equal(p1, pos)
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
    edge_attr = torch.stack([h[ei[0], 0] * h[ei[1], 0], torch.rand(ei.shape[1], dtype=F64)], dim=-1)
    h1, p1 = _check_e3(model, h, pos, ei, edge_attr)
    assert h1.shape == (h.shape[0], 7) and p1.shape == pos.shape
    # the extra features are used
    h2, p2 = model(h, pos, ei, edge_attr + 1.0)
    assert (h2 - h1).abs().max() > 1e-4 and (p2 - p1).abs().max() > 1e-6


def test_message_block_is_invariant_and_equivariant_update_is_equivariant(random_batch):
    """Each block on its own: messages and features are invariants (EGNN eqs. 3, 5, 6), the coordinate and vector
    channel update (eqs. 4, 7) is equivariant, and vectors do not translate."""
    h, pos, batch, ei = random_batch
    g = torch.Generator().manual_seed(6)
    c, hidden = 2, 5
    edge_attr = torch.randn(ei.shape[1], 3, generator=g, dtype=F64)
    vec = torch.randn(pos.shape[0], c, 3, generator=g, dtype=F64)
    torch.manual_seed(0)
    message = MessageBlock(hidden, 3, vector_channels=c).double()
    update = EquivariantUpdate(hidden, 3, norm_factor=3.0, velocity=True, vector_channels=c).double()
    _enlarge(update)
    h2, m = assert_e3_equivariant(message, [("scalar", h), ("edges", ei), ("edge_scalar", edge_attr), ("vec", vec)],
                                  ["scalar", "edge_scalar"])
    assert h2.shape == h.shape and m.shape == (ei.shape[1], hidden)
    p2, vec2 = assert_e3_equivariant(
        update, [("scalar", h2), ("pos", pos), ("edges", ei), ("edge_scalar", edge_attr), ("edge_scalar", m),
                 ("vec", None), ("vec", vec)], ["pos", "vec"])
    assert (p2 - pos).abs().max() > 0.05 and (vec2 - vec).abs().max() > 0.05


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
        model(h, pos, ei, torch.zeros(ei.shape[1], 2, dtype=F64))  # edge_dim=0: would be ignored
    with_edges = make_model(edge_dim=2)
    with pytest.raises(ValueError):
        with_edges(h, pos, ei)  # edge_attr missing
    with pytest.raises(ValueError):
        with_edges(h, pos, ei, torch.zeros(ei.shape[1], 3, dtype=F64))  # wrong width
    with pytest.raises(ValueError):
        with_edges(h, pos, ei, torch.zeros(ei.shape[1] - 1, 2, dtype=F64))  # wrong edge count
    with pytest.raises(ValueError, match="got vel=False, vec=False"):  # a velocity layer called without velocity
        EGNN(5, hidden=8, n_layers=1, velocity=True).layers[0](h, pos, ei, torch.zeros(ei.shape[1], 2))
    with pytest.raises(ValueError):
        EGNN(5, hidden=8, n_layers=0)
    with pytest.raises(ValueError):
        EGNN(0, hidden=8, n_layers=1)
