"""Real molecular dynamics trajectories with OpenMM: alanine dipeptide in implicit solvent.

System: ACE-ALA-NME (22 atoms, ``diffgen/data/alanine_dipeptide.pdb``, built for diffgen from standard
peptide geometry with L-alanine chirality, hydrogens added by OpenMM's Modeller, energy-minimised),
Amber ff99SB-ILDN (``amber99sbildn.xml``) with OBC implicit solvent (``amber99_obc.xml``), no cutoff.
Dynamics: Langevin (``LangevinMiddleIntegrator``) at 300 K, friction 1/ps, time step 2 fs, bonds to
hydrogen constrained; each run is minimised, equilibrated for ``equil_ps`` and then saves positions (Å)
and velocities (Å/ps) every ``frame_ps``. OpenMM's Reference platform with
``integrator.setRandomNumberSeed(seed)`` and ``setVelocitiesToTemperature(T, seed)`` makes every run
bit-reproducible for its seed.

Cache: one ``.npz`` per run under ``default_cache_dir()/md/alanine_dipeptide``, written atomically with a
version/integrity stamp (:mod:`diffgen.data.cache`), so an interrupted ``diffgen dynamics simulate`` resumes at
the first missing run and re-simulates runs whose file is broken.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffgen.data.cache import CacheError, default_cache_dir, note, verify, write_stamped
from diffgen.errors import DiffgenError

PDB_PATH = Path(__file__).with_name("alanine_dipeptide.pdb")
ELEMENTS = ("H", "C", "N", "O")
#: Format version of the cached run files (stamped; bump when the simulation protocol or the layout changes).
CACHE_VERSION = 1


@dataclass
class MDSettings:
    n_runs: int = 12
    n_frames: int = 500
    frame_ps: float = 1.0
    equil_ps: float = 10.0
    temperature_k: float = 300.0
    friction_per_ps: float = 1.0
    timestep_fs: float = 2.0
    seed: int = 0  # run k uses seed + k

    def tag(self) -> str:
        return (f"f{self.n_frames}_dt{self.frame_ps:g}ps_eq{self.equil_ps:g}_T{self.temperature_k:g}"
                f"_g{self.friction_per_ps:g}_ts{self.timestep_fs:g}")


def md_cache_dir(root: str | Path | None = None) -> Path:
    """Folder of the cached runs: ``root/md/alanine_dipeptide`` (root default ``default_cache_dir()``)."""
    return (Path(root) if root is not None else default_cache_dir()) / "md" / "alanine_dipeptide"


def run_path(settings: MDSettings, k: int, root: str | Path | None = None) -> Path:
    """Cache file of run ``k`` (seed ``settings.seed + k``) under :func:`md_cache_dir`."""
    return md_cache_dir(root) / f"run_seed{settings.seed + k}_{settings.tag()}.npz"


def save_run(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Write one run ``{"loc", "vel": [frames, atoms, 3]}`` (Å, Å/ps) as a stamped cache file, atomically."""
    path = Path(path)
    loc = data["loc"]
    if loc.ndim != 3 or loc.shape[-1] != 3 or data["vel"].shape != loc.shape:
        raise DiffgenError(f"{path}: an MD run needs loc and vel of shape [frames, atoms, 3], "
                           f"got {list(loc.shape)} and {list(data['vel'].shape)}")
    write_stamped(path, lambda tmp: np.savez(tmp, loc=loc, vel=data["vel"]), f"md/{path.stem}", CACHE_VERSION,
                  {"frames": loc.shape[0], "atoms": loc.shape[1]}, suffix=".npz")


def _verify_run(settings: MDSettings, k: int, root: str | Path | None = None) -> None:
    path = run_path(settings, k, root)
    verify(path, f"md/{path.stem}", CACHE_VERSION, {"frames": settings.n_frames},
           fix="run `diffgen dynamics simulate` to simulate it again")


def _openmm():
    try:
        import openmm
        from openmm import app, unit
    except ImportError:
        raise DiffgenError("OpenMM is not installed: pip install 'diffgen[md]' (or 'openmm>=8.1')") from None
    return openmm, app, unit


