"""RDKit conversion, validity / uniqueness / novelty, and the full generation metrics.

Implements the QM9 evaluation protocol of Hoogeboom et al. 2022 (EDM, "family A"):

* bonds are inferred from distances with the EDM tables (:mod:`diffgen.eval.bonds`);
* atom / molecule stability from the inferred valences (:mod:`diffgen.eval.stability`);
* a molecule is *valid* when the RDKit molecule built from those bonds passes
  ``Chem.SanitizeMol``; its SMILES is the canonical SMILES of the largest fragment;
* uniqueness = distinct valid SMILES / valid molecules;
* novelty = distinct valid SMILES not among the training set's SMILES / distinct valid
  SMILES, where the training SMILES are obtained by the same pipeline applied to the
  training geometries (:func:`smiles_of_dataset`), as in EDM.

Atoms are created from element symbols without ``NoImplicit``, exactly as in EDM, so
sanitization may add implicit hydrogens to under-bonded heavy atoms: this is why the
validity of a sample set can exceed its molecule stability.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable

import numpy as np
from rdkit import Chem
from rdkit.Geometry import Point3D
from rdkit.rdBase import BlockLogs

from diffgen.data.elements import Z_TO_SYMBOL
from diffgen.eval.bonds import as_numpy_molecule, bond_orders, type_indices
from diffgen.eval.stability import molecule_stable
from diffgen.errors import DiffgenError

__all__ = ["to_rdkit", "sanitized", "valid_smiles", "smiles_of", "rdkit_report", "GenerationMetrics", "sd_tags",
           "smiles_of_dataset"]

_BOND_TYPES = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}


def to_rdkit(z, pos, bonds: np.ndarray | None = None, add_conformer: bool = True) -> Chem.RWMol:
    """Build an (unsanitized) RDKit molecule from atomic numbers and positions.

    Args:
        z: atomic numbers, shape (n,) (H, C, N, O, F only).
        pos: positions in Å, shape (n, 3).
        bonds: optional (n, n) integer bond-order matrix (0-3); defaults to the EDM
            distance-inferred :func:`diffgen.eval.bonds.bond_orders`.
        add_conformer: attach a 3D conformer holding ``pos``.

    Returns:
        ``Chem.RWMol`` with one atom per entry of ``z`` (in order), SINGLE / DOUBLE /
        TRIPLE bonds for orders 1 / 2 / 3, not sanitized.

    Raises:
        DiffgenError: on malformed shapes, elements outside H, C, N, O, F, or a bond
            matrix of the wrong shape.
    """
    z, pos = as_numpy_molecule(z, pos)
    type_indices(z)  # validates the elements
    if bonds is None:
        bonds = bond_orders(z, pos)
    else:
        bonds = np.asarray(bonds)
        if bonds.shape != (z.size, z.size):
            raise DiffgenError(f"bond matrix must have shape ({z.size}, {z.size}), got {tuple(bonds.shape)}")
    mol = Chem.RWMol()
    for zi in z.tolist():
        mol.AddAtom(Chem.Atom(Z_TO_SYMBOL[zi]))
    ii, jj = np.nonzero(np.triu(bonds, 1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        order = int(bonds[i, j])
        if order not in _BOND_TYPES:
            raise DiffgenError(f"bond order {order} between atoms {i} and {j} is not 1, 2 or 3")
        mol.AddBond(i, j, _BOND_TYPES[order])
    if add_conformer:
        conf = Chem.Conformer(int(z.size))
        for k, (x, y, w) in enumerate(pos.tolist()):
            conf.SetAtomPosition(k, Point3D(x, y, w))
        conf.Set3D(True)
        mol.AddConformer(conf, assignId=True)
    return mol


def sanitized(mol: Chem.Mol) -> Chem.Mol | None:
    """A sanitized copy of ``mol`` (``Chem.SanitizeMol``, which adds implicit hydrogens to under-bonded atoms), or
    None if sanitization fails or ``mol`` is empty: EDM's validity test. ``mol`` is left untouched."""
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    block = BlockLogs()  # silence RDKit's per-molecule sanitization messages
    try:
        m = Chem.Mol(mol)
        try:
            Chem.SanitizeMol(m)
        except Exception:
            return None
        return m
    finally:
        del block


