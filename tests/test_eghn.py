"""EGHN hierarchy block (diffgen.models.eghn) and its wiring into the dynamics model, config and task."""
from __future__ import annotations

import math

import pytest
import torch
from equivariance import assert_e3_equivariant

from diffgen.tasks.dynamics.config import dynamics_config_from_dict
from diffgen.errors import DiffgenError
from diffgen.models.eghn import EquivariantPooling, assignment_regulariser
from diffgen.models.egnn import EGNN
from diffgen.models.dynamics import VelocityEGNNDynamics


def _inputs(b=3, n=6, n_types=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(b, n, 3, generator=g, dtype=torch.float64) * 2.0
    vel = torch.randn(b, n, 3, generator=g, dtype=torch.float64)
    q = torch.randint(0, 2, (b, n), generator=g).double() * 2 - 1
    types = torch.randint(0, n_types, (b, n), generator=g)
    return pos, vel, q, types


def _egnns(model):
    yield model.backbone
    if model.pool_clusters:
        yield model.pool.cluster_egnn
        yield model.refine


def _pooled(k=3, seed=0, **kw):
    torch.manual_seed(seed)
    model = VelocityEGNNDynamics(hidden=16, n_layers=2, n_types=3, pool_clusters=k, pool_layers=2, **kw).double()
    for net in _egnns(model):  # make every coordinate update large enough to matter in the checks
        for layer in net.layers:
            torch.nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.5)
            if layer.velocity:
                torch.nn.init.normal_(layer.update.vel_mlp[-1].weight, std=0.5)
    return model.eval()


def _model_inputs(pos, vel, q, types):
    return [("pos", pos), ("vec", vel), ("scalar", q), ("scalar", types)]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_pooled_predictions_are_e3_and_permutation_equivariant(k):
    """Prediction equivariant, regulariser invariant (rotation and reflection, translation, atom permutation)."""
    model = _pooled(k)
    pos, vel, q, types = _inputs()
    with torch.no_grad():
        out, reg = assert_e3_equivariant(lambda *a: model(*a, return_reg=True), _model_inputs(pos, vel, q, types),
                                         ["pos", "global"], node_dim=1)
        assert reg.dim() == 0 and torch.equal(model(pos, vel, q, types), out)  # return_reg changes only the return
        assert out.shape == pos.shape and (out - pos).norm(dim=-1).mean() > 0.05
        # the hierarchy matters: switching off the cluster displacement changes the prediction
        _, x = model.backbone(*_flat_args(model, pos, vel, q, types))
        assert not torch.allclose(out.reshape(-1, 3), x)


def test_float32_pooled_model_is_equivariant_to_1e4():
    torch.manual_seed(0)  # default initialisation: moves atoms by a few units, as at the start of training
    model = VelocityEGNNDynamics(hidden=16, n_layers=2, n_types=3, pool_clusters=4).eval()
    pos, vel, q, types = (a.float() if a.is_floating_point() else a for a in _inputs(b=2, n=22, seed=3))
    with torch.no_grad():
        out = assert_e3_equivariant(model, _model_inputs(pos, vel, q, types), ["pos"], node_dim=1, seed=7,
                                    atol=1e-4, rtol=1e-4)[0]
        assert (out - pos).norm(dim=-1).mean() > 0.05


def _flat_args(model, pos, vel, q, types):
    """Inputs of the backbone exactly as the flat (pre-EGHN) forward builds them."""
    from diffgen.data.graphs import fully_connected_edges

    b, n, _ = pos.shape
    edges = fully_connected_edges(torch.arange(b).repeat_interleave(n))
    v = vel.reshape(b * n, 3)
    h = torch.cat([v.norm(dim=-1, keepdim=True),
                   torch.nn.functional.one_hot(types.reshape(-1), model.n_types).to(pos.dtype)], -1)
    qq = q.reshape(-1)
    return h, pos.reshape(b * n, 3), edges, (qq[edges[0]] * qq[edges[1]]).unsqueeze(-1), v


