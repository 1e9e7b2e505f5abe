"""Reference SMILES of the QM9 training split for novelty (EDM protocol).

EDM computes novelty against SMILES built from the *training geometries* with the same
bond-inference pipeline as the samples (not against the GDB SMILES column), so explicit-H
SMILES of samples and of training molecules are comparable. Building the set takes about
half a minute on 2 CPU cores; it is cached beside the processed dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

from diffgen.data.cache import default_cache_dir
from diffgen.data.qm9 import QM9
from diffgen.eval.chem import smiles_of_dataset


def reference_path(root: str | Path | None = None, remove_h: bool = False) -> Path:
    """Cache file of the training-split reference SMILES."""
    root = Path(root) if root is not None else default_cache_dir()
    return root / "qm9" / "processed" / f"train_smiles_edm_{'noH' if remove_h else 'H'}.txt"


def training_smiles(root: str | Path | None = None, remove_h: bool = False, build: bool = True) -> set[str] | None:
    """The set of valid SMILES of the QM9 training molecules (computed once, then read from cache).

    Args:
        root: dataset cache root (None -> default cache dir).
        remove_h: QM9 without hydrogens.
        build: if False and the cache is missing, return None instead of building it.
    """
    path = reference_path(root, remove_h)
    if path.is_file():
        return set(path.read_text().split())
    if not build:
        return None
    ds = QM9(root, "train", remove_h)
    smiles = smiles_of_dataset(((d.z, d.pos) for d in ds), progress=True)
    unique = sorted({s for s in smiles if s})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(unique) + "\n")
    os.replace(tmp, path)
    return set(unique)
