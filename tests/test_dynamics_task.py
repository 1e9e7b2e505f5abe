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

    from diffgen.tasks.dynamics.evaluate import evaluate_pairs

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


def _nbody_stand_in(root, n: int = 4):
    """Stand-in N-body caches (random walks, charges +-1) for every split: plumbing, not physics."""
    import numpy as np

    from diffgen.data.nbody import N_FRAMES, nbody_cache_path, save_nbody_cache

    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        loc = rng.standard_normal((n, N_FRAMES, 5, 3)).astype(np.float32)
        save_nbody_cache(nbody_cache_path(split, n, root), {"loc": loc, "vel": np.gradient(loc, axis=1),
                                                           "charges": np.sign(rng.standard_normal((n, 5)))})


def test_predict_frames_nbody_gives_input_prediction_and_truth(tmp_path):
    """N-body: the 3 frames are the input, the model's prediction and the true target of trajectory ``index``;
    the MSE is the prediction's; charges +1/-1 are shown as Na/Cl."""
    from diffgen.errors import DiffgenError
    from diffgen.tasks.dynamics.config import dynamics_config_from_dict
    from diffgen.tasks.dynamics.data import pairs_dataset
    from diffgen.tasks.dynamics.predict import predict_frames, write_xyz_frames

    _nbody_stand_in(tmp_path)
    cfg = dynamics_config_from_dict({"data": {"root": str(tmp_path), "n_train": 4, "n_valid": 4, "n_test": 4}})
    pos, vel, charges, target, _ = pairs_dataset(cfg, "valid").tensors
    tau = 0.5
    pred = predict_frames(_Shift(tau), cfg, "valid", 2)
    assert torch.equal(pred.frames[0], pos[2]) and torch.equal(pred.frames[2], target[2])
    torch.testing.assert_close(pred.frames[1], pos[2] + tau * vel[2])
    assert pred.mse == pytest.approx(float((pos[2] + tau * vel[2] - target[2]).pow(2).mean()), rel=1e-6)
    assert pred.symbols == ["Na" if q > 0 else "Cl" for q in charges[2].tolist()]
    assert pred.comments[0] == "input frame 30" and pred.comments[2] == "true frame 40"
    write_xyz_frames(tmp_path / "p.xyz", pred.symbols, pred.frames, pred.comments)
    lines = (tmp_path / "p.xyz").read_text().splitlines()
    assert len(lines) == 3 * (2 + 5) and lines[0] == "5" and lines[9].split()[0] == pred.symbols[0]
    assert [float(x) for x in lines[9].split()[1:]] == pytest.approx(pred.frames[1][0].tolist(), abs=1e-5)
    with pytest.raises(DiffgenError, match="index 4 out of range: the valid split has 4 trajectories"):
        predict_frames(_Shift(tau), cfg, "valid", 4)


def test_predict_frames_md_predicts_every_frame_of_one_run(tmp_path):
    """Alanine dipeptide: one prediction per frame t of run ``index`` (t + lag from t); with the identity model each
    frame's MSE is the squared displacement over the lag (here every atom moves by (1, 1, 1) Å per frame)."""
    pytest.importorskip("openmm")  # the atom types come from the force field
    import numpy as np

    from diffgen.data.md import MDSettings, run_path, save_run
    from diffgen.errors import DiffgenError
    from diffgen.tasks.dynamics.config import dynamics_config_from_dict
    from diffgen.tasks.dynamics.predict import predict_frames

    cfg = dynamics_config_from_dict({"data": {"dataset": "alanine_dipeptide", "root": str(tmp_path), "md_runs": 4,
                                              "md_frames": 6, "md_frame_ps": 2.0, "md_valid_runs": 1,
                                              "md_test_runs": 1, "frame_in": 0, "frame_out": 2}})
    settings = MDSettings(n_runs=4, n_frames=6, frame_ps=2.0)
    for k in range(4):
        loc = 100.0 * k + np.arange(6, dtype=np.float32)[:, None, None] + np.zeros((6, 22, 3), dtype=np.float32)
        save_run(run_path(settings, k, tmp_path), {"loc": loc, "vel": np.zeros_like(loc)})
    pred = predict_frames(_Shift(0.0), cfg, "train", 1)
    assert pred.frames.shape == (6 - 2, 22, 3)  # frames 0..3 predict 2..5
    assert torch.equal(pred.frames[:, 0, 0], torch.tensor([100.0, 101.0, 102.0, 103.0]))  # run 1, identity
    assert pred.mse == pytest.approx(2.0 ** 2)  # displacement (2, 2, 2) Å over the lag: mean square 4 Å^2
    assert pred.comments[1] == "prediction of t = 6 ps from t = 2 ps (MSE 4.0000 A^2)"
    assert sorted(pred.symbols) == sorted("C" * 6 + "H" * 12 + "N" * 2 + "O" * 2)  # Ace-Ala-NMe: C6H12N2O2
    with pytest.raises(DiffgenError, match="index 2 out of range: the train split has 2 runs"):
        predict_frames(_Shift(0.0), cfg, "train", 2)
