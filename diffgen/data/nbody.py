"""Charged-particle N-body simulator and the EGNN N-body data set (frame 30 -> frame 40).

The system is the 3D charged-particle benchmark of Satorras et al. 2021 (EGNN, Sec. 5.1 / Table 2),
itself the 3D, wall-free version of the "charged particles" simulation of Kipf et al. 2018 (NRI):

* ``n`` particles (default 5) of unit mass, charges ``q_i = +1`` or ``-1`` with probability 1/2;
* initial positions ``~ N(0, 1) * (n / 5)^(1/3)``, initial velocities in a uniformly random
  direction with norm 0.5;
* force on ``i``: ``F_i = sum_j q_i q_j (x_i - x_j) / |x_i - x_j|^3`` (like charges repel), each
  component clipped to ``+-100`` (``clip=None`` turns the clipping off);
* symplectic-Euler ("leapfrog-style") integration with ``dt = 0.001``: one initial velocity kick,
  then ``x <- x + dt v``, ``v <- v + dt F(x)`` per step; no walls, no noise;
* frames are saved every 100 steps (frame ``k`` = step ``100 k``), 50 frames = 4,900 steps.

Units are the simulation's reduced units (length, time = 1 step / 0.001, charge = 1, mass = 1).
Every array keeps the trajectory axis first, so the integration is vectorised over trajectories:
the 7,000 trajectories of the benchmark take a few tens of seconds.

Data set (fixed seeds): 3,000 train / 2,000 valid / 2,000 test trajectories, input = positions and
velocities at frame 30, target = positions at frame 40. Generated once and cached as ``.npz`` in
``default_cache_dir()/nbody``, written atomically with a version/integrity stamp (:mod:`diffgen.data.cache`);
a missing, truncated, stale or swapped file is regenerated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffgen.data.cache import CacheError, default_cache_dir, note, verify, write_stamped
from diffgen.errors import DiffgenError

DT = 0.001
SAVE_EVERY = 100
N_FRAMES = 50
CLIP = 100.0  # = 0.1 / dt, as in Kipf et al. 2018
SPLIT_SEEDS = {"train": 1, "valid": 2, "test": 3}  # data-generation seeds of the three splits
SPLIT_SIZES = {"train": 3000, "valid": 2000, "test": 2000}
#: Format version of the cached split files (stamped; bump when the simulator or the file layout changes).
CACHE_VERSION = 1


def coulomb_forces(pos: np.ndarray, charges: np.ndarray, clip: float | None = CLIP) -> np.ndarray:
    """Pairwise Coulomb-like forces.

    Args:
        pos: ``[B, n, 3]`` positions.
        charges: ``[B, n]`` charges (+-1).
        clip: clip every force component to ``[-clip, clip]`` (None: no clipping).

    Returns:
        ``[B, n, 3]``: ``F_i = sum_{j != i} q_i q_j (x_i - x_j) / |x_i - x_j|^3``.
    """
    diff = pos[:, :, None, :] - pos[:, None, :, :]  # [B, n, n, 3], x_i - x_j
    dist2 = (diff ** 2).sum(-1)
    n = pos.shape[1]
    eye = np.eye(n, dtype=bool)[None]
    dist2 = np.where(eye, 1.0, dist2)
    qq = charges[:, :, None] * charges[:, None, :]
    mag = np.where(eye, 0.0, qq / dist2 ** 1.5)
    force = (mag[..., None] * diff).sum(2)
    if clip is not None:
        force = np.clip(force, -clip, clip)
    return force


def total_energy(pos: np.ndarray, vel: np.ndarray, charges: np.ndarray) -> np.ndarray:
    """Kinetic + Coulomb energy ``sum_i |v_i|^2 / 2 + sum_{i<j} q_i q_j / |x_i - x_j|``: ``[B]`` (unit masses)."""
    diff = pos[:, :, None, :] - pos[:, None, :, :]
    n = pos.shape[1]
    iu = np.triu_indices(n, 1)
    dist = np.sqrt((diff ** 2).sum(-1))[:, iu[0], iu[1]]
    qq = (charges[:, :, None] * charges[:, None, :])[:, iu[0], iu[1]]
    return 0.5 * (vel ** 2).sum((1, 2)) + (qq / dist).sum(1)


def initial_state(n_traj: int, n_particles: int, rng: np.random.Generator, vel_norm: float = 0.5,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random initial ``(pos [B, n, 3], vel [B, n, 3], charges [B, n])`` of the EGNN protocol."""
    charges = rng.choice(np.array([1.0, -1.0]), size=(n_traj, n_particles))
    pos = rng.standard_normal((n_traj, n_particles, 3)) * (n_particles / 5) ** (1 / 3)
    vel = rng.standard_normal((n_traj, n_particles, 3))
    vel *= vel_norm / np.linalg.norm(vel, axis=-1, keepdims=True)
    return pos, vel, charges


