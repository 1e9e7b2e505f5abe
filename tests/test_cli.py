"""End-to-end CLI checks: sampling with the shipped weights, determinism, no silent overwrite, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rdkit import Chem

from diffgen.tasks.generation.checkpoints import DEFAULT_CHECKPOINT


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}  # wide tables; no thread oversubscription
    return subprocess.run([sys.executable, "-m", "diffgen.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def assert_one_line_error(res: subprocess.CompletedProcess, fragment: str) -> None:
    assert res.returncode != 0
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "a"
    res = run_cli("sample", "--n", "2", "--steps", "10", "--seed", "7", "--out", str(out), "--no-novelty")
    assert res.returncode == 0, res.stderr
    assert "mol stability" in res.stdout
    return out


def test_shipped_weights_exist():
    assert DEFAULT_CHECKPOINT.is_file()
    assert DEFAULT_CHECKPOINT.stat().st_size < 20e6


def test_sample_writes_rdkit_readable_sdf_and_xyz(sampled: Path):
    mols = [m for m in Chem.SDMolSupplier(str(sampled / "samples.sdf"), sanitize=False, removeHs=False)]
    assert len(mols) == 2 and all(m is not None for m in mols)
    assert all(m.GetConformer().Is3D() for m in mols)
    assert all(m.HasProp("mol_stable") for m in mols)
    xyz_frames = (sampled / "samples.xyz").read_text().split("\n")
    assert int(xyz_frames[0]) == mols[0].GetNumAtoms()
    assert (sampled / "metrics.json").is_file()


def test_same_seed_same_molecules(sampled: Path, tmp_path: Path):
    res = run_cli("sample", "--n", "2", "--steps", "10", "--seed", "7", "--out", str(tmp_path / "b"), "--no-novelty")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b" / "samples.xyz").read_text() == (sampled / "samples.xyz").read_text()
    res = run_cli("sample", "--n", "2", "--steps", "10", "--seed", "8", "--out", str(tmp_path / "c"), "--no-novelty")
    assert (tmp_path / "c" / "samples.xyz").read_text() != (sampled / "samples.xyz").read_text()


def test_never_overwrites_silently(sampled: Path):
    before = (sampled / "samples.sdf").read_bytes()
    res = run_cli("sample", "--n", "2", "--steps", "2", "--out", str(sampled), "--no-novelty")
    assert_one_line_error(res, "exists")
    assert (sampled / "samples.sdf").read_bytes() == before


def test_evaluate_generated_file(sampled: Path):
    res = run_cli("evaluate", str(sampled / "samples.sdf"), "--no-novelty")
    assert res.returncode == 0, res.stderr
    assert "atom stability" in res.stdout and "2 molecules" in res.stdout


@pytest.mark.parametrize("n", ["0", "-3"])
def test_non_positive_n(n: str):
    assert_one_line_error(run_cli("sample", "--n", n), "--n must be a positive")


def test_missing_checkpoint(tmp_path: Path):
    assert_one_line_error(run_cli("sample", "--n", "1", "--checkpoint", str(tmp_path / "nope.ckpt")), "not found")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_corrupt_checkpoint(tmp_path: Path, suffix: str):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00\x01not a checkpoint" * 10)
    assert_one_line_error(run_cli("sample", "--n", "1", "--checkpoint", str(bad)), "checkpoint")


@pytest.mark.parametrize("name,content", [("bad.sdf", "garbage\nmore garbage\n"), ("bad.xyz", "3\n\nC 0 0\n")])
def test_unreadable_molecule_files(tmp_path: Path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content)
    res = run_cli("evaluate", str(path))
    assert_one_line_error(res, name)


def test_evaluate_missing_file(tmp_path: Path):
    assert_one_line_error(run_cli("evaluate", str(tmp_path / "missing.sdf")), "missing.sdf")


def test_unknown_config_key(tmp_path: Path):
    assert_one_line_error(run_cli("train", "--out-dir", str(tmp_path), "model.widht=3"), "unknown config key model.widht")


def test_sample_with_each_sampler_and_unknown_sampler(tmp_path: Path):
    from diffgen.diffusion.samplers import SAMPLERS

    for name in SAMPLERS:
        res = run_cli("sample", "--n", "2", "--steps", "3", "--sampler", name, "--out", str(tmp_path / name),
                      "--no-novelty")
        assert res.returncode == 0, res.stderr
        assert f"{name} sampler" in res.stdout
    assert_one_line_error(run_cli("sample", "--n", "2", "--sampler", "heun9", "--out", str(tmp_path / "x")),
                          "unknown sampler")


def test_train_outside_the_repo_reports_a_bad_override_in_one_line(tmp_path: Path):
    # the default config is packaged, so this reaches validation from any folder; nothing is trained
    assert_one_line_error(run_cli("train", "model.hidden=0", cwd=tmp_path), "model.hidden must be >= 1")
    assert not (tmp_path / "runs").exists()
