"""Dynamics data: the charged N-body simulator (diffgen.data.nbody), its split caches and frame pairs, and the
alanine dipeptide MD runs (diffgen.data.md) split by trajectory."""
from __future__ import annotations

import numpy as np
import pytest

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


def test_alanine_dipeptide_md_is_reproducible_and_split_by_run(tmp_path):
    pytest.importorskip("openmm")
    from diffgen.data.md import MDSettings, run_path, save_run, simulate_run, system_info
    from diffgen.tasks.dynamics.config import dynamics_config_from_dict
    from diffgen.tasks.dynamics.data import pairs_dataset

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
