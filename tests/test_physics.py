"""Physics checks (`diffgen check`, diffgen.eval.physics): GFN2-xTB relaxation of real QM9 molecules is small and
keeps the bond graph, a distorted molecule relaxes by a lot, the energy and RMSD are rigid-motion invariant, and bad
input (unreadable SDF, missing extra, existing output) is a one-line error with exit code 2."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tblite.interface", reason="the check extra (tblite) is not installed")
pytest.importorskip("posebusters", reason="the check extra (posebusters) is not installed")

from diffgen.data.qm9 import QM9  # noqa: E402
from diffgen.errors import DiffgenError  # noqa: E402
from diffgen.eval import physics  # noqa: E402
from diffgen.io import write_sdf  # noqa: E402

ROWS = (0, 4321, 9876)  # three fixed rows of the QM9 test split


def run_cli(*args, pre: str = ""):
    """``diffgen ARGS`` in a subprocess; ``pre`` is Python run first (e.g. to hide a module)."""
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    code = "\n".join(["import sys", pre, "from diffgen.cli import main", "sys.argv = ['diffgen', *sys.argv[1:]]",
                      "main()"])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(res, fragment: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def qm9_molecules():
    test = QM9(split="test")
    return [(test[r].z.numpy(), test[r].pos.double().numpy()) for r in ROWS]


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_real_qm9_molecules_relax_little_and_keep_their_graph(qm9_molecules):
    rows = physics.check_molecules(qm9_molecules)
    for row in rows:
        # QM9 geometries are B3LYP/6-31G(2df,p) minima: GFN2-xTB moves them by ~0.01-0.1 Å and ~1-3 kcal/mol
        assert 0.0 <= row["relax_energy_kcal_mol"] < 6.0, row
        assert row["heavy_rmsd_angstrom"] < 0.2, row
        assert row["graph_kept"] and row["stable_relaxed"] and row["relax_converged"], row
        assert row["final_max_gradient"] < physics.DEFAULT_FMAX
        assert row["valid"] and row["mol_stable"] and row["pb_checked"] and row["pb_pass"], row
        assert row["unpaired_electrons"] == 0 and row["xtb_error"] is None
    summary = physics.summarize(rows)
    assert summary["n_molecules"] == 3 and summary["graph_kept_rate"] == 1.0 and summary["pb_pass_rate_all"] == 1.0


def test_distorted_molecule_has_a_large_relaxation_energy(qm9_molecules):
    z, pos = qm9_molecules[0]
    rng = np.random.default_rng(0)
    distorted = pos + rng.normal(0.0, 0.15, pos.shape)  # 0.15 Å per coordinate: bonds stretched by ~0.2 Å
    relaxed = physics.xtb_relax(z, pos)
    bent = physics.xtb_relax(z, distorted)
    assert bent.relaxation_energy_kcal_mol > 50.0 > 10 * relaxed.relaxation_energy_kcal_mol
    # both relax to (nearly) the same minimum: the distortion was the cost
    assert abs(bent.energy_final - relaxed.energy_final) * physics.HARTREE_TO_KCAL_PER_MOL < 2.0
    assert physics.heavy_atom_rmsd(z, distorted, bent.pos_final) > physics.heavy_atom_rmsd(z, pos, relaxed.pos_final)


def test_energy_and_rmsd_are_invariant_to_rigid_motions(qm9_molecules):
    z, pos = qm9_molecules[1]
    rng = np.random.default_rng(1)
    moved = pos @ random_rotation(rng).T + rng.normal(0, 3.0, 3)
    e = physics.xtb_relax(z, pos, max_steps=0).energy_initial
    e_moved = physics.xtb_relax(z, moved, max_steps=0).energy_initial
    assert abs(e - e_moved) < 1e-7  # hartree
    assert physics.heavy_atom_rmsd(z, pos, moved) < 1e-6
    # hydrogens do not count; a heavy atom moved by d gives sqrt(d^2 / n_heavy) before realignment at most
    shaken = pos.copy()
    shaken[z == 1] += 0.3
    assert physics.heavy_atom_rmsd(z, pos, shaken) < 1e-6
    heavy = np.flatnonzero(z > 1)
    shifted = pos.copy()
    shifted[heavy[0]] += [0.5, 0.0, 0.0]
    assert 0.0 < physics.heavy_atom_rmsd(z, pos, shifted) <= 0.5 / np.sqrt(heavy.size) + 1e-9


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tblite.interface", None)  # import tblite.interface now raises ImportError
    with pytest.raises(DiffgenError, match=r"diffgen\[check\]") as info:
        physics.require_check_extra()
    assert "tblite" in str(info.value) and "\n" not in str(info.value)


def test_cli_check_writes_csv_and_summary(qm9_molecules, tmp_path):
    sdf = tmp_path / "two.sdf"
    write_sdf(sdf, qm9_molecules[:2])
    res = run_cli("check", str(sdf), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "PoseBusters pass" in res.stdout and "relax. energy" in res.stdout
    with open(tmp_path / "out" / "two_checks.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["index"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == list(physics.CSV_COLUMNS)
    assert all(r["graph_kept"] == "1" and float(r["relax_energy_kcal_mol"]) < 6.0 for r in rows)
    assert (tmp_path / "out" / "two_checks.json").is_file()
    # existing outputs are not replaced without --overwrite
    before = (tmp_path / "out" / "two_checks.csv").read_text()
    assert_one_line_error(run_cli("check", str(sdf), "--out", str(tmp_path / "out")), "already exists")
    assert (tmp_path / "out" / "two_checks.csv").read_text() == before
    res = run_cli("check", str(sdf), "--out", str(tmp_path / "out"), "--overwrite", "--no-relax", "--max-molecules", "1")
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "out" / "two_checks.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["xtb_energy_hartree"] and not rows[0]["relax_energy_kcal_mol"]


def test_cli_check_bad_input(tmp_path, qm9_molecules):
    bad = tmp_path / "bad.sdf"
    bad.write_text("this is not\na molfile\n")
    assert_one_line_error(run_cli("check", str(bad)), "could not be parsed")
    assert_one_line_error(run_cli("check", str(tmp_path / "missing.sdf")), "no such file")
    sdf = tmp_path / "one.sdf"
    write_sdf(sdf, qm9_molecules[:1])
    assert_one_line_error(run_cli("check", str(sdf), "--max-molecules", "0"), "--max-molecules")
    hide = "sys.modules['tblite'] = None; sys.modules['tblite.interface'] = None"
    assert_one_line_error(run_cli("check", str(sdf), pre=hide), "diffgen[check]")
    assert not (tmp_path / "one_checks.csv").exists()


def test_posebusters_time_limit_keeps_the_other_checks(qm9_molecules):
    z, pos = qm9_molecules[2]
    mol = physics._sanitized(z, pos)
    with physics.PoseBustersRunner(timeout=1e-4) as runner:  # no molecule finishes the full checks in 0.1 ms
        cut = runner.check(mol)
        assert cut["timed_out"] and cut["internal_energy"] is None
        assert cut["bond_lengths"] and cut["bond_angles"] and cut["sanitization"]  # the "mol_fast" checks ran
        runner.timeout = 60.0  # the worker was killed: the next call starts a new one
        full = runner.check(mol)
    assert not full["timed_out"] and full["internal_energy"] is True
    assert {k: v for k, v in full.items() if k not in ("internal_energy", "timed_out")} == \
        {k: v for k, v in cut.items() if k not in ("internal_energy", "timed_out")}


def test_sample_check_runs_the_physics_checks_on_the_written_molecules(tmp_path):
    out = tmp_path / "s"
    res = run_cli("sample", "--n", "2", "--steps", "5", "--out", str(out), "--check", "--no-novelty")
    assert res.returncode == 0, res.stderr
    with open(out / "samples_checks.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["index"] for r in rows] == ["1", "2"] and all(r["xtb_energy_hartree"] for r in rows)
    # a missing extra is refused before anything is sampled or written
    hide = "sys.modules['tblite'] = None; sys.modules['tblite.interface'] = None"
    res = run_cli("sample", "--n", "2", "--steps", "5", "--out", str(tmp_path / "t"), "--check", pre=hide)
    assert_one_line_error(res, "diffgen[check]")
    assert not (tmp_path / "t").exists()
