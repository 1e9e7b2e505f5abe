"""The cache folder and its files: atomic writes, version/integrity stamps, verification on load.

Everything diffgen derives and keeps between runs (QM9 processed splits, the novelty reference SMILES,
N-body trajectories, MD runs) lives under :func:`default_cache_dir` and follows one protocol:

* **atomic write**: a file is written to a temporary name in its own folder and then moved over the final
  name with ``os.replace``; a crash or kill leaves either the old file or the new one, never a partial one
  (:func:`atomic_path`);
* **stamp**: beside each file ``<name>`` a JSON sidecar ``<name>.stamp.json`` records

  ``{"stamp": 1, "kind": "qm9/train_H", "version": 1, "counts": {"molecules": 100000}, "bytes": ..., "sha256": ...}``

  i.e. what the file is (``kind``), the format ``version`` of its producer, item ``counts`` and the size and
  SHA-256 of its bytes. It is written (atomically) *after* the file, so an interrupted write leaves a file
  without a matching stamp (:func:`write_stamped`);
* **verify on load**: :func:`verify` checks presence, non-zero size, stamp, kind, version, counts, size and
  checksum (about 0.05 s per 50 MB) and raises :class:`CacheError` naming the file and the reason.
  Callers rebuild derived files on :class:`CacheError` (one line on stderr via :func:`note`) or turn it
  into a one-line user error saying how to fix it. A file without a stamp (written by an older diffgen,
  or by a write that was killed) counts as broken.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from diffgen.errors import DiffgenError

__all__ = ["CacheError", "default_cache_dir", "atomic_path", "write_bytes_atomic", "stamp_path", "file_sha256",
           "write_stamp", "write_stamped", "read_stamp", "verify", "note"]

#: Version of the stamp layout itself (not of the stamped file's format).
STAMP_FORMAT = 1
_STAMP_SUFFIX = ".stamp.json"


class CacheError(DiffgenError):
    """A cache file is missing, empty, truncated, stale or does not match its stamp.

    Attributes:
        path: the broken file.
        reason: what is wrong, a short phrase (e.g. ``"truncated: 10 of 2048 bytes"``).
        fix: what the user can do (one clause).
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str = "delete it and run the command again"):
        self.path, self.reason, self.fix = Path(path), reason, fix
        super().__init__(f"cache file {self.path} is unusable ({reason}): {fix}")


def default_cache_dir() -> Path:
    """Root of diffgen's caches: ``$DIFFGEN_CACHE``, else ``$XDG_CACHE_HOME/diffgen``, else ``~/.cache/diffgen``.

    Read from the environment at every call (not at import).
    """
    env = os.environ.get("DIFFGEN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "diffgen"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Context manager giving a temporary path to write ``path`` through.

    The temporary file lies in the same folder (created if missing), so the final ``os.replace`` is atomic.
    On normal exit it replaces ``path``; on an exception it is removed and the exception propagates, leaving
    any previous ``path`` untouched.

    Args:
        path: the final file.
        suffix: appended to the temporary name, for writers that insist on an extension (``np.savez``
            adds ``.npz`` to names that lack it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def stamp_path(path: str | os.PathLike) -> Path:
    """The stamp sidecar of a cache file: ``<path>.stamp.json``."""
    path = Path(path)
    return path.with_name(path.name + _STAMP_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_stamp(path: str | os.PathLike, kind: str, version: int, counts: Mapping[str, int]) -> dict:
    """Stamp an already written cache file (size and SHA-256 are taken from the file); returns the stamp.

    Args:
        path: the cache file.
        kind: what the file holds, e.g. ``"qm9/train_H"``; a file stamped with another kind is rejected.
        version: format version of the producer; bump it when the file's content or layout changes.
        counts: item counts (ints), e.g. ``{"molecules": 100000, "atoms": 1800000}``.
    """
    path = Path(path)
    stamp = {"stamp": STAMP_FORMAT, "kind": kind, "version": int(version),
             "counts": {k: int(v) for k, v in counts.items()},
             "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    write_bytes_atomic(stamp_path(path), (json.dumps(stamp, indent=1) + "\n").encode())
    return stamp


def write_stamped(path: str | os.PathLike, write: Callable[[Path], None], kind: str, version: int,
                  counts: Mapping[str, int], suffix: str = "") -> dict:
    """Write a cache file atomically with ``write(tmp_path)``, then stamp it; returns the stamp.

    Any stale stamp is removed first, so a kill at any point leaves no file/stamp pair that verifies.
    ``suffix`` is passed to :func:`atomic_path`.
    """
    path = Path(path)
    stamp_path(path).unlink(missing_ok=True)
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return write_stamp(path, kind, version, counts)


def read_stamp(path: str | os.PathLike) -> dict:
    """The stamp of ``path`` as a dict.

    Raises:
        CacheError: no stamp, or the stamp is unreadable.
    """
    sp = stamp_path(path)
    if not sp.is_file():
        raise CacheError(path, f"no version stamp {sp.name}: written by an older diffgen or interrupted")
    try:
        stamp = json.loads(sp.read_text())
        if not isinstance(stamp, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CacheError(path, f"unreadable version stamp {sp.name}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return stamp


def verify(path: str | os.PathLike, kind: str, version: int, counts: Mapping[str, int] | None = None,
           fix: str = "delete it and run the command again") -> dict:
    """Check a cache file against its stamp before it is loaded; returns the stamp.

    Checks, in order: the file exists and is not empty; its stamp is readable and of this stamp layout;
    ``kind`` and ``version`` match; every key of ``counts`` matches the stamped count; the size and the
    SHA-256 match the stamped ones (a truncated, extended, swapped or edited file fails).

    Args:
        path: the cache file.
        kind, version: what the caller expects (see :func:`write_stamp`).
        counts: counts the caller knows in advance (e.g. ``{"molecules": 100000}``); None checks none.
        fix: the advice put in the error message.

    Raises:
        CacheError: on the first failed check, with a one-line message naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(path, "missing", fix)
    size = path.stat().st_size
    if size == 0:
        raise CacheError(path, "empty (0 bytes): an interrupted write", fix)
    try:
        stamp = read_stamp(path)
    except CacheError as err:
        raise CacheError(path, err.reason, fix) from None
    if stamp.get("stamp") != STAMP_FORMAT:
        raise CacheError(path, f"stamp layout {stamp.get('stamp')!r}, expected {STAMP_FORMAT}", fix)
    if stamp.get("kind") != kind:
        raise CacheError(path, f"holds {stamp.get('kind')!r}, expected {kind!r} (swapped file?)", fix)
    if stamp.get("version") != version:
        raise CacheError(path, f"format version {stamp.get('version')!r}, expected {version}", fix)
    stamped_counts = stamp.get("counts") if isinstance(stamp.get("counts"), dict) else {}
    for key, expected in (counts or {}).items():
        if stamped_counts.get(key) != expected:
            raise CacheError(path, f"{stamped_counts.get(key)!r} {key}, expected {expected}", fix)
    if stamp.get("bytes") != size:
        what = "truncated" if isinstance(stamp.get("bytes"), int) and size < stamp["bytes"] else "wrong size"
        raise CacheError(path, f"{what}: {size} bytes, stamp says {stamp.get('bytes')!r}", fix)
    if stamp.get("sha256") != file_sha256(path):
        raise CacheError(path, "checksum does not match its stamp (modified or swapped file)", fix)
    return stamp


def note(message: str) -> None:
    """Print a one-line note about the cache on stderr (``diffgen: <message>``)."""
    print(f"diffgen: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
