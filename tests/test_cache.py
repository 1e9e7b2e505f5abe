"""Cache files: atomic writes, version/integrity stamps, and what N-body / MD caches do with broken files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffgen.data.cache import (
    CacheError,
    atomic_path,
    default_cache_dir,
    stamp_path,
    verify,
    write_stamp,
    write_stamped,
)
from diffgen.data.nbody import load_nbody_split, nbody_cache_path
from diffgen.errors import DiffgenError

KIND, VERSION = "test/blob", 3


def _stamped_blob(tmp_path: Path, data: bytes = b"0123456789" * 100) -> Path:
    path = tmp_path / "blob.bin"
    write_stamped(path, lambda tmp: tmp.write_bytes(data), KIND, VERSION, {"items": 100})
    return path


def _edit_stamp(path: Path, **changes) -> None:
    sp = stamp_path(path)
    stamp = json.loads(sp.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            stamp[key].update(value)
        else:
            stamp[key] = value
    sp.write_text(json.dumps(stamp))


def test_default_cache_dir_prefers_diffgen_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFGEN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DIFFGEN_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "diffgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "diffgen"


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = _stamped_blob(tmp_path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "blob.bin.stamp.json"]


def test_a_stamped_file_verifies_and_its_stamp_records_version_counts_and_checksum(tmp_path):
    path = _stamped_blob(tmp_path)
    stamp = verify(path, KIND, VERSION, {"items": 100})
    assert stamp["kind"] == KIND and stamp["version"] == VERSION and stamp["counts"] == {"items": 100}
    assert stamp["bytes"] == 1000 and len(stamp["sha256"]) == 64


def _truncate(p):
    p.write_bytes(p.read_bytes()[:500])


def _same_size_edit(p):
    b = bytearray(p.read_bytes())
    b[10] ^= 1
    p.write_bytes(bytes(b))


CORRUPTIONS = {
    "missing": (lambda p: p.unlink(), "missing"),
    "empty": (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    "truncated": (_truncate, "truncated: 500 bytes"),
    "appended": (lambda p: p.write_bytes(p.read_bytes() + b"x"), "wrong size"),
    "edited": (_same_size_edit, "checksum does not match"),
    "no stamp": (lambda p: stamp_path(p).unlink(), "no version stamp"),
    "empty stamp": (lambda p: stamp_path(p).write_text(""), "unreadable version stamp"),
    "stale version": (lambda p: _edit_stamp(p, version=VERSION - 1), "format version 2, expected 3"),
    "wrong counts": (lambda p: _edit_stamp(p, counts={"items": 99}), "99 items, expected 100"),
    "other kind": (lambda p: _edit_stamp(p, kind="test/other"), "swapped file?"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_verify_rejects_every_kind_of_broken_file_in_one_line(tmp_path, case):
    path = _stamped_blob(tmp_path)
    corrupt, fragment = CORRUPTIONS[case]
    corrupt(path)
    with pytest.raises(CacheError) as info:
        verify(path, KIND, VERSION, {"items": 100}, fix="delete it")
    err = info.value
    assert isinstance(err, DiffgenError)
    assert fragment in err.reason, err.reason
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and msg.endswith("delete it")


def test_a_file_whose_stamp_was_written_for_other_bytes_is_rejected(tmp_path):
    """Swapping the data of two stamped files (same size) is caught by the checksum."""
    a = _stamped_blob(tmp_path / "a", b"a" * 1000)
    b = _stamped_blob(tmp_path / "b", b"b" * 1000)
    shutil.copyfile(b, a)
    with pytest.raises(CacheError, match="checksum"):
        verify(a, KIND, VERSION)
    write_stamp(a, KIND, VERSION, {"items": 100})  # re-stamping adopts the new bytes
    assert verify(a, KIND, VERSION)["sha256"] == verify(b, KIND, VERSION)["sha256"]


# ------------------------------------------------------------------ N-body: derived data, regenerated

def test_broken_nbody_cache_is_regenerated_with_a_one_line_note(tmp_path, capsys):
    good = load_nbody_split("valid", 4, root=tmp_path)
    path = nbody_cache_path("valid", 4, tmp_path)
    assert capsys.readouterr().err == ""  # first build: no note
    for corrupt, fragment in ((lambda p: p.write_bytes(b""), "empty"),
                              (_truncate, "truncated"),
                              (lambda p: stamp_path(p).unlink(), "no version stamp"),
                              (lambda p: _edit_stamp(p, version=0), "format version 0")):
        corrupt(path)
        again = load_nbody_split("valid", 4, root=tmp_path)
        np.testing.assert_array_equal(again["loc"], good["loc"])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and fragment in err[0] and "regenerating" in err[0], err
    # a split file swapped for another split's (with its stamp) is caught by the stamped kind
    other = load_nbody_split("test", 4, root=tmp_path)
    other_path = nbody_cache_path("test", 4, tmp_path)
    shutil.copyfile(other_path, path)
    shutil.copyfile(stamp_path(other_path), stamp_path(path))
    capsys.readouterr()
    again = load_nbody_split("valid", 4, root=tmp_path)
    assert "swapped" in capsys.readouterr().err
    np.testing.assert_array_equal(again["loc"], good["loc"])
    assert not np.array_equal(other["loc"], good["loc"])


# ------------------------------------------------------------------ MD: expensive, say how to redo it

def test_broken_md_run_is_a_one_line_error_naming_the_file_and_the_fix(tmp_path):
    from diffgen.data.md import MDSettings, load_md, run_path, save_run

    settings = MDSettings(n_runs=2, n_frames=4)
    for k in range(2):
        loc = np.full((4, 22, 3), float(k), dtype=np.float32)
        save_run(run_path(settings, k, tmp_path), {"loc": loc, "vel": np.zeros_like(loc)})
    broken = run_path(settings, 1, tmp_path)
    _truncate(broken)
    with pytest.raises(DiffgenError) as info:
        load_md(settings, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(broken) in msg and "truncated" in msg and "diffgen dynamics simulate" in msg
    shutil.copyfile(run_path(settings, 0, tmp_path), broken)  # another run's bytes under this name
    with pytest.raises(DiffgenError, match="checksum"):
        load_md(settings, tmp_path)


def test_simulate_all_resimulates_a_broken_run(tmp_path, capsys):
    pytest.importorskip("openmm")
    from diffgen.data.md import MDSettings, run_path, simulate_all

    s = MDSettings(n_runs=1, n_frames=2, frame_ps=0.02, equil_ps=0.02, seed=4)
    path = simulate_all(s, tmp_path)[0]
    assert path == run_path(s, 0, tmp_path)
    good = np.load(path)["loc"]
    path.write_bytes(b"")
    capsys.readouterr()
    simulate_all(s, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "simulating it again" in err[0]
    np.testing.assert_array_equal(np.load(path)["loc"], good)  # Reference platform: bit-reproducible
