"""Reference SMILES of the QM9 training split for novelty (EDM protocol).

EDM computes novelty against SMILES built from the *training geometries* with the same
bond-inference pipeline as the samples (not against the GDB SMILES column), so explicit-H
SMILES of samples and of training molecules are comparable. Building the set takes about
half a minute on 2 CPU cores; it is cached beside the processed dataset as a text file (one
SMILES per line, sorted, distinct), written atomically with a version/integrity stamp and
verified on every read (:mod:`diffgen.data.cache`). A broken file is rebuilt, or ignored with a
one-line note when building was not asked for; an empty reference is refused, since every
molecule would then count as novel.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from diffgen.data.cache import CacheError, default_cache_dir, note, verify, write_stamped
from diffgen.data.qm9 import QM9
from diffgen.errors import DiffgenError
from diffgen.eval.chem import smiles_of_dataset

#: Format version of the reference file (stamped; bump when the SMILES pipeline changes).
REFERENCE_VERSION = 1
_FIX = "delete it, or rebuild it with `diffgen evaluate --dataset qm9 --split train`"


def reference_path(root: str | Path | None = None, remove_h: bool = False) -> Path:
    """Cache file of the training-split reference SMILES (``root/qm9/processed/train_smiles_edm_{H,noH}.txt``)."""
    root = Path(root) if root is not None else default_cache_dir()
    return root / "qm9" / "processed" / f"train_smiles_edm_{'noH' if remove_h else 'H'}.txt"


def _kind(remove_h: bool) -> str:
    return f"qm9/train_smiles_edm_{'noH' if remove_h else 'H'}"


def write_reference(smiles: Iterable[str | None], root: str | Path | None = None, remove_h: bool = False) -> set[str]:
    """Store the distinct valid SMILES of ``smiles`` (None and empty entries dropped) as the novelty reference.

    Args:
        smiles: SMILES of the reference molecules, e.g. :func:`~diffgen.eval.chem.smiles_of_dataset` output.
        root: dataset cache root (None -> default cache dir).
        remove_h: QM9 without hydrogens.

    Returns:
        the stored set.

    Raises:
        DiffgenError: no valid SMILES (an empty reference would make every molecule novel).
    """
    unique = sorted({s for s in smiles if s})
    if not unique:
        raise DiffgenError("no valid SMILES for the novelty reference: an empty reference would make every "
                           "molecule novel")
    text = "\n".join(unique) + "\n"
    write_stamped(reference_path(root, remove_h), lambda tmp: tmp.write_text(text), _kind(remove_h),
                  REFERENCE_VERSION, {"smiles": len(unique)})
    return set(unique)


def read_reference(root: str | Path | None = None, remove_h: bool = False) -> set[str]:
    """The cached reference SMILES, verified against their stamp.

    Raises:
        CacheError: the file is missing (``reason == "missing"``), empty, truncated, stale, swapped or
            modified; the message names the file and how to fix it.
    """
    path = reference_path(root, remove_h)
    stamp = verify(path, _kind(remove_h), REFERENCE_VERSION, fix=_FIX)
    smiles = path.read_text().split()
    if not smiles or len(smiles) != stamp["counts"].get("smiles"):
        raise CacheError(path, f"{len(smiles)} SMILES, stamp says {stamp['counts'].get('smiles')!r}", _FIX)
    return set(smiles)


def training_smiles(root: str | Path | None = None, remove_h: bool = False, build: bool = True) -> set[str] | None:
    """The set of valid SMILES of the QM9 training molecules (computed once, then read from cache).

    Args:
        root: dataset cache root (None -> default cache dir).
        remove_h: QM9 without hydrogens.
        build: if False and the cache is missing or broken, return None (novelty n/a) instead of building it;
            a broken file is reported in one line on stderr.

    Returns:
        a non-empty set of SMILES, or None (only with ``build=False``).

    Raises:
        DiffgenError: building found no valid SMILES, or the QM9 cache cannot be built.
    """
    try:
        return read_reference(root, remove_h)
    except CacheError as err:
        if not build:
            if err.reason != "missing":
                note(f"{err.path} is unusable ({err.reason}); ignoring it (novelty n/a)")
            return None
        if err.reason != "missing":
            note(f"{err.path} is unusable ({err.reason}); rebuilding it")
    ds = QM9(root, "train", remove_h)
    return write_reference(smiles_of_dataset(((d.z, d.pos) for d in ds), progress=True), root, remove_h)
