"""End-to-end CLI checks: sampling with the shipped weights, determinism, no silent overwrite, bad input."""
from __future__ import annotations

import io
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
    for tag in ("edm_mol_stable", "edm_stable_atoms", "rdkit_valid", "n_fragments", "diffgen_index"):
        assert all(m.HasProp(tag) for m in mols), tag
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


@pytest.mark.parametrize("args, fragment", [
    (["--n", "0"], "--n must be positive"),
    (["--n", "-3"], "--n must be positive"),
    (["--steps", "-1"], "--steps must be positive"),
    (["--n-atoms", "x"], "--n-atoms 'x'"),
    (["--n", "2", "--trajectory", "3"], "--trajectory must be between 0 and --n (2)"),
    (["--checkpoint", "nope.safetensors"], "checkpoint not found"),
    (["--eta", "-1"], "eta must be a finite number >= 0, got -1.0"),
    (["--eta", "nan"], "eta must be a finite number >= 0, got nan"),
    (["--eta", "inf"], "eta must be a finite number >= 0, got inf"),
])
def test_sample_rejects_bad_input_before_importing_torch(tmp_path: Path, args: list[str], fragment: str):
    """Typos cost a fraction of a second: these checks run before torch is imported (a stand-in torch package that
    fails on import is first on the path, so any torch import would turn the error into a traceback)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch imported before the input checks')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "160"}
    res = subprocess.run([sys.executable, "-m", "diffgen.cli", "sample", *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env=env)
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res, fragment)


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


def invoke(*args: str, cwd: Path | None = None):
    """Run the CLI in-process (fast); returns Typer's result (``result.exception`` holds a raised DiffgenError)."""
    from typer.testing import CliRunner

    from diffgen.cli import app

    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(old)


def assert_user_error(result, fragment: str) -> None:
    from diffgen.errors import DiffgenError

    assert isinstance(result.exception, DiffgenError), result.output
    message = str(result.exception)
    assert fragment in message and "\n" not in message, message