def test_assignments_sum_to_one_and_pooled_positions_are_equivariant():
    torch.manual_seed(0)
    pool = EquivariantPooling(hidden=8, n_clusters=3).double()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    pos = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    # E-Pool: assignments and features per atom, masses, cluster centres (not atom-indexed: they rotate and
    # translate but are not permuted) and cluster features; E-UnPool: atom features and positions, regulariser
    pool_kinds = ["scalar", "global", "global_pos", "global", "scalar"]
    with torch.no_grad():
        log_s, mass, z, hk, _ = assert_e3_equivariant(pool.pool, [("scalar", h), ("pos", pos)], pool_kinds, node_dim=1)
        torch.testing.assert_close(log_s.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
        torch.testing.assert_close(mass.sum(-1), torch.full((2,), 5.0, dtype=torch.float64))
        assert z.shape == (2, 3, 3) and hk.shape == (2, 3, 8)
        assert_e3_equivariant(pool, [("scalar", h), ("pos", pos)], ["scalar", "pos", "global"], node_dim=1)
        # an (almost) empty cluster keeps exact translation equivariance (centred weighted mean)
        pool.assign[-1].bias.copy_(torch.tensor([0.0, 0.0, -80.0], dtype=torch.float64))
        mass = assert_e3_equivariant(pool.pool, [("scalar", h), ("pos", pos)], pool_kinds, node_dim=1, seed=1)[1]
        assert float(mass[:, 2].max()) < 1e-30
        assert_e3_equivariant(pool, [("scalar", h), ("pos", pos)], ["scalar", "pos", "global"], node_dim=1, seed=1)


def _eq7_reference(model, pos, vel, q, types):
    """EGNN's N-body model (Satorras et al. 2021, eqs. 3-7; EDM's bounded coordinate update) written densely per
    system from the equations, independently of the sparse implementation, with ``model``'s weights read by name:
    node features ``[|v_i|, one-hot(type_i)]``, edge features ``[|x_i - x_j|^2, |x_i^0 - x_j^0|^2, q_i q_j]``,
    no attention, sums over ``j != i`` divided by ``Z``; the prediction is the final ``x``."""
    lin, silu = torch.nn.functional.linear, torch.nn.functional.silu
    net = model.backbone
    preds = []
    for x, v, qs, ts in zip(pos, vel, q, types):
        n = x.shape[0]
        off = (1 - torch.eye(n, dtype=x.dtype))[..., None]  # j != i
        h = lin(torch.cat([v.norm(dim=-1, keepdim=True), torch.nn.functional.one_hot(ts, model.n_types).to(x.dtype)],
                          -1), net.embed_in.weight, net.embed_in.bias)
        d0 = (x[:, None] - x[None]).pow(2).sum(-1, keepdim=True)
        for layer in net.layers:
            msg, upd = layer.message, layer.update
            z, r = msg.norm_factor, upd.coords_range
            diff = x[:, None] - x[None]  # [n, n, 3]: x_i - x_j
            e = torch.cat([diff.pow(2).sum(-1, keepdim=True), d0, (qs[:, None] * qs[None])[..., None]], -1)

            def linear_of_pair(pair):  # Linear([h_i, h_j, e_ij]): one weight matrix acting on the concatenation
                w = torch.cat([pair.src.weight, pair.dst.weight, pair.edge.weight], dim=1)
                return lin(torch.cat([h[:, None].expand(n, n, -1), h[None].expand(n, n, -1), e], -1), w, pair.src.bias)

            m = silu(lin(silu(linear_of_pair(msg.edge_in)), msg.edge_mlp[1].weight, msg.edge_mlp[1].bias))  # eq. 3
            agg = (m * off).sum(1) / z  # eq. 5
            h = h + lin(silu(lin(torch.cat([h, agg], -1), msg.node_mlp[0].weight, msg.node_mlp[0].bias)),
                        msg.node_mlp[2].weight, msg.node_mlp[2].bias)  # eq. 6
            phi_x = lin(silu(lin(silu(linear_of_pair(upd.coord_in)), upd.coord_mlp[1].weight, upd.coord_mlp[1].bias)),
                        upd.coord_mlp[3].weight)
            x = x + (diff / (diff.norm(dim=-1, keepdim=True) + 1) * torch.tanh(phi_x) * r * off).sum(1) / z  # eq. 4
            x = x + lin(silu(lin(h, upd.vel_mlp[0].weight, upd.vel_mlp[0].bias)), upd.vel_mlp[2].weight,
                        upd.vel_mlp[2].bias) * v  # eq. 7
        preds.append(x)
    return torch.stack(preds)


def test_pool_clusters_zero_is_exactly_the_flat_model():
    """K = 0 adds nothing to the backbone and predicts exactly EGNN's eq. 7 model (dense reference above)."""
    pos, vel, q, types = _inputs(n=7)
    torch.manual_seed(0)
    flat = VelocityEGNNDynamics(hidden=16, n_layers=2, n_types=3, pool_clusters=0, norm_factor=3.0).double()
    assert all(k.startswith("backbone.") for k in flat.state_dict())  # no pooling or refinement weights
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flat.parameters():  # away from the near-identity start, so that every weight matters
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        out, reg = flat(pos, vel, q, types, return_reg=True)
        ref = _eq7_reference(flat, pos, vel, q, types)
    assert reg is None
    assert (ref - pos).norm(dim=-1).mean() > 0.1  # a real prediction, not the input
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_regulariser_is_finite_bounded_and_has_gradient():
    model = _pooled(3).train()
    pos, vel, q, types = _inputs()
    _, reg = model(pos, vel, q, types, return_reg=True)
    assert reg.dim() == 0 and torch.isfinite(reg) and 0.0 <= reg.item() <= 2.0
    reg.backward()
    grads = [p.grad for p in model.pool.assign.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    backbone_grad = model.backbone.embed_out.weight.grad  # reaches the atom features through the assignment
    assert backbone_grad is not None and float(backbone_grad.abs().sum()) > 0
    # reference values: uniform -> 1 (fuzzy, balanced); crisp + balanced -> 0; all in one cluster -> 1
    k = 4
    uniform = torch.full((1, 8, k), -math.log(k), dtype=torch.float64)
    assert float(assignment_regulariser(uniform)) == pytest.approx(1.0)
    crisp = torch.log_softmax(torch.eye(k, dtype=torch.float64).repeat(2, 1)[None] * 60, -1)
    assert float(assignment_regulariser(crisp)) == pytest.approx(0.0, abs=1e-12)
    collapsed = torch.log_softmax(torch.tensor([60.0, 0, 0, 0], dtype=torch.float64).expand(1, 8, k), -1)
    assert float(assignment_regulariser(collapsed)) == pytest.approx(1.0, abs=1e-12)
    one = torch.zeros(2, 5, 1, dtype=torch.float64, requires_grad=True)
    assert assignment_regulariser(one).item() == 0.0
    # extreme logits: finite value and gradient
    extreme = torch.tensor([[[200.0, -200.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    r = assignment_regulariser(torch.log_softmax(extreme, -1))
    r.backward()
    assert torch.isfinite(r) and torch.isfinite(extreme.grad).all()


def test_tiny_pooled_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    n = 6  # one type per atom, so per-atom random targets can be told apart
    model = VelocityEGNNDynamics(hidden=32, n_layers=2, n_types=n, pool_clusters=2, pool_layers=1, vel_init=0.0)
    g = torch.Generator().manual_seed(0)
    pos, vel = torch.randn(2, n, 3, generator=g) * 1.5, torch.randn(2, n, 3, generator=g)
    q, types = torch.randn(2, n, generator=g), torch.arange(n).expand(2, n)
    target = pos + torch.randn(2, n, 3, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        pred, reg = model(pos, vel, q, types, return_reg=True)
        mse = torch.nn.functional.mse_loss(pred, target)
        loss = mse + 0.01 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(mse.item())
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])  # measured ~0.05x


def test_invalid_pooling_settings_give_one_line_errors():
    with pytest.raises(ValueError, match="pool_clusters must be >= 0"):
        VelocityEGNNDynamics(hidden=8, n_layers=1, pool_clusters=-1)
    with pytest.raises(ValueError, match="n_layers >= 1"):
        VelocityEGNNDynamics(hidden=8, n_layers=1, pool_clusters=2, pool_layers=0)
    model = VelocityEGNNDynamics(hidden=8, n_layers=1, pool_clusters=6)
    with pytest.raises(ValueError, match="pool_clusters=6 exceeds the 5 atoms") as exc:
        model(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.ones(2, 5))
    assert "\n" not in str(exc.value)
    for bad, msg in (({"pool_clusters": -1}, "pool_clusters must be >= 0"),
                     ({"pool_clusters": 2, "pool_layers": 0}, "pool_layers must be >= 1"),
                     ({"pool_reg_weight": -0.1}, "pool_reg_weight must be >= 0")):
        with pytest.raises(DiffgenError, match=msg) as exc:
            dynamics_config_from_dict({"model": bad})
        assert "\n" not in str(exc.value)


def test_task_adds_weighted_regulariser_and_old_checkpoints_load(tmp_path):
    from diffgen.tasks.dynamics.module import DynamicsTask
    from diffgen.tasks.dynamics.checkpoints import build_model, load

    cfg = dynamics_config_from_dict({"model": {"hidden": 8, "n_layers": 1, "pool_clusters": 2,
                                               "pool_reg_weight": 0.5}})
    task = DynamicsTask(cfg.to_dict())
    assert task.model.pool_clusters == 2 and task.model.pool.cluster_egnn.layers.__len__() == 2
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.ones(2, 5),
             torch.randn(2, 5, 3, generator=g), torch.zeros(2, 5, dtype=torch.long))
    loss, reg = task._loss(batch, with_reg=True)
    mse = task._loss(batch)
    torch.testing.assert_close(loss, mse + 0.5 * reg)
    flat_task = DynamicsTask(dynamics_config_from_dict({"model": {"hidden": 8, "n_layers": 1}}).to_dict())
    loss, reg = flat_task._loss(batch, with_reg=True)
    assert reg is None and torch.equal(loss, flat_task._loss(batch))
    # a checkpoint written before the pooling fields existed: config without them, flat state dict
    old_cfg = dynamics_config_from_dict({"model": {"hidden": 8, "n_layers": 1}}).to_dict()
    for key in ("pool_clusters", "pool_layers", "pool_reg_weight"):
        del old_cfg["model"][key]
    model = build_model(dynamics_config_from_dict(old_cfg))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"config": old_cfg}, "state_dict": state}, tmp_path / "old.ckpt")
    loaded, loaded_cfg = load(tmp_path / "old.ckpt")
    assert loaded_cfg.model.pool_clusters == 0 and loaded(*batch[:3], return_reg=True)[1] is None
    assert isinstance(loaded.backbone, EGNN) and not hasattr(loaded, "pool")


def test_coincident_nodes_give_finite_gradients_and_unchanged_outputs():
    """Two empty clusters both sit at the centroid: the EGNN distance must not produce NaN gradients there."""
    torch.manual_seed(0)
    net = EGNN(2, hidden=8, n_layers=2).double()
    pos = torch.tensor([[0.0, 0, 0], [0.0, 0, 0], [1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 2, dtype=torch.float64)
    edges = torch.tensor([[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]])
    _, out = net(h, pos, edges)
    out.pow(2).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pos.grad).all()
