"""Atom and molecule stability from distance-inferred bonds (EDM protocol, family A).

Source: Hoogeboom et al. 2022 (EDM). An atom is *stable* when the sum of the orders
of its inferred bonds (see :func:`diffgen.eval.bonds.bond_orders`) equals the
allowed valence of its element (H 1, C 4, N 3, O 2, F 1; no formal charges); a
molecule is stable when all of its atoms are.
"""
from __future__ import annotations

import numpy as np

from diffgen.eval.bonds import allowed_valence, as_numpy_molecule, bond_orders

__all__ = ["atom_stability", "molecule_stable"]


def atom_stability(z, pos, bonds: np.ndarray | None = None) -> np.ndarray:
    """Per-atom stability flags.

    Args:
        z: atomic numbers, shape (n,).
        pos: positions in Å, shape (n, 3).
        bonds: optional precomputed (n, n) bond-order matrix from :func:`bond_orders`.

    Returns:
        bool array of shape (n,): ``sum_j order_ij == allowed_valence(z_i)``.

    Raises:
        DiffgenError: on malformed shapes or elements outside H, C, N, O, F.
    """
    z, pos = as_numpy_molecule(z, pos)
    if bonds is None:
        bonds = bond_orders(z, pos)
    return bonds.sum(axis=1) == allowed_valence(z)


def molecule_stable(z, pos, bonds: np.ndarray | None = None) -> tuple[bool, int, int]:
    """Stability of one molecule.

    Args:
        z: atomic numbers, shape (n,).
        pos: positions in Å, shape (n, 3).
        bonds: optional precomputed (n, n) bond-order matrix.

    Returns:
        ``(stable, n_stable_atoms, n_atoms)``; a molecule is stable iff every atom is
        (an empty molecule counts as not stable).

    Raises:
        DiffgenError: on malformed shapes or elements outside H, C, N, O, F.
    """
    flags = atom_stability(z, pos, bonds)
    n_stable = int(flags.sum())
    n_atoms = int(flags.size)
    return bool(n_atoms > 0 and n_stable == n_atoms), n_stable, n_atoms
