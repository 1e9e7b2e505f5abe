"""N-body simulator, data generator, velocity-aware EGNN dynamics model and `diffgen dynamics` CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_egnn import random_orthogonal

from diffgen.data.nbody import (
    coulomb_forces,
    frame_pairs,
    generate_nbody,
    initial_state,
    load_nbody_split,
    simulate,
    total_energy,
)
from diffgen.errors import DiffgenError
from diffgen.models.egnn import EGNN
from diffgen.models.dynamics import VelocityEGNNDynamics


def _state(seed=0, n_traj=8):
    return initial_state(n_traj, 5, np.random.default_rng(seed))


def test_forces_are_pairwise_antisymmetric_and_repel_like_charges():
    pos = np.array([[[0.0, 0, 0], [1.0, 0, 0]]])
    f = coulomb_forces(pos, np.array([[1.0, 1.0]]), clip=None)
    np.testing.assert_allclose(f[0], [[-1.0, 0, 0], [1.0, 0, 0]])  # like charges push apart
    f = coulomb_forces(pos, np.array([[1.0, -1.0]]), clip=None)
    np.testing.assert_allclose(f[0], [[1.0, 0, 0], [-1.0, 0, 0]])
    assert np.abs(coulomb_forces(pos * 1e-3, np.array([[1.0, 1.0]]))).max() == 100.0  # clipped


def test_simulator_conserves_momentum_and_energy_without_clipping():
    pos, vel, q = _state(seed=3, n_traj=16)
    pos = pos * 2.0  # spread out: no close encounters in a short run
    loc, v = simulate(pos, vel, q, n_frames=11, save_every=100, dt=1e-4, clip=None)
    p = v.sum(2)  # [B, F, 3], unit masses
    np.testing.assert_allclose(p, np.broadcast_to(p[:, :1], p.shape), atol=1e-10)
    e = np.stack([total_energy(loc[:, k], v[:, k], q) for k in range(loc.shape[1])], 1)
    rel = np.abs(e - e[:, :1]) / (np.abs(e[:, :1]) + 1.0)
    assert rel.max() < 2e-3, rel.max()


def test_simulator_frames_match_protocol_and_generator_is_deterministic():
    a = generate_nbody(6, seed=11, n_frames=5)
    b = generate_nbody(6, seed=11, n_frames=5)
    c = generate_nbody(6, seed=12, n_frames=5)
    assert a["loc"].shape == (6, 5, 5, 3) and a["charges"].shape == (6, 5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["loc"], c["loc"])
    assert set(np.unique(a["charges"])) <= {-1.0, 1.0}
    np.testing.assert_allclose(np.linalg.norm(a["vel"][:, 0], axis=-1), 0.5, rtol=1e-5)


def test_split_cache_is_written_once_and_reused(tmp_path):
    d1 = load_nbody_split("valid", 4, root=tmp_path)
    files = list((tmp_path / "nbody").glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    d2 = load_nbody_split("valid", 4, root=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(d1["loc"], d2["loc"])
    assert d1["loc"].shape == (4, 50, 5, 3)


def test_bad_trajectories_give_one_line_errors():
    data = {"loc": np.zeros((2, 10, 5, 3)), "vel": np.zeros((2, 10, 5, 3)), "charges": np.ones((2, 5))}
    with pytest.raises(DiffgenError, match="frame 40 missing"):
        frame_pairs(data, 5, 40)
    with pytest.raises(DiffgenError, match="mismatched atom"):
        frame_pairs({**data, "vel": np.zeros((2, 10, 4, 3))}, 1, 2)
    with pytest.raises(DiffgenError, match="mismatched atom"):
        frame_pairs({**data, "charges": np.ones((2, 4))}, 1, 2)
    with pytest.raises(DiffgenError) as exc:
        frame_pairs({"loc": np.zeros((2, 10, 5))}, 1, 2)
    assert "\n" not in str(exc.value)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = VelocityEGNNDynamics(hidden=16, n_layers=2, **kw).double()
    for layer in model.backbone.layers:  # make every update large enough to matter in the checks
        torch.nn.init.normal_(layer.coord_mlp[-1].weight, std=0.5)
        if layer.velocity:
            torch.nn.init.normal_(layer.vel_mlp[-1].weight, std=0.5)
        if layer.vector_channels:  # vector updates and channel mixing away from their near-identity start
            torch.nn.init.normal_(layer.vec_edge.weight, std=0.5)
            torch.nn.init.normal_(layer.vec_mix.weight, std=0.5)
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
        out = model(pos, vel, q, types)
        assert (out - pos).norm(dim=-1).mean() > 0.05
        t = torch.tensor([0.3, -2.0, 1.1], dtype=torch.float64)
        for det, seed in ((1, 4), (-1, 5)):
            rot = random_orthogonal(det, seed)
            out2 = model(pos @ rot.T + t, vel @ rot.T, q, types)
            torch.testing.assert_close(out2, out @ rot.T + t, atol=1e-9, rtol=1e-9)
        perm = torch.tensor([3, 0, 4, 1, 2])
        types_p = None if types is None else types[:, perm]
        torch.testing.assert_close(model(pos[:, perm], vel[:, perm], q[:, perm], types_p), out[:, perm],
                                   atol=1e-9, rtol=1e-9)


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
    from diffgen.tasks.dynamics.module import evaluate_pairs

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


def run_cli(*args, env_extra=None):
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "diffgen.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _one_line_error(res, fragment):
    assert res.returncode != 0
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


def test_cli_train_evaluate_and_bad_input(tmp_path):
    from diffgen.data.nbody import N_FRAMES, nbody_cache_path, save_nbody_cache

    env = {"DIFFGEN_CACHE": str(tmp_path / "cache")}
    tiny = ["data.n_train=20", "data.n_valid=10", "data.n_test=10", "data.batch_size=10"]
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("valid", 10), ("test", 10)):  # stand-in caches: CLI plumbing, not physics
        path = nbody_cache_path(split, n, tmp_path / "cache")
        loc = rng.standard_normal((n, N_FRAMES, 5, 3)).astype(np.float32)
        save_nbody_cache(path, {"loc": loc, "vel": np.gradient(loc, axis=1),
                                "charges": np.sign(rng.standard_normal((n, 5)))})
    res = run_cli("dynamics", "train", "--threads", "1", "--out-dir", str(tmp_path / "run"), *tiny,
                  "trainer.max_epochs=1", env_extra=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    from typer.testing import CliRunner

    from diffgen.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["dynamics", "evaluate", "--checkpoint", str(ckpt), "--json", str(tmp_path / "m.json")],
                        env={**env, "COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "identity" in res.output and "EGNN" in res.output
    assert set(json.loads((tmp_path / "m.json").read_text())["mse"]) == {"model", "identity", "constant_velocity"}
    xyz = tmp_path / "pred.xyz"
    res = runner.invoke(app, ["dynamics", "predict", "--checkpoint", str(ckpt), "--out", str(xyz), "--index", "2"],
                        env=env)
    assert res.exit_code == 0, res.output
    lines = xyz.read_text().splitlines()
    assert len(lines) == 3 * 7 and lines[0] == "5" and lines[1] == "input frame 30"
    _one_line_error(run_cli("dynamics", "predict", "--checkpoint", str(ckpt), "--out", str(xyz)), "exists")
    # missing frames (trajectories have 50 frames)
    _one_line_error(run_cli("dynamics", "train", "--out-dir", str(tmp_path / "bad"), *tiny, "data.frame_out=60",
                            env_extra=env), "frame 60 missing")
    # mismatched atom counts in a user trajectory file
    bad = tmp_path / "bad.npz"
    np.savez(bad, loc=np.zeros((2, 50, 5, 3)), vel=np.zeros((2, 50, 5, 3)), charges=np.ones((2, 4)))
    _one_line_error(run_cli("dynamics", "evaluate", "--checkpoint", str(ckpt), "--data", str(bad), env_extra=env),
                    "mismatched atom counts")
    _one_line_error(run_cli("dynamics", "evaluate", "--checkpoint", str(tmp_path / "nope.ckpt")), "not found")
    _one_line_error(run_cli("dynamics", "train", "--dataset", "md17"), "unknown dataset")


def test_alanine_dipeptide_md_is_reproducible_and_split_by_run(tmp_path):
    pytest.importorskip("openmm")
    from diffgen.data.md import MDSettings, run_path, save_run, simulate_run, system_info
    from diffgen.tasks.dynamics.config import dynamics_config_from_dict
    from diffgen.tasks.dynamics.common import pairs_dataset

    info = system_info()  # the shipped PDB loads with amber99sbildn + OBC
    assert info["types"].shape == (22,) and abs(info["charges"].sum()) < 1e-6
    s = MDSettings(n_frames=3, frame_ps=0.02, equil_ps=0.02, seed=4)
    a, b = simulate_run(s, 0), simulate_run(s, 0)
    np.testing.assert_array_equal(a["loc"], b["loc"])  # Reference platform: bit-reproducible
    assert a["loc"].shape == (3, 22, 3) and np.isfinite(a["vel"]).all()
    assert not np.array_equal(a["loc"], simulate_run(s, 1)["loc"])
    # split by trajectory: each run gets a distinct constant offset; no run lands in two splits
    cfg = dynamics_config_from_dict({"data": {"dataset": "alanine_dipeptide", "root": str(tmp_path), "md_runs": 5,
                                              "md_frames": 4, "md_valid_runs": 1, "md_test_runs": 1,
                                              "frame_in": 0, "frame_out": 1}})
    settings = MDSettings(n_runs=5, n_frames=4)
    for k in range(5):
        loc = np.full((4, 22, 3), 100.0 * k, dtype=np.float32)
        save_run(run_path(settings, k, tmp_path), {"loc": loc, "vel": np.zeros_like(loc)})
    seen = {}
    for split in ("train", "valid", "test"):
        ds = pairs_dataset(cfg, split)
        seen[split] = set(np.unique(ds.tensors[0].numpy()[:, 0, 0] // 100).astype(int).tolist())
        assert ds.tensors[0].shape[1:] == (22, 3) and ds.tensors[4].shape[1] == 22
    assert seen == {"train": {0, 1, 2}, "valid": {3}, "test": {4}}
    assert len(pairs_dataset(cfg, "train")) == 3 * 3  # 3 runs x (4 - 1) pairs


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
