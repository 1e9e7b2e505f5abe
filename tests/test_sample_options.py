"""``diffgen sample`` options: --n-atoms, --keep, --trajectory, batch-size-independent seeds, the metrics.json record,
and SDF tags that agree with what RDKit itself reads from the file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem
from test_cli import assert_one_line_error, assert_user_error, invoke, run_cli

from diffgen.io import read_molecules
from diffgen.tasks.generation.checkpoints import DEFAULT_CHECKPOINT


def sample(out: Path, *args: str):
    res = run_cli("sample", "--out", str(out), "--no-novelty", *args)
    assert res.returncode == 0, res.stderr
    return res


def records(path: Path, sanitize: bool = False) -> list:
    return list(Chem.SDMolSupplier(str(path), sanitize=sanitize, removeHs=False))


def bond_table(mol) -> list:
    return sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx(), b.GetBondTypeAsDouble()) for b in mol.GetBonds())


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """6 molecules of 9, 12 or 10 atoms in batches of 4, with the chains of the first 2 (2 steps: some invalid)."""
    out = tmp_path_factory.mktemp("opts") / "a"
    sample(out, "--n", "6", "--steps", "2", "--seed", "11", "--batch-size", "4", "--n-atoms", "9,12,10",
           "--trajectory", "2")
    return out


def test_same_seed_same_molecules_whatever_the_batch_size(run_a: Path, tmp_path: Path):
    sample(tmp_path / "b", "--n", "6", "--steps", "2", "--seed", "11", "--batch-size", "1", "--n-atoms", "9,12,10")
    a, b = records(run_a / "samples.sdf"), records(tmp_path / "b" / "samples.sdf")
    assert [m.GetNumAtoms() for m in a] == [9, 12, 10, 9, 12, 10]
    for ma, mb in zip(a, b):
        assert [x.GetAtomicNum() for x in ma.GetAtoms()] == [x.GetAtomicNum() for x in mb.GetAtoms()]
        assert bond_table(ma) == bond_table(mb)
        np.testing.assert_allclose(ma.GetConformer().GetPositions(), mb.GetConformer().GetPositions(), atol=1e-3)


def test_n_atoms_range(tmp_path: Path):
    sample(tmp_path / "r", "--n", "3", "--steps", "2", "--n-atoms", "14-15")
    assert [len(z) for z, _ in read_molecules(tmp_path / "r" / "samples.xyz")] == [14, 15, 14]


@pytest.mark.parametrize("value, fragment", [("0", "--n-atoms 0 is outside 1-29"),
                                             ("200", "--n-atoms 200 is outside 1-29"),
                                             ("9,30", "--n-atoms 30 is outside 1-29"),
                                             ("12-x", "give a count (12), a list (9,12) or a range (10-15)"),
                                             ("15-10", "give a count")])
def test_bad_n_atoms_fails_before_any_output(tmp_path: Path, value: str, fragment: str):
    assert_user_error(invoke("sample", "--n", "2", "--steps", "2", "--n-atoms", value, "--out", "x", cwd=tmp_path),
                      fragment)
    assert not (tmp_path / "x").exists()


def test_bad_n_atoms_is_a_one_line_error_with_exit_code_2(tmp_path: Path):
    res = run_cli("sample", "--n", "2", "--n-atoms", "200", "--out", str(tmp_path / "x"))
    assert res.returncode == 2
    assert_one_line_error(res, "--n-atoms 200 is outside 1-29")
    assert not (tmp_path / "x").exists()


def test_trajectory_is_the_denoising_chain_of_the_written_molecules(run_a: Path):
    written = read_molecules(run_a / "samples.xyz")
    assert sorted(p.name for p in run_a.glob("trajectory_*.xyz")) == ["trajectory_1.xyz", "trajectory_2.xyz"]
    for k in (1, 2):
        frames = read_molecules(run_a / f"trajectory_{k}.xyz")
        assert len(frames) == 2 + 1  # prior draw + one frame per step
        z, pos = written[k - 1]
        assert all(len(fz) == len(z) for fz, _ in frames)
        np.testing.assert_allclose(frames[-1][1], pos, atol=1e-5)  # the chain ends at the written molecule
        assert np.array_equal(frames[-1][0], z)
        prior = frames[0][1]
        assert np.abs(prior.mean(0)).max() < 1e-4  # zero center of mass, as EDM's prior
        assert np.linalg.norm(prior - pos) > 1.0  # and far from the result: noise, not the molecule
    assert_user_error(invoke("sample", "--n", "2", "--trajectory", "3", "--out", "unused"),
                      "--trajectory must be between 0 and --n (2)")


def test_metrics_json_records_the_settings(run_a: Path):
    import torch

    import diffgen

    meta = json.loads((run_a / "metrics.json").read_text())
    from diffgen.diffusion import DEFAULT_ETAS, DEFAULT_SAMPLER

    assert meta["batch_size"] == 4 and meta["sampler"] == DEFAULT_SAMPLER and meta["steps"] == 2
    assert meta["eta"] == DEFAULT_ETAS[DEFAULT_SAMPLER]
    assert meta["seed"] == 11 and meta["atom_counts"] == "9,12,10" and meta["device"] == "cpu"
    assert meta["diffgen_version"] == diffgen.__version__ and meta["torch_version"] == torch.__version__
    assert meta["checkpoint_sha256"] == hashlib.sha256(DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
    assert meta["n_molecules"] == 6 and meta["kept"] == 6 and meta["attempts"] == 6


def test_sdf_tags_agree_with_rdkit_reading_the_file(run_a: Path):
    """The tags are computed by diffgen; RDKit's own SDF reader (sanitizing) must agree on validity, fragments and
    the hydrogens it adds."""
    from diffgen.eval.stability import molecule_stable

    raw, read = records(run_a / "samples.sdf"), records(run_a / "samples.sdf", sanitize=True)
    for k, (mol, san) in enumerate(zip(raw, read)):
        assert int(mol.GetProp("rdkit_valid")) == (san is not None)
        assert int(mol.GetProp("n_fragments")) == len(Chem.GetMolFrags(mol))
        assert int(mol.GetProp("diffgen_index")) == k
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
        stable, n_stable, _ = molecule_stable(z, mol.GetConformer().GetPositions())
        assert int(mol.GetProp("edm_mol_stable")) == stable and int(mol.GetProp("edm_stable_atoms")) == n_stable
        if san is not None:
            assert int(mol.GetProp("rdkit_implicit_hs")) == sum(a.GetNumImplicitHs() for a in san.GetAtoms())
        else:
            assert not mol.HasProp("rdkit_implicit_hs") and not mol.HasProp("smiles")


def test_written_files_hold_the_scored_coordinates(run_a: Path):
    """The molecules are scored as written (rounded to the SDF's 1e-4 Å): the XYZ (6 decimals) holds the same
    coordinates as the SDF, and both files re-score to metrics.json (unrounded scores flipped borderline bonds: a
    100-molecule sample re-scored to 37 stable / 80 valid against 36 / 79 in its metrics.json)."""
    from diffgen.eval.chem import GenerationMetrics

    sdf, xyz = read_molecules(run_a / "samples.sdf"), read_molecules(run_a / "samples.xyz")
    assert len(sdf) == len(xyz) == 6
    for (z_s, pos_s), (z_x, pos_x) in zip(sdf, xyz):
        np.testing.assert_array_equal(z_s, z_x)
        np.testing.assert_array_equal(pos_s, pos_x)
    meta = json.loads((run_a / "metrics.json").read_text())
    for mols in (sdf, xyz):
        m = GenerationMetrics()
        m.update(mols)
        r = m.compute()
        for key in ("atom_stability", "mol_stability", "validity", "n_atoms"):
            assert r[key] == meta[key], key


def test_keep_valid_writes_only_valid_molecules_from_the_same_run(tmp_path: Path):
    # 2 steps at eta 1: with the 142,584-step averaged weights molecules 1 and 7 of these 8 are valid, in fp32 and in
    # bf16 (with 3 steps most seeds give the first three valid, leaving the filter nothing to drop)
    args = ["--steps", "2", "--seed", "14", "--batch-size", "4", "--n-atoms", "9,12,10", "--eta", "1"]
    ref, out = tmp_path / "all", tmp_path / "v"
    sample(ref, "--n", "8", *args)
    sample(out, "--n", "2", *args, "--keep", "valid")
    kept = records(out / "samples.sdf")
    assert len(kept) == 2 and all(m.GetProp("rdkit_valid") == "1" for m in kept)
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["kept"] == 2 and meta["attempts"] >= 2 and meta["n_molecules"] == meta["attempts"]
    # the kept molecules are the valid ones of the unfiltered run with the same seed, in order
    every = records(ref / "samples.sdf")
    valid_idx = [k for k, m in enumerate(every) if m.GetProp("rdkit_valid") == "1"]
    assert len(valid_idx) >= 2 and valid_idx[:2] != [0, 1], valid_idx  # the filter has something to drop
    assert [int(m.GetProp("diffgen_index")) for m in kept] == valid_idx[:2]
    assert [bond_table(m) for m in kept] == [bond_table(every[k]) for k in valid_idx[:2]]


def test_keep_stable_cap_hit_writes_what_passed_and_fails_clearly(tmp_path: Path):
    out = tmp_path / "s"
    res = run_cli("sample", "--n", "2", "--steps", "1", "--keep", "stable", "--max-attempts", "3", "--out", str(out),
                  "--no-novelty")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "only 0 of 2 molecules passed in 3 attempts" in lines[0], res.stderr
    assert "--max-attempts" in lines[0] and "Traceback" not in res.stderr
    assert json.loads((out / "metrics.json").read_text())["attempts"] == 3
    assert (out / "samples.sdf").read_text() == ""
    assert_user_error(invoke("sample", "--keep", "pretty"), "unknown --keep 'pretty'")
    assert_user_error(invoke("sample", "--n", "5", "--keep", "valid", "--max-attempts", "4"),
                      "--max-attempts 4 is less than --n 5")


@pytest.mark.parametrize("command", [["dynamics", "evaluate", "--checkpoint", "x.ckpt"],
                                     ["dynamics", "predict", "--checkpoint", "x.ckpt", "--out", "p.xyz"],
                                     ["regress", "predict", "m.xyz"], ["regress", "evaluate"], ["sample"]])
def test_every_model_command_takes_device(command: list[str], tmp_path: Path):
    assert_user_error(invoke(*command, "--device", "quantum", cwd=tmp_path), "unknown --device 'quantum'")


def test_eta_reaches_the_sampler(run_a: Path, tmp_path: Path):
    """--eta changes the molecules (the same seed at eta 1 and at the default draws other positions), and --eta with
    a sampler that has no noise scale is a one-line error."""
    from diffgen.diffusion import DEFAULT_ETAS

    assert DEFAULT_ETAS["dpm2m-sde"] != 1.0
    sample(tmp_path / "e1", "--n", "6", "--steps", "2", "--seed", "11", "--batch-size", "4", "--n-atoms", "9,12,10",
           "--eta", "1")
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["eta"] == 1.0
    a, b = read_molecules(run_a / "samples.xyz"), read_molecules(tmp_path / "e1" / "samples.xyz")
    assert any(not np.allclose(pa, pb, atol=1e-3) for (_, pa), (_, pb) in zip(a, b))
    assert_one_line_error(run_cli("sample", "--n", "1", "--sampler", "ancestral", "--eta", "2", "--out",
                                  str(tmp_path / "x")), "--eta applies to the dpm2m-sde sampler only, not --sampler ancestral")