def _largest_fragment_smiles(m: Chem.Mol | None) -> str | None:
    """Canonical SMILES of the largest fragment (by atom count, first one on ties) of a sanitized molecule."""
    if m is None:
        return None
    block = BlockLogs()
    try:
        if len(Chem.GetMolFrags(m)) > 1:
            frags = Chem.GetMolFrags(m, asMols=True)
            m = max(frags, key=lambda f: f.GetNumAtoms())
        smi = Chem.MolToSmiles(m)
    except Exception:
        return None
    finally:
        del block
    return smi or None


def valid_smiles(mol: Chem.Mol) -> str | None:
    """Canonical SMILES of the largest fragment of ``mol`` if it sanitizes, else None.

    EDM validity: ``Chem.SanitizeMol`` is tried on a copy (``mol`` is left untouched);
    on failure the molecule is invalid (None). On success the largest fragment (by
    atom count, first one on ties) is taken and its canonical ``Chem.MolToSmiles``
    returned. An empty molecule is invalid.
    """
    return _largest_fragment_smiles(sanitized(mol))


def rdkit_report(mol: Chem.Mol) -> dict:
    """What RDKit makes of a molecule built from EDM bonds (:func:`to_rdkit`), beyond EDM's validity.

    Returns:
        dict with ``smiles`` (:func:`valid_smiles`: str, or None if invalid), ``n_fragments`` (connected components
        of the bond graph, counted for invalid molecules too) and ``implicit_hs`` (hydrogens that sanitization
        added to under-bonded atoms, e.g. 2 for a carbon with two bonds; None for invalid molecules). EDM counts
        a molecule with ``implicit_hs > 0`` or several fragments as valid.
    """
    m = sanitized(mol)
    return {
        "smiles": _largest_fragment_smiles(m),
        "n_fragments": len(Chem.GetMolFrags(mol)) if mol.GetNumAtoms() else 0,
        "implicit_hs": None if m is None else int(sum(a.GetNumImplicitHs() for a in m.GetAtoms())),
    }


def smiles_of(z, pos) -> str | None:
    """EDM SMILES of one molecule given as atomic numbers (n,) and positions (n, 3) Å."""
    return valid_smiles(to_rdkit(z, pos, add_conformer=False))