def simulate(pos: np.ndarray, vel: np.ndarray, charges: np.ndarray, n_frames: int = N_FRAMES,
             save_every: int = SAVE_EVERY, dt: float = DT, clip: float | None = CLIP,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Integrate a batch of trajectories (float64).

    Args:
        pos, vel: ``[B, n, 3]`` initial positions and velocities (frame 0).
        charges: ``[B, n]``.
        n_frames: frames to return (frame 0 is the initial state).
        save_every: integration steps between frames.
        dt: time step.
        clip: force-component clipping (None: off).

    Returns:
        ``(loc, vel)``, each ``[B, n_frames, n, 3]``.
    """
    pos = np.array(pos, dtype=np.float64)
    v = np.array(vel, dtype=np.float64)
    charges = np.asarray(charges, dtype=np.float64)
    if pos.ndim != 3 or pos.shape[-1] != 3 or v.shape != pos.shape or charges.shape != pos.shape[:2]:
        raise DiffgenError(f"simulate needs pos/vel [B, n, 3] and charges [B, n]; got {pos.shape}, {v.shape}, "
                           f"{charges.shape}")
    locs = np.empty((pos.shape[0], n_frames) + pos.shape[1:])
    vels = np.empty_like(locs)
    locs[:, 0], vels[:, 0] = pos, v
    v = v + dt * coulomb_forces(pos, charges, clip)  # initial kick (Kipf et al.)
    for frame in range(1, n_frames):
        for _ in range(save_every):
            pos = pos + dt * v
            force = coulomb_forces(pos, charges, clip)
            if _ == save_every - 1:
                locs[:, frame], vels[:, frame] = pos, v  # velocity saved before the last kick, as in NRI/EGNN
            v = v + dt * force
    return locs, vels


def generate_nbody(n_traj: int, seed: int, n_particles: int = 5, n_frames: int = N_FRAMES,
                   chunk: int = 4000) -> dict[str, np.ndarray]:
    """Deterministic trajectories for a seed: ``{"loc", "vel": [B, F, n, 3] float32, "charges": [B, n] float32}``."""
    rng = np.random.default_rng(seed)
    pos, vel, charges = initial_state(n_traj, n_particles, rng)
    locs, vels = [], []
    for start in range(0, n_traj, chunk):
        sl = slice(start, start + chunk)
        loc_c, vel_c = simulate(pos[sl], vel[sl], charges[sl], n_frames=n_frames)
        locs.append(loc_c.astype(np.float32))
        vels.append(vel_c.astype(np.float32))
    return {"loc": np.concatenate(locs), "vel": np.concatenate(vels), "charges": charges.astype(np.float32)}


def nbody_cache_path(split: str, n_traj: int, root: str | Path | None = None, seed_offset: int = 0) -> Path:
    """Cache file of one generated split: ``root/nbody/charged5_<split>_<n_traj>_seed<seed>.npz``."""
    base = Path(root) if root is not None else default_cache_dir()
    return base / "nbody" / f"charged5_{split}_{n_traj}_seed{SPLIT_SEEDS[split] + 1000 * seed_offset}.npz"


def _cache_counts(loc_shape) -> dict[str, int]:
    return {"trajectories": loc_shape[0], "frames": loc_shape[1], "particles": loc_shape[2]}


def save_nbody_cache(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Write trajectories as a stamped cache file, atomically (see :mod:`diffgen.data.cache`).

    Args:
        path: a :func:`nbody_cache_path`; its name is the stamped kind.
        data: ``{"loc", "vel": [B, F, n, 3], "charges": [B, n]}``.

    Raises:
        DiffgenError: inconsistent shapes.
    """
    path = Path(path)
    validate_trajectories(data, str(path))
    write_stamped(path, lambda tmp: np.savez(tmp, **data), f"nbody/{path.stem}", CACHE_VERSION,
                  _cache_counts(data["loc"].shape), suffix=".npz")


def load_nbody_split(split: str, n_traj: int | None = None, root: str | Path | None = None,
                     seed_offset: int = 0) -> dict[str, np.ndarray]:
    """The cached split (generated and written atomically on first use; regenerated if the file is broken).

    Args:
        split: train, valid or test.
        n_traj: number of trajectories (default: 3,000 / 2,000 / 2,000).
        root: cache root (default ``default_cache_dir()``); files go to ``root/nbody``.
        seed_offset: 0 for the benchmark; other values give independent data sets.

    Returns:
        ``{"loc", "vel": [n_traj, 50, 5, 3], "charges": [n_traj, 5]}`` float32 (reduced units).

    Raises:
        DiffgenError: unknown split, non-positive ``n_traj``, or a cache file still unusable after regenerating.
    """
    if split not in SPLIT_SEEDS:
        raise DiffgenError(f"unknown split {split!r}: choose train, valid or test")
    n_traj = SPLIT_SIZES[split] if n_traj is None else n_traj
    if n_traj < 1:
        raise DiffgenError(f"number of trajectories must be positive, got {n_traj}")
    path = nbody_cache_path(split, n_traj, root, seed_offset)
    kind, counts = f"nbody/{path.stem}", _cache_counts((n_traj, N_FRAMES, 5))
    try:
        verify(path, kind, CACHE_VERSION, counts)
    except CacheError as err:
        if err.reason != "missing":
            note(f"{err.path} is unusable ({err.reason}); regenerating it")
        save_nbody_cache(path, generate_nbody(n_traj, SPLIT_SEEDS[split] + 1000 * seed_offset))
        verify(path, kind, CACHE_VERSION, counts)
    return load_trajectories(path)


def load_trajectories(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate a trajectory ``.npz`` (``loc``, ``vel`` ``[B, F, n, 3]``; optional ``charges`` ``[B, n]``).

    Raises:
        DiffgenError: missing file or arrays, or inconsistent shapes (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise DiffgenError(f"trajectory file not found: {path}")
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error
        raise DiffgenError(f"cannot read trajectory file {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if "loc" not in data:
        raise DiffgenError(f"{path}: no 'loc' array (positions [trajectories, frames, atoms, 3])")
    data.setdefault("vel", None)
    if data["vel"] is None:
        data.pop("vel")
    validate_trajectories(data, str(path))
    return data


def validate_trajectories(data: dict, name: str = "trajectories") -> None:
    """Check ``loc``/``vel`` are ``[B, F, n, 3]`` with matching shapes, ``charges`` is ``[B, n]``, all finite.

    Raises:
        DiffgenError: a wrong shape, mismatched counts, or a NaN/inf value (one line naming the array).
    """
    loc = data["loc"]
    if loc.ndim != 4 or loc.shape[-1] != 3:
        raise DiffgenError(f"{name}: loc must have shape [trajectories, frames, atoms, 3], got {list(loc.shape)}")
    if "vel" in data and data["vel"].shape != loc.shape:
        raise DiffgenError(f"{name}: vel shape {list(data['vel'].shape)} does not match loc shape {list(loc.shape)} "
                           f"(mismatched atom or frame counts)")
    if "charges" in data and data["charges"].shape != loc.shape[:1] + loc.shape[2:3]:
        raise DiffgenError(f"{name}: charges shape {list(data['charges'].shape)} does not match "
                           f"{loc.shape[2]} atoms in {loc.shape[0]} trajectories (mismatched atom counts)")
    for key in ("loc", "vel", "charges"):
        if key in data and not np.isfinite(data[key]).all():
            raise DiffgenError(f"{name}: {key} holds NaN or infinite values")


@dataclass
class FramePairs:
    """Input/target pairs cut from trajectories: ``pos``, ``vel``, ``target`` ``[M, n, 3]``, ``charges`` ``[M, n]``."""

    pos: np.ndarray
    vel: np.ndarray
    charges: np.ndarray
    target: np.ndarray


def frame_pairs(data: dict, frame_in: int = 30, frame_out: int = 40, name: str = "trajectories") -> FramePairs:
    """Inputs at ``frame_in`` and targets at ``frame_out`` of every trajectory.

    Raises:
        DiffgenError: a requested frame does not exist, or inconsistent shapes.
    """
    validate_trajectories(data, name)
    n_frames = data["loc"].shape[1]
    for label, f in (("input", frame_in), ("target", frame_out)):
        if not 0 <= f < n_frames:
            raise DiffgenError(f"{name}: {label} frame {f} missing (trajectories have frames 0..{n_frames - 1})")
    loc = data["loc"]
    vel = data.get("vel")
    if vel is None:
        vel = np.zeros_like(loc)
    charges = data.get("charges")
    if charges is None:
        charges = np.zeros(loc.shape[:1] + loc.shape[2:3], dtype=loc.dtype)
    return FramePairs(pos=loc[:, frame_in], vel=vel[:, frame_in], charges=charges, target=loc[:, frame_out])
