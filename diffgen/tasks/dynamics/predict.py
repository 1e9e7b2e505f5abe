"""Predicted frames of one trajectory (N-body) or run (MD) of a split, ready to write as a multi-frame XYZ.

Imports only torch (not Lightning).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.errors import DiffgenError
from diffgen.tasks.dynamics.config import DynamicsConfig
from diffgen.tasks.dynamics.data import pairs_dataset
from diffgen.tasks.dynamics.evaluate import run_model

#: Pairs per forward pass when a whole MD run is predicted.
_CHUNK = 100


@dataclass
class FramePrediction:
    """Frames to write: ``symbols`` ``[n]`` (element per particle), ``frames`` ``[F, n, 3]`` (positions in the data's
    units: N-body units, Å for MD), one comment per frame, the mean position MSE of the predictions and a one-line
    ``summary`` (what was predicted, and that MSE with its unit)."""

    symbols: list[str]
    frames: torch.Tensor
    comments: list[str]
    mse: float
    summary: str


@torch.no_grad()
def predict_frames(model, cfg: DynamicsConfig, split: str = "test", index: int = 0) -> FramePrediction:
    """Predict one trajectory or run of ``split`` with ``model``.

    N-body: 3 frames for trajectory ``index`` (input frame, predicted target frame, true target frame); charges shown
    as Na (+1) / Cl (-1). Alanine dipeptide: for every frame t of run ``index``, the prediction of frame t + lag made
    from frame t (one-step predictions; each comment gives t and the frame's MSE in Å^2).

    Args:
        model: ``(pos, vel, charges, types) -> pos`` ahead, e.g. from :func:`diffgen.tasks.dynamics.checkpoints.load`.
        cfg: its config (data set, frames, cache root).
        split: test, valid or train.
        index: trajectory (N-body) or run (MD) index inside the split.

    Raises:
        DiffgenError: ``index`` out of range, or the data cannot be loaded.
    """
    model.eval()
    pos, vel, charges, target, types = pairs_dataset(cfg, split).tensors
    d = cfg.data
    if d.dataset == "nbody":
        if not 0 <= index < pos.shape[0]:
            raise DiffgenError(f"index {index} out of range: the {split} split has {pos.shape[0]} trajectories")
        sl = slice(index, index + 1)
        pred = run_model(model, pos[sl], vel[sl], charges[sl], types[sl])[0]
        mse = float((pred - target[index]).pow(2).mean())
        return FramePrediction(
            symbols=["Na" if q > 0 else "Cl" for q in charges[index].tolist()],
            frames=torch.stack([pos[index], pred, target[index]]),
            comments=[f"input frame {d.frame_in}", f"predicted frame {d.frame_out} (MSE {mse:.5f})",
                      f"true frame {d.frame_out}"],
            mse=mse, summary=f"trajectory {index} of {split}, frames {d.frame_in} -> {d.frame_out}, MSE {mse:.5f}")
    from diffgen.data.md import ELEMENTS

    per_run = d.md_frames - (d.frame_out - d.frame_in)
    n_runs = pos.shape[0] // per_run
    if not 0 <= index < n_runs:
        raise DiffgenError(f"index {index} out of range: the {split} split has {n_runs} runs")
    sl = slice(index * per_run, (index + 1) * per_run)
    pred = torch.cat([run_model(model, pos[sl][k:k + _CHUNK], vel[sl][k:k + _CHUNK], charges[sl][k:k + _CHUNK],
                                types[sl][k:k + _CHUNK]) for k in range(0, per_run, _CHUNK)])
    err = (pred - target[sl]).pow(2).mean(dim=(1, 2))
    lag_ps = (d.frame_out - d.frame_in) * d.md_frame_ps
    comments = [f"prediction of t = {(k * d.md_frame_ps) + lag_ps:g} ps from t = {k * d.md_frame_ps:g} ps "
                f"(MSE {float(e):.4f} A^2)" for k, e in enumerate(err)]
    mse = float(err.mean())
    return FramePrediction(symbols=[ELEMENTS[t] for t in types[sl][0].tolist()], frames=pred, comments=comments,
                           mse=mse, summary=f"{per_run} predicted frames of {split} run {index}, mean MSE {mse:.4f} Å^2")


def write_xyz_frames(path: str | Path, symbols: list[str], frames, comments: list[str]) -> None:
    """Write a multi-frame XYZ (plays in VMD, PyMOL, ASE, Ovito): ``frames`` ``[F, n, 3]``, one comment per frame.

    No overwrite check: callers check the path first (:func:`diffgen.checkpoint_files.check_writable`).
    """
    lines = []
    for xyz, comment in zip(frames, comments):
        lines.append(str(len(symbols)))
        lines.append(comment)
        lines.extend(f"{s:<2s} {x:12.5f} {y:12.5f} {z:12.5f}" for s, (x, y, z) in zip(symbols, xyz.tolist()))
    Path(path).write_text("\n".join(lines) + "\n")