def system_info() -> dict[str, np.ndarray]:
    """``types`` ``[22]`` (index into ``ELEMENTS``) and force-field partial ``charges`` ``[22]`` (e)."""
    openmm, app, unit = _openmm()
    pdb = app.PDBFile(str(PDB_PATH))
    ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    charges = np.array([nb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                        for i in range(system.getNumParticles())])
    types = np.array([ELEMENTS.index(a.element.symbol) for a in pdb.topology.atoms()])
    return {"types": types, "charges": charges}


def simulate_run(settings: MDSettings, k: int, progress=None) -> dict[str, np.ndarray]:
    """One run: ``loc`` and ``vel`` ``[n_frames, 22, 3]`` (Å, Å/ps), float32, seed ``settings.seed + k``."""
    openmm, app, unit = _openmm()
    seed = settings.seed + k
    pdb = app.PDBFile(str(PDB_PATH))
    ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    integ = openmm.LangevinMiddleIntegrator(settings.temperature_k * unit.kelvin,
                                            settings.friction_per_ps / unit.picosecond,
                                            settings.timestep_fs * unit.femtoseconds)
    integ.setRandomNumberSeed(seed + 1)  # 0 would mean "pick a random seed"
    sim = app.Simulation(pdb.topology, system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(pdb.positions)
    sim.minimizeEnergy()
    sim.context.setVelocitiesToTemperature(settings.temperature_k * unit.kelvin, seed + 1)
    steps_per_frame = round(settings.frame_ps * 1000 / settings.timestep_fs)
    sim.step(round(settings.equil_ps * 1000 / settings.timestep_fs))
    n = system.getNumParticles()
    loc = np.empty((settings.n_frames, n, 3), dtype=np.float32)
    vel = np.empty_like(loc)
    for f in range(settings.n_frames):
        if f:
            sim.step(steps_per_frame)
        st = sim.context.getState(getPositions=True, getVelocities=True)
        loc[f] = st.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        vel[f] = st.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.picosecond)
        if progress is not None:
            progress(1)
    return {"loc": loc, "vel": vel}


def simulate_all(settings: MDSettings, root: str | Path | None = None, progress=None) -> list[Path]:
    """Run (or resume) every run that is not cached yet, or whose file is broken; returns the run files in run order."""
    paths = []
    for k in range(settings.n_runs):
        path = run_path(settings, k, root)
        try:
            _verify_run(settings, k, root)
            if progress is not None:
                progress(settings.n_frames)
        except CacheError as err:
            if err.reason != "missing":
                note(f"{err.path} is unusable ({err.reason}); simulating it again")
            save_run(path, simulate_run(settings, k, progress))
        paths.append(path)
    return paths


def load_md(settings: MDSettings, root: str | Path | None = None) -> dict[str, np.ndarray]:
    """All cached runs: ``loc``/``vel`` ``[runs, frames, 22, 3]``, ``charges`` ``[runs, 22]``, ``types`` ``[22]``.

    Raises:
        DiffgenError: runs missing from the cache (with the command that makes them), or a broken run file
            (missing or wrong stamp, truncated, modified; with the command that redoes it).
    """
    missing = [k for k in range(settings.n_runs) if not run_path(settings, k, root).is_file()]
    if missing:
        raise DiffgenError(f"{len(missing)} of {settings.n_runs} MD runs not simulated yet (cache "
                           f"{md_cache_dir(root)}): run `diffgen dynamics simulate` first")
    runs = []
    for k in range(settings.n_runs):
        _verify_run(settings, k, root)
        path = run_path(settings, k, root)
        try:
            with np.load(path) as z:
                runs.append({"loc": z["loc"], "vel": z["vel"]})
        except Exception as exc:  # noqa: BLE001 - a stamped file that does not load is a cache problem
            raise CacheError(path, f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                             "run `diffgen dynamics simulate` to simulate it again") from None
    info = system_info()
    loc = np.stack([r["loc"] for r in runs])
    return {"loc": loc, "vel": np.stack([r["vel"] for r in runs]),
            "charges": np.broadcast_to(info["charges"], loc.shape[:1] + loc.shape[2:3]).astype(np.float32),
            "types": info["types"]}