@pytest.mark.parametrize("args, fragment", [
    (["sample", "--n", "1000000000"], "GiB, more than half of this machine's"),
    (["sample", "--steps", "1000000000"], "--steps 1000000000 is more than"),
    (["sample", "--batch-size", "1000000000", "--n", "10"], None),  # batch clipped to n: fine, checked below
    (["sample", "--device", "mps"], "MPS is not available"),
    (["sample", "--device", "cuda:7"], "--device cuda:7"),
    (["sample", "--device", "quantum"], "unknown --device"),
    (["sample", "--precision", "fp16"], "unknown --precision 'fp16': choose auto, fp32, bf16"),
    (["sample", "--out", "missing/folder/x"], "folder missing/folder does not exist"),
    (["draw", "samples.sdf", "--out", "grid.jpg"], "grid.jpg must end in .png or .svg"),
    (["evaluate", "samples.xyz", "--json", "missing/m.json"], "folder missing does not exist"),
    (["export", "last.ckpt", "weights.bin"], "weights.bin must end in .safetensors"),
])
def test_bad_arguments_fail_before_any_work(tmp_path: Path, args: list[str], fragment: str | None):
    repo_samples = Path(__file__).resolve().parents[1] / "samples"
    for name in ("samples.sdf", "samples.xyz"):
        (tmp_path / name).write_bytes((repo_samples / name).read_bytes())
    if fragment is None:  # a huge batch size is clipped to --n: the memory check passes, then sampling is tiny
        args = args + ["--steps", "2", "--out", "o", "--no-novelty"]
        assert invoke(*args, cwd=tmp_path).exit_code == 0
        return
    assert_user_error(invoke(*args, cwd=tmp_path), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.sdf", "samples.xyz"]  # nothing was written


def test_existing_results_are_never_overwritten_without_flag(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # a user's file: sample must not replace it
    assert_user_error(invoke("sample", "--n", "2", "--steps", "2", "--out", str(out), "--no-novelty"),
                      "metrics.json already exists")
    assert (out / "metrics.json").read_text() == "{}"
    json_path = tmp_path / "m.json"
    json_path.write_text("mine")
    xyz = Path(__file__).resolve().parents[1] / "samples" / "samples.xyz"
    assert_user_error(invoke("evaluate", str(xyz), "--json", str(json_path), "--no-novelty"), "already exists")
    assert json_path.read_text() == "mine"
    assert invoke("evaluate", str(xyz), "--json", str(json_path), "--no-novelty", "--overwrite").exit_code == 0
    assert '"atom_stability"' in json_path.read_text()


def test_two_runs_in_the_same_second_get_their_own_folders(tmp_path: Path, monkeypatch):
    import datetime as dt

    import diffgen.cli.generate as generate

    class FrozenClock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate, "datetime", FrozenClock)
    folders = [generate._make_out_dir(None, False) for _ in range(3)]
    assert [p.name for p in folders] == ["20260102-030405", "20260102-030405-2", "20260102-030405-3"]
    assert all(p.is_dir() for p in folders)


class _TouchOnLoad:
    """Unpickling this calls ``Path.touch(marker)``: the shape of a malicious checkpoint (any callable would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-looking ``.ckpt`` (torch zip file) whose unpickling would create ``marker``. Checked to be live:
    its pickle, unpickled without torch's safeguards, does create the marker (then removed)."""
    import pickle
    import warnings
    import zipfile

    import torch

    torch.save({"global_step": 7, "epoch": 0, "pytorch-lightning_version": "2.6.6",
                "state_dict": {"w": torch.zeros(2)}, "hyper_parameters": _TouchOnLoad(marker)}, path)
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        unpickler = pickle.Unpickler(io.BytesIO(zf.read(name)))
        # tensor storages ('storage', type, key, location, numel): empty ones of the right type will do
        unpickler.persistent_load = lambda pid: torch.TypedStorage(pid[4], dtype=pid[1].dtype, _internal=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated
            unpickler.load()
    assert marker.is_file(), "the crafted checkpoint does not run its payload: the test would prove nothing"
    marker.unlink()
    return path


_CHECKPOINT_COMMANDS = {
    "sample": ["sample", "--n", "1", "--steps", "1", "--checkpoint", "{ckpt}", "--out", "{tmp}/s", "--no-novelty"],
    "export": ["export", "{ckpt}", "{tmp}/g.safetensors"],
    "regress evaluate": ["regress", "evaluate", "--checkpoint", "{ckpt}", "--limit", "1"],
    "regress predict": ["regress", "predict", "{tmp}/methane.xyz", "--checkpoint", "{ckpt}"],
    "regress export": ["regress", "export", "{ckpt}", "{tmp}/r.safetensors"],
    "dynamics evaluate": ["dynamics", "evaluate", "--checkpoint", "{ckpt}"],
    "dynamics predict": ["dynamics", "predict", "--checkpoint", "{ckpt}", "--out", "{tmp}/p.xyz"],
    "train (resume)": ["train", "--out-dir", "{tmp}/run", "trainer.accelerator=cpu", "model.hidden=16",
                       "model.n_layers=2"],
    "regress train (resume)": ["regress", "train", "--out-dir", "{tmp}/run", "trainer.accelerator=cpu",
                               "model.hidden=16", "model.n_layers=2"],
}


@pytest.mark.parametrize("command", list(_CHECKPOINT_COMMANDS))
def test_crafted_checkpoint_never_runs_code(tmp_path: Path, command: str, monkeypatch, capfd):
    """Every command that reads a Lightning checkpoint (given as an argument, or found as last.ckpt in the run
    folder a training resumes) refuses a crafted one with a one-line error and exit code 2, and its payload never
    runs. (``diffgen.cli.main`` in-process; fd 2 captured.)"""
    from diffgen.cli import main

    marker = tmp_path / "PWNED"
    ckpt = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    (tmp_path / "methane.xyz").write_text("5\nmethane\nC 0 0 0\nH 0.63 0.63 0.63\nH -0.63 -0.63 0.63\n"
                                          "H -0.63 0.63 -0.63\nH 0.63 -0.63 -0.63\n")
    args = [a.format(ckpt=ckpt, tmp=tmp_path) for a in _CHECKPOINT_COMMANDS[command]]
    monkeypatch.setattr(sys, "argv", ["diffgen", *args])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main()
    err = capfd.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: cannot read checkpoint"), lines[0]
    assert ("last.ckpt" if "resume" in command else "evil.ckpt") in lines[0], lines[0]
    assert "could run code, so it is refused (Unsupported global" in lines[0] and "\x1b" not in lines[0], lines[0]
    assert not marker.exists()