class GenerationMetrics:
    """Accumulates EDM generation metrics over batches of molecules.

    Usage::

        metrics = GenerationMetrics(reference_smiles=train_smiles)
        metrics.update([(z, pos), ...])   # z int (n,), pos float (n, 3) in Å; numpy or torch
        result = metrics.compute()

    Per-molecule results stay available in :attr:`smiles` (str or None),
    :attr:`stable` (bool), :attr:`n_stable_atoms`, :attr:`n_atoms_per_molecule`,
    :attr:`n_fragments` (ints) and :attr:`implicit_hs` (int or None, see
    :func:`rdkit_report`), in the order the molecules were given; :meth:`per_molecule`
    returns them as a list of dicts.

    Args:
        reference_smiles: SMILES of the training set for novelty (None: novelty is None, i.e. n/a).

    Raises:
        DiffgenError: ``reference_smiles`` is given but holds no SMILES (every molecule would count as novel).
    """

    def __init__(self, reference_smiles: set[str] | None = None):
        self.reference_smiles = set(reference_smiles) if reference_smiles is not None else None
        if self.reference_smiles is not None and not any(self.reference_smiles):
            raise DiffgenError("the novelty reference holds no SMILES, so every molecule would count as novel: "
                               "rebuild it, or evaluate without novelty")
        self.reset()

    def reset(self) -> None:
        """Forget every molecule seen so far."""
        self.smiles: list[str | None] = []
        self.stable: list[bool] = []
        self.n_stable_atoms: list[int] = []
        self.n_atoms_per_molecule: list[int] = []
        self.n_fragments: list[int] = []
        self.implicit_hs: list[int | None] = []

    def __len__(self) -> int:
        return len(self.smiles)

    def update(self, molecules: Iterable) -> None:
        """Score molecules and store their per-molecule results.

        Args:
            molecules: iterable of ``(z, pos)``: atomic numbers (n,) and positions
                (n, 3) in Å, numpy arrays or torch tensors.

        Raises:
            DiffgenError: on malformed molecules or unsupported elements.
        """
        for z, pos in molecules:
            z, pos = as_numpy_molecule(z, pos)
            bonds = bond_orders(z, pos)
            stable, n_stable, n_atoms = molecule_stable(z, pos, bonds)
            report = rdkit_report(to_rdkit(z, pos, bonds, add_conformer=False))
            self.smiles.append(report["smiles"])
            self.stable.append(stable)
            self.n_stable_atoms.append(n_stable)
            self.n_atoms_per_molecule.append(n_atoms)
            self.n_fragments.append(report["n_fragments"])
            self.implicit_hs.append(report["implicit_hs"])

    def per_molecule(self) -> list[dict]:
        """One dict per molecule: ``smiles`` (str or None), ``valid``, ``mol_stable``,
        ``n_stable_atoms``, ``n_atoms``, ``n_fragments``, ``implicit_hs``."""
        return [
            {"smiles": s, "valid": s is not None, "mol_stable": st, "n_stable_atoms": ns, "n_atoms": na,
             "n_fragments": nf, "implicit_hs": ih}
            for s, st, ns, na, nf, ih in zip(self.smiles, self.stable, self.n_stable_atoms, self.n_atoms_per_molecule,
                                             self.n_fragments, self.implicit_hs)
        ]

    def compute(self) -> dict:
        """Metrics as fractions in [0, 1].

        Returns:
            dict with ``atom_stability`` (stable atoms / all atoms, pooled),
            ``mol_stability``, ``validity`` (valid / all), ``uniqueness`` (distinct valid
            SMILES / valid), ``valid_unique`` (distinct valid / all), ``novelty``
            (distinct valid SMILES not in the reference / distinct valid; None without a
            reference set), ``n_molecules``, ``n_atoms``. Ratios with an empty
            denominator are 0.0.
        """
        n_mol = len(self.smiles)
        n_atoms = int(sum(self.n_atoms_per_molecule))
        valid = [s for s in self.smiles if s is not None]
        distinct = set(valid)

        def ratio(a: int, b: int) -> float:
            return float(a) / b if b else 0.0

        novelty = None
        if self.reference_smiles is not None:
            novelty = ratio(len(distinct - self.reference_smiles), len(distinct))
        return {
            "atom_stability": ratio(int(sum(self.n_stable_atoms)), n_atoms),
            "mol_stability": ratio(int(sum(self.stable)), n_mol),
            "validity": ratio(len(valid), n_mol),
            "uniqueness": ratio(len(distinct), len(valid)),
            "valid_unique": ratio(len(distinct), n_mol),
            "novelty": novelty,
            "n_molecules": n_mol,
            "n_atoms": n_atoms,
        }


def sd_tags(report: dict) -> dict:
    """SD properties of one molecule for SDF files and the RDKit molecules of the Python API, from its
    :meth:`GenerationMetrics.per_molecule` dict.

    Returns:
        ``smiles`` (valid molecules only), ``edm_mol_stable`` (1/0: every atom has its allowed valence, EDM),
        ``edm_stable_atoms`` (atoms with their allowed valence), ``rdkit_valid`` (1/0: RDKit sanitization passes;
        EDM's validity), ``n_fragments`` (connected components of the bond graph) and ``rdkit_implicit_hs``
        (hydrogens RDKit added to under-bonded atoms while sanitizing; 0 = none; absent for invalid molecules).
        None values are meant to be skipped.
    """
    return {
        "smiles": report["smiles"],
        "edm_mol_stable": int(bool(report["mol_stable"])),
        "edm_stable_atoms": int(report["n_stable_atoms"]),
        "rdkit_valid": int(bool(report["valid"])),
        "n_fragments": int(report["n_fragments"]),
        "rdkit_implicit_hs": report["implicit_hs"],
    }


def smiles_of_dataset(molecules: Iterable, progress: bool = False) -> list[str | None]:
    """EDM SMILES (largest valid fragment, canonical; None if invalid) of many molecules.

    Used to build the novelty reference set from the training geometries, as EDM does.

    Args:
        molecules: iterable of ``(z, pos)`` (atomic numbers (n,), positions (n, 3) Å).
        progress: print a progress line (count and rate) to stderr every 10,000 molecules.

    Returns:
        list with one SMILES (or None) per input molecule, in order.
    """
    out: list[str | None] = []
    t0 = time.perf_counter()
    for k, (z, pos) in enumerate(molecules, start=1):
        out.append(smiles_of(z, pos))
        if progress and k % 10000 == 0:
            dt = time.perf_counter() - t0
            print(f"smiles: {k} molecules, {k / dt:.0f}/s", file=sys.stderr, flush=True)
    return out
