"""The dynamics model (diffgen.models.dynamics.VelocityEGNNDynamics) and the velocity inputs of the EGNN backbone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from equivariance import assert_e3_equivariant

from diffgen.data.nbody import frame_pairs, initial_state, simulate
from diffgen.models.dynamics import VelocityEGNNDynamics
from diffgen.models.egnn import EGNN


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = VelocityEGNNDynamics(hidden=16, n_layers=2, **kw).double()
    for layer in model.backbone.layers:  # make every update large enough to matter in the checks
        torch.nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.5)
        if layer.velocity:
            torch.nn.init.normal_(layer.update.vel_mlp[-1].weight, std=0.5)
        if layer.vector_channels:  # vector updates and channel mixing away from their near-identity start
            torch.nn.init.normal_(layer.update.vec_edge.weight, std=0.5)
            torch.nn.init.normal_(layer.update.vec_mix.weight, std=0.5)
    return model.eval()


@pytest.mark.parametrize("use_velocity,n_types,channels", [(True, 0, 0), (False, 0, 0), (True, 3, 0), (True, 0, 3)])
def test_predictions_are_e3_and_permutation_equivariant(use_velocity, n_types, channels):
    model = _model(use_velocity=use_velocity, n_types=n_types, vector_channels=channels)
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    vel = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    q = torch.randint(0, 2, (3, 5), generator=g).double() * 2 - 1
    types = torch.randint(0, 3, (3, 5), generator=g) if n_types else None
    with torch.no_grad():
        out = assert_e3_equivariant(model, [("pos", pos), ("vec", vel), ("scalar", q), ("scalar", types)], ["pos"],
                                    node_dim=1)[0]
    assert (out - pos).norm(dim=-1).mean() > 0.05


def test_egnn_velocity_input_is_validated_and_optional():
    plain = EGNN(2, hidden=8, n_layers=1)
    assert not any("vel_mlp" in k for k in plain.state_dict())  # unchanged backbone when unused
    h, pos = torch.randn(4, 2), torch.randn(4, 3)
    edges = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    with pytest.raises(ValueError, match="velocity=False"):
        plain(h, pos, edges, vel=torch.randn(4, 3))
    with pytest.raises(ValueError, match="vel must have shape"):
        EGNN(2, hidden=8, n_layers=1, velocity=True)(h, pos, edges)
    with pytest.raises(ValueError, match="needs velocity=True"):
        EGNN(2, hidden=8, n_layers=1, vector_channels=2)


def test_vector_channels_read_relative_motion():
    """Two pairs with the same positions and speeds |v_i| but opposite relative motion (approaching vs receding)
    get different invariant features only with vector channels: EGNN's eq. 7 layer sees the speeds alone."""
    pos = torch.tensor([[-1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    vel = torch.tensor([[0.5, 0, 0], [-0.5, 0, 0]], dtype=torch.float64)
    edges = torch.tensor([[0, 1], [1, 0]])
    for pair in (False, True):
        torch.manual_seed(0)
        net = EGNN(1, hidden=8, n_layers=1, velocity=True, vector_channels=2 * pair).double()
        speed = vel.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            h_in, _ = net(speed, pos, edges, vel=vel)
            h_out, _ = net(speed, pos, edges, vel=-vel)
        gap = float((h_in - h_out).abs().max())
        assert (gap > 1e-4) == pair, (pair, gap)
    from diffgen.tasks.dynamics.config import dynamics_config_from_dict
    from diffgen.errors import DiffgenError

    with pytest.raises(DiffgenError, match="vector_channels needs model.use_velocity"):
        dynamics_config_from_dict({"model": {"use_velocity": False, "vector_channels": 2}})


def test_tiny_model_beats_identity_baseline():
    from diffgen.tasks.dynamics.evaluate import evaluate_pairs

    torch.manual_seed(0)
    torch.set_num_threads(1)
    pos, vel, q = initial_state(120, 5, np.random.default_rng(5))
    loc, v = simulate(pos, vel, q, n_frames=11)  # 1,000 steps: frame 0 -> frame 10, as 30 -> 40 in the benchmark
    data = {"loc": loc.astype(np.float32), "vel": v.astype(np.float32), "charges": q.astype(np.float32)}
    tr = {k: a[:100] for k, a in data.items()}
    te = {k: a[100:] for k, a in data.items()}
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in vars(frame_pairs(tr, 0, 10)).values()]
    test = torch.utils.data.TensorDataset(*[torch.from_numpy(np.ascontiguousarray(a))
                                            for a in vars(frame_pairs(te, 0, 10)).values()])
    model = VelocityEGNNDynamics(hidden=16, n_layers=2)
    with torch.no_grad():
        before = evaluate_pairs(model, test)["model"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(*tensors[:3]), tensors[3])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = evaluate_pairs(model, test)
    assert mse["model"] < 0.7 * mse["identity"], mse
    assert mse["model"] < 0.95 * before, (before, mse)  # it learned (it starts at the constant-velocity guess)
