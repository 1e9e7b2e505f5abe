"""Physics checks of 3D molecules: PoseBusters geometry checks and a GFN2-xTB relaxation (tblite).

For every molecule ``(z, pos)`` (atomic numbers (n,), positions (n, 3) in Å):

* **PoseBusters** (Buttenschoen, Morris & Deane 2024, "PoseBusters: AI-based docking methods fail to generate
  physically valid poses or generalise to novel sequences", Chem. Sci. 15, 3130), molecule-only ``"mol"``
  configuration: loading, sanitization, InChI, connectivity, radicals, bond lengths / angles and internal clashes
  against RDKit distance-geometry bounds, ring and double-bond flatness, and the internal-energy ratio against an
  ETKDG/UFF conformer ensemble. It runs on the molecules RDKit can read, i.e. those whose RDKit molecule built from
  the EDM distance-inferred bonds (:func:`diffgen.eval.chem.to_rdkit`) passes ``Chem.SanitizeMol``, which is EDM
  validity; the other molecules get no PoseBusters result.
* **GFN2-xTB** (Bannwarth, Ehlert & Grimme 2019, J. Chem. Theory Comput. 15, 1652) through ``tblite``: a single
  point at the given geometry (neutral; one unpaired electron when the electron count is odd) and, unless asked not
  to, a relaxation to the nearest local minimum with SciPy's L-BFGS-B on the Cartesian coordinates (Byrd, Lu,
  Nocedal & Zhu 1995), using tblite's analytic gradient. It stops when the largest gradient component is below
  ``fmax`` (default 1e-3 Eh/bohr, about 0.05 eV/Å, the usual ASE ``fmax``) or after ``max_steps`` energy + gradient
  evaluations, so one molecule takes bounded time. Reported: the relaxation energy
  ``E(initial) - E(relaxed)`` in kcal/mol (>= 0 up to the stopping tolerance), the heavy-atom RMSD between the
  initial and relaxed geometries after optimal superposition (RDKit ``rdMolAlign.AlignMol`` on the identity atom
  map: Kabsch rotation + translation, no reflection, no symmetry relabelling since atoms keep their identity), and
  whether the EDM bond graph (:func:`diffgen.eval.bonds.bond_orders`) survives: ``graph_kept`` (same bonded pairs),
  ``orders_kept`` (same bond orders too) and ``stable_relaxed`` (EDM stability of the relaxed geometry).

The optional packages come from the ``check`` extra (``pip install 'diffgen[check]'``); :func:`require_check_extra`
turns their absence into a one-line :class:`~diffgen.errors.DiffgenError`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdMolAlign
from rdkit.rdBase import BlockLogs

from diffgen.errors import DiffgenError
from diffgen.eval.bonds import as_numpy_molecule, bond_orders, type_indices
from diffgen.eval.chem import to_rdkit, valid_smiles
from diffgen.eval.stability import molecule_stable

__all__ = [
    "HARTREE_TO_KCAL_PER_MOL",
    "BOHR_IN_ANGSTROM",
    "DEFAULT_FMAX",
    "DEFAULT_MAX_STEPS",
    "POSEBUSTERS_CHECKS",
    "CSV_COLUMNS",
    "require_check_extra",
    "XtbRelaxation",
    "xtb_relax",
    "heavy_atom_rmsd",
    "DEFAULT_PB_TIMEOUT",
    "PoseBustersRunner",
    "check_molecules",
    "summarize",
]

#: kcal/mol per hartree (CODATA 2018: 4.3597447222071e-18 J x N_A / 4184 J/kcal).
HARTREE_TO_KCAL_PER_MOL = 627.5094740631
#: Å per bohr (CODATA 2018).
BOHR_IN_ANGSTROM = 0.529177210903
#: Convergence threshold of the relaxation: largest gradient component, Eh/bohr (1e-3 Eh/bohr = 0.0514 eV/Å).
DEFAULT_FMAX = 1e-3
#: Cap on energy + gradient evaluations per relaxation (QM9-size molecule: ~10 ms each on one core).
DEFAULT_MAX_STEPS = 300

#: The pass/fail columns of PoseBusters' "mol" configuration (posebusters 0.6), in its order.
POSEBUSTERS_CHECKS = (
    "mol_pred_loaded", "sanitization", "inchi_convertible", "all_atoms_connected", "no_radicals", "bond_lengths",
    "bond_angles", "internal_steric_clash", "aromatic_ring_flatness", "non-aromatic_ring_non-flatness",
    "double_bond_flatness", "internal_energy",
)

#: Columns of the per-molecule CSV, in order (see :func:`check_molecules`).
CSV_COLUMNS = (
    "index", "n_atoms", "smiles", "valid", "mol_stable",
    "pb_checked", "pb_pass", "pb_failed", *(f"pb_{c}" for c in POSEBUSTERS_CHECKS),
    "unpaired_electrons", "xtb_energy_hartree", "relaxed_energy_hartree", "relax_energy_kcal_mol",
    "heavy_rmsd_angstrom", "graph_kept", "orders_kept", "stable_relaxed", "relax_steps", "relax_converged",
    "final_max_gradient", "xtb_error", "pb_timed_out", "pb_seconds", "xtb_seconds",
)


def require_check_extra() -> None:
    """Check that the ``check`` extra (posebusters, tblite, scipy) is importable.

    Raises:
        DiffgenError: one line naming the missing package(s) and ``pip install 'diffgen[check]'``.
    """
    missing = []
    for module, package in (("posebusters", "posebusters"), ("tblite.interface", "tblite"),
                            ("scipy.optimize", "scipy")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise DiffgenError(f"physics checks need {', '.join(missing)}, not installed: pip install 'diffgen[check]'")


def _calculator(z: np.ndarray, pos_bohr: np.ndarray):
    from tblite.interface import Calculator

    uhf = int(z.sum()) % 2  # neutral molecule; an odd electron count leaves one unpaired electron
    calc = Calculator("GFN2-xTB", z, pos_bohr, charge=0.0, uhf=uhf)
    calc.set("verbosity", 0)
    return calc, uhf


@dataclass
class XtbRelaxation:
    """Result of :func:`xtb_relax`. Energies in hartree, positions in Å, gradient in Eh/bohr."""

    energy_initial: float
    energy_final: float
    pos_final: np.ndarray  # (n, 3) Å
    steps: int  # energy + gradient evaluations, the single point included
    converged: bool
    max_gradient: float  # largest |gradient component| at pos_final, Eh/bohr
    unpaired_electrons: int

    @property
    def relaxation_energy_kcal_mol(self) -> float:
        """``E(initial) - E(final)`` in kcal/mol."""
        return (self.energy_initial - self.energy_final) * HARTREE_TO_KCAL_PER_MOL


def xtb_relax(z, pos, max_steps: int = DEFAULT_MAX_STEPS, fmax: float = DEFAULT_FMAX) -> XtbRelaxation:
    """GFN2-xTB single point and relaxation of one neutral molecule (tblite + SciPy L-BFGS-B).

    Args:
        z: atomic numbers, shape (n,).
        pos: positions in Å, shape (n, 3).
        max_steps: cap on energy + gradient evaluations (0: single point only, ``pos_final = pos``).
        fmax: stop when every gradient component is below this, Eh/bohr.

    Returns:
        :class:`XtbRelaxation`; ``converged`` is False when the cap was hit first.

    Raises:
        DiffgenError: malformed molecule, unsupported elements, negative ``max_steps``.
        tblite.exceptions.TBLiteRuntimeError (or another tblite error): the SCF failed, e.g. for overlapping atoms.

    Source: Bannwarth et al. 2019 (GFN2-xTB); the optimizer is scipy.optimize.minimize(method="L-BFGS-B").
    """
    from scipy.optimize import minimize

    z, pos = as_numpy_molecule(z, pos)
    type_indices(z)
    if max_steps < 0:
        raise DiffgenError(f"max_steps must be >= 0, got {max_steps}")
    x0 = pos / BOHR_IN_ANGSTROM
    calc, uhf = _calculator(z, x0)
    res0 = calc.singlepoint()
    e0 = float(res0.get("energy"))
    g0 = np.asarray(res0.get("gradient"), dtype=np.float64)
    if max_steps == 0:
        return XtbRelaxation(e0, e0, pos.copy(), 1, bool(np.abs(g0).max() < fmax), float(np.abs(g0).max()), uhf)
    cache: dict[bytes, tuple[float, np.ndarray]] = {x0.tobytes(): (e0, g0)}
    evaluations = [1]

    def energy_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        key = flat.tobytes()
        if key not in cache:
            calc.update(positions=flat.reshape(-1, 3))
            res = calc.singlepoint()
            evaluations[0] += 1
            cache.clear()  # L-BFGS-B only ever asks again for the last point
            cache[key] = (float(res.get("energy")), np.asarray(res.get("gradient"), dtype=np.float64))
        e, g = cache[key]
        return e, g.ravel()

    out = minimize(energy_and_gradient, x0.ravel(), jac=True, method="L-BFGS-B",
                   options={"maxfun": max_steps, "maxiter": max_steps, "gtol": fmax})
    e1, g1 = energy_and_gradient(out.x)
    gmax = float(np.abs(g1).max())
    # L-BFGS-B may keep the start when no step lowers the energy; never report a higher energy than the start
    if e1 > e0:
        e1, g1, x1, gmax = e0, g0, x0.ravel(), float(np.abs(g0).max())
    else:
        x1 = out.x
    return XtbRelaxation(e0, e1, x1.reshape(-1, 3) * BOHR_IN_ANGSTROM, evaluations[0], gmax < fmax, gmax, uhf)


def heavy_atom_rmsd(z, pos_ref, pos) -> float:
    """RMSD (Å) of the heavy atoms of ``pos`` to ``pos_ref`` after optimal superposition.

    Atom ``i`` of one geometry is matched to atom ``i`` of the other (the same molecule before and after a
    relaxation); RDKit's ``rdMolAlign.AlignMol`` finds the rotation + translation (Kabsch; no reflection) that
    minimises the RMSD over the heavy atoms (``z > 1``). Shapes: ``z`` (n,), ``pos_ref`` and ``pos`` (n, 3), Å.

    Raises:
        DiffgenError: malformed shapes or elements outside H, C, N, O, F.
    """
    z, pos_ref = as_numpy_molecule(z, pos_ref)
    _, pos = as_numpy_molecule(z, pos)
    heavy = np.flatnonzero(z > 1)
    if heavy.size <= 1:
        return 0.0
    no_bonds = np.zeros((z.size, z.size), dtype=np.int64)
    ref = to_rdkit(z, pos_ref, bonds=no_bonds)
    prb = to_rdkit(z, pos, bonds=no_bonds)
    return float(rdMolAlign.AlignMol(prb, ref, atomMap=[(int(i), int(i)) for i in heavy]))


def _sanitized(z, pos) -> Chem.Mol | None:
    """The RDKit molecule from EDM bonds with its conformer, sanitized; None when RDKit rejects it (EDM-invalid)."""
    mol = to_rdkit(z, pos).GetMol()
    block = BlockLogs()
    try:
        Chem.SanitizeMol(mol)
    except Exception:
        return None
    finally:
        del block
    return mol


def _posebusters_config(name: str) -> dict:
    """PoseBusters' packaged config ``name`` ("mol" or "mol_fast") with every module single-threaded.

    Its internal-energy module would otherwise run ETKDG and UFF on all cores (``num_threads=0``).
    """
    from importlib import resources

    import yaml

    text = resources.files("posebusters").joinpath("config", f"{name}.yml").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    for module in config.get("modules", []):
        if module.get("function") == "energy_ratio":
            module.setdefault("parameters", {})["num_threads"] = 1
    return config


def _bust(buster, mol: Chem.Mol) -> dict:
    """``{check: True | False | None}`` for one molecule (None: PoseBusters could not compute that check)."""
    import logging
    import warnings

    logging.getLogger("posebusters").setLevel(logging.ERROR)
    block = BlockLogs()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = buster.bust([mol], full_report=False).iloc[0].to_dict()
    finally:
        del block
    out = {}
    for key, value in row.items():
        if isinstance(value, (bool, np.bool_)):
            out[key] = bool(value)
        elif isinstance(value, float) and math.isnan(value):  # e.g. ETKDG could not embed the energy ensemble
            out[key] = None
    return out


def _posebusters_worker(conn) -> None:
    """Worker process of :class:`PoseBustersRunner`: binary RDKit molecules in, check dicts out, None to stop."""
    from posebusters import PoseBusters

    buster = PoseBusters(config=_posebusters_config("mol"), max_workers=0)
    conn.send("ready")
    while True:
        data = conn.recv()
        if data is None:
            break
        conn.send(_bust(buster, Chem.Mol(data)))


#: Time limit of the full PoseBusters "mol" checks of one molecule, seconds (see :class:`PoseBustersRunner`).
DEFAULT_PB_TIMEOUT = 20.0
_WORKER_START_TIMEOUT = 120.0  # importing rdkit, torch (via diffgen) and posebusters on a loaded machine


class PoseBustersRunner:
    """PoseBusters "mol" checks with a time limit per molecule.

    The checks run in a worker process. Its internal-energy check embeds a 50-conformer ETKDG ensemble, which on
    some strained QM9 cages keeps retrying for minutes before giving up; when a molecule takes longer than
    ``timeout`` seconds the worker is killed (and restarted for the next molecule) and the molecule gets the checks
    of PoseBusters' "mol_fast" config (the same checks less the internal energy) run here, with
    ``internal_energy`` None and ``timed_out`` True. Use as a context manager, or call :meth:`close`.

    Raises:
        DiffgenError: the ``check`` extra is missing.
    """

    def __init__(self, timeout: float = DEFAULT_PB_TIMEOUT):
        require_check_extra()
        self.timeout = float(timeout)
        self._proc = None
        self._conn = None
        self._fast = None

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch / OpenMP threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_posebusters_worker, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        ready = self._conn.poll(_WORKER_START_TIMEOUT) and self._conn.recv() == "ready"
        if not ready:
            self._kill()
            raise DiffgenError(f"the PoseBusters worker process did not start within {_WORKER_START_TIMEOUT:g} s")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def check(self, mol: Chem.Mol) -> dict:
        """The checks of one sanitized molecule with a 3D conformer.

        Returns:
            ``{check: True | False | None, ..., "timed_out": bool}`` over :data:`POSEBUSTERS_CHECKS`.
        """
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._conn.send(mol.ToBinary(Chem.PropertyPickleOptions.AllProps))
        if self._conn.poll(self.timeout):
            try:
                return {**self._conn.recv(), "timed_out": False}
            except EOFError:  # the worker died: treated like a timeout
                pass
        self._kill()
        if self._fast is None:
            from posebusters import PoseBusters

            self._fast = PoseBusters(config=_posebusters_config("mol_fast"), max_workers=0)
        result = _bust(self._fast, mol)
        result["internal_energy"] = None
        return {**result, "timed_out": True}

    def close(self) -> None:
        """Stop the worker process."""
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=5)
            except (OSError, EOFError):
                pass
        self._kill()

    def __enter__(self) -> PoseBustersRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def check_molecules(
    molecules: Iterable,
    relax: bool = True,
    max_steps: int = DEFAULT_MAX_STEPS,
    fmax: float = DEFAULT_FMAX,
    progress: Callable[[int], None] | None = None,
    pb_timeout: float = DEFAULT_PB_TIMEOUT,
) -> list[dict]:
    """Run the PoseBusters and GFN2-xTB checks on every molecule.

    Args:
        molecules: iterable of ``(z, pos)``: z (n,) int, pos (n, 3) Å.
        relax: relax with GFN2-xTB (False: single point only; the relaxation columns are None).
        max_steps: cap on energy + gradient evaluations per relaxation.
        fmax: relaxation threshold on the largest gradient component, Eh/bohr.
        progress: called with 1 after each molecule.
        pb_timeout: time limit of the full PoseBusters checks of one molecule, seconds (see
            :class:`PoseBustersRunner`).

    Returns:
        one dict per molecule with the keys :data:`CSV_COLUMNS` (``index`` 1-based; booleans, floats rounded, None
        when not applicable): EDM ``smiles`` / ``valid`` / ``mol_stable``; ``pb_checked`` (RDKit could read it),
        ``pb_pass`` (no PoseBusters check fails; a check PoseBusters could not compute, None, does not count),
        ``pb_failed`` (names of the failed checks, ``;``-separated), one ``pb_<check>`` column each and
        ``pb_timed_out`` (the internal-energy check hit ``pb_timeout``); the xTB energies (hartree), relaxation energy (kcal/mol), heavy-atom RMSD
        (Å), ``graph_kept`` / ``orders_kept`` / ``stable_relaxed``, relaxation steps, convergence, final largest
        gradient component (Eh/bohr), ``xtb_error`` (the tblite error message when its SCF failed) and the seconds
        spent in each tool.

    Raises:
        DiffgenError: missing ``check`` extra, malformed molecules, unsupported elements.
    """
    require_check_extra()
    if max_steps < 1 and relax:
        raise DiffgenError(f"--max-steps must be >= 1 to relax, got {max_steps}")
    with PoseBustersRunner(timeout=pb_timeout) as buster:
        return [_check_one(k, z, pos, buster, relax, max_steps, fmax, progress)
                for k, (z, pos) in enumerate(molecules, start=1)]


def _check_one(k: int, z, pos, buster: PoseBustersRunner, relax: bool, max_steps: int, fmax: float,
               progress: Callable[[int], None] | None) -> dict:
    """The row of :func:`check_molecules` for molecule ``k`` (1-based)."""
    z, pos = as_numpy_molecule(z, pos)
    bonds = bond_orders(z, pos)
    stable, _, _ = molecule_stable(z, pos, bonds)
    smiles = valid_smiles(to_rdkit(z, pos, bonds, add_conformer=False))
    row: dict = dict.fromkeys(CSV_COLUMNS)
    row.update(index=k, n_atoms=int(z.size), smiles=smiles, valid=smiles is not None, mol_stable=stable)
    mol = _sanitized(z, pos) if smiles is not None else None
    row["pb_checked"] = mol is not None
    if mol is not None:
        start = time.perf_counter()
        pb = buster.check(mol)
        row["pb_seconds"] = round(time.perf_counter() - start, 3)
        row["pb_timed_out"] = pb.pop("timed_out")
        for check, ok in pb.items():
            row[f"pb_{check}"] = ok
        row["pb_pass"] = not any(ok is False for ok in pb.values())
        row["pb_failed"] = ";".join(c for c, ok in pb.items() if ok is False)
    start = time.perf_counter()
    try:
        rel = xtb_relax(z, pos, max_steps=max_steps if relax else 0, fmax=fmax)
    except DiffgenError:
        raise
    except Exception as exc:  # tblite's SCF failure (e.g. atoms on top of each other): recorded, not fatal
        row["xtb_error"] = " ".join(str(exc).split())[:200] or type(exc).__name__
    else:
        row.update(unpaired_electrons=rel.unpaired_electrons, xtb_energy_hartree=_fmt(rel.energy_initial, 8))
        if relax:
            bonds1 = bond_orders(z, rel.pos_final)
            row.update(
                relaxed_energy_hartree=_fmt(rel.energy_final, 8),
                relax_energy_kcal_mol=_fmt(rel.relaxation_energy_kcal_mol, 4),
                heavy_rmsd_angstrom=_fmt(heavy_atom_rmsd(z, pos, rel.pos_final), 4),
                graph_kept=bool(np.array_equal(bonds > 0, bonds1 > 0)),
                orders_kept=bool(np.array_equal(bonds, bonds1)),
                stable_relaxed=molecule_stable(z, rel.pos_final, bonds1)[0],
                relax_steps=rel.steps, relax_converged=rel.converged,
                final_max_gradient=_fmt(rel.max_gradient, 6),
            )
    row["xtb_seconds"] = round(time.perf_counter() - start, 3)
    if progress is not None:
        progress(1)
    return row


def _quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"q10": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q90": float(q[4]),
            "max": float(np.max(values))}


def summarize(rows: Sequence[dict]) -> dict:
    """Aggregate :func:`check_molecules` rows.

    Returns:
        dict with counts (``n_molecules``, ``n_valid``, ``n_pb_checked``, ``n_xtb_ok``, ``n_relaxed``), fractions in
        [0, 1] (``pb_pass_rate_checked`` over the molecules PoseBusters checked, ``pb_pass_rate_all`` over all,
        ``graph_kept_rate``, ``orders_kept_rate``, ``stable_relaxed_rate``, ``converged_rate`` over the relaxed
        ones), ``pb_fail_counts`` (failures per check), ``pb_not_computed_counts`` (checks PoseBusters left
        undecided, per check), ``n_pb_timed_out``, quantiles (q10, q25, median, q75, q90, max) of
        ``relax_energy_kcal_mol`` and ``heavy_rmsd_angstrom``, and mean seconds per molecule (``pb_seconds``,
        ``xtb_seconds``). A rate is None when its denominator is 0.
    """
    def rate(num: int, den: int) -> float | None:
        return num / den if den else None

    n = len(rows)
    checked = [r for r in rows if r["pb_checked"]]
    xtb_ok = [r for r in rows if r["xtb_energy_hartree"] is not None]
    relaxed = [r for r in rows if r["relax_energy_kcal_mol"] is not None]
    fails: dict[str, int] = {}
    for r in checked:
        for c in filter(None, (r["pb_failed"] or "").split(";")):
            fails[c] = fails.get(c, 0) + 1
    return {
        "n_molecules": n,
        "n_valid": sum(bool(r["valid"]) for r in rows),
        "n_mol_stable": sum(bool(r["mol_stable"]) for r in rows),
        "n_pb_checked": len(checked),
        "pb_pass_rate_checked": rate(sum(bool(r["pb_pass"]) for r in checked), len(checked)),
        "pb_pass_rate_all": rate(sum(bool(r["pb_pass"]) for r in checked), n),
        "pb_fail_counts": dict(sorted(fails.items(), key=lambda kv: -kv[1])),
        "pb_not_computed_counts": {c: sum(r.get(f"pb_{c}") is None for r in checked) for c in POSEBUSTERS_CHECKS
                                   if any(r.get(f"pb_{c}") is None for r in checked)},
        "n_pb_timed_out": sum(bool(r["pb_timed_out"]) for r in checked),
        "n_xtb_ok": len(xtb_ok),
        "n_relaxed": len(relaxed),
        "relax_energy_kcal_mol": _quantiles([r["relax_energy_kcal_mol"] for r in relaxed]),
        "heavy_rmsd_angstrom": _quantiles([r["heavy_rmsd_angstrom"] for r in relaxed]),
        "graph_kept_rate": rate(sum(bool(r["graph_kept"]) for r in relaxed), len(relaxed)),
        "orders_kept_rate": rate(sum(bool(r["orders_kept"]) for r in relaxed), len(relaxed)),
        "stable_relaxed_rate": rate(sum(bool(r["stable_relaxed"]) for r in relaxed), len(relaxed)),
        "converged_rate": rate(sum(bool(r["relax_converged"]) for r in relaxed), len(relaxed)),
        "pb_seconds": rate(sum(r["pb_seconds"] or 0.0 for r in checked), len(checked)),
        "xtb_seconds": rate(sum(r["xtb_seconds"] or 0.0 for r in rows), n),
    }
