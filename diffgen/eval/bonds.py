"""Bond orders inferred from interatomic distances (evaluation protocol "family A").

This is the distance-based bond assignment used by Hoogeboom et al. 2022,
"Equivariant Diffusion for Molecule Generation in 3D" (EDM, ICML), to score
generated molecules: a pair of atoms is bonded when its distance is below the
tabulated single-bond length plus a margin, and the bond is promoted to a double
(triple) bond when the distance is also below the double (triple) bond length plus
a smaller margin. The margins (10, 5 and 3 pm) were tuned in EDM so that the real
QM9 geometries score as stable as possible.

All tables are in picometres (pm); positions passed to :func:`bond_orders` are in
ångström (Å) and are converted with ``d_pm = 100 * d_Å``.
"""
from __future__ import annotations

import numpy as np

from diffgen.data.elements import ATOMIC_NUMBERS, ELEMENTS
from diffgen.errors import DiffgenError

__all__ = [
    "BONDS1",
    "BONDS2",
    "BONDS3",
    "MARGIN1",
    "MARGIN2",
    "MARGIN3",
    "ALLOWED_VALENCE",
    "as_numpy_molecule",
    "type_indices",
    "bond_orders",
    "allowed_valence",
]


def _symmetric(pairs: dict[tuple[str, str], float]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for (a, b), length in pairs.items():
        table.setdefault(a, {})[b] = length
        table.setdefault(b, {})[a] = length
    return table


#: Typical single-bond lengths in pm (EDM table), symmetric: ``BONDS1["C"]["H"] == 109``.
BONDS1: dict[str, dict[str, float]] = _symmetric({
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136,
    ("O", "O"): 148, ("O", "F"): 142,
    ("F", "F"): 142,
})

#: Typical double-bond lengths in pm (EDM table); pairs absent here never get order 2.
BONDS2: dict[str, dict[str, float]] = _symmetric({
    ("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120,
    ("N", "N"): 125, ("N", "O"): 121,
    ("O", "O"): 121,
})

#: Typical triple-bond lengths in pm (EDM table); pairs absent here never get order 3.
BONDS3: dict[str, dict[str, float]] = _symmetric({
    ("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113,
    ("N", "N"): 110,
})

#: Margins in pm added to the single / double / triple tabulated lengths.
MARGIN1: float = 10.0
MARGIN2: float = 5.0
MARGIN3: float = 3.0

#: Allowed valence (sum of bond orders of a neutral atom), keyed by atomic number.
ALLOWED_VALENCE: dict[int, int] = {1: 1, 6: 4, 7: 3, 8: 2, 9: 1}


def _threshold_matrix(table: dict[str, dict[str, float]], margin: float) -> np.ndarray:
    """(5, 5) matrix of ``length + margin`` in pm indexed by type index; -inf where no entry.

    A threshold of -inf makes ``d < threshold`` false for every distance, so a pair
    without an entry can never get that bond order.
    """
    n = len(ELEMENTS)
    mat = np.full((n, n), -np.inf, dtype=np.float64)
    for i, a in enumerate(ELEMENTS):
        for j, b in enumerate(ELEMENTS):
            if a in table and b in table[a]:
                mat[i, j] = float(table[a][b]) + margin
    return mat


_THR1 = _threshold_matrix(BONDS1, MARGIN1)
_THR2 = _threshold_matrix(BONDS2, MARGIN2)
_THR3 = _threshold_matrix(BONDS3, MARGIN3)

_Z_TO_INDEX = np.full(max(ATOMIC_NUMBERS) + 1, -1, dtype=np.int64)
_Z_TO_INDEX[list(ATOMIC_NUMBERS)] = np.arange(len(ATOMIC_NUMBERS))
_VALENCE_BY_INDEX = np.array([ALLOWED_VALENCE[z] for z in ATOMIC_NUMBERS], dtype=np.int64)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_numpy_molecule(z, pos) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert one molecule to numpy.

    Args:
        z: atomic numbers, shape (n,), any integer array-like (numpy, torch, list).
        pos: positions in Å, shape (n, 3), float array-like.

    Returns:
        ``(z, pos)`` as ``int64`` (n,) and ``float64`` (n, 3) numpy arrays.

    Raises:
        DiffgenError: on mismatched or malformed shapes.
    """
    z = _to_numpy(z)
    pos = _to_numpy(pos)
    if z.ndim != 1:
        raise DiffgenError(f"atomic numbers must have shape (n,), got shape {tuple(z.shape)}")
    if z.size and not np.issubdtype(z.dtype, np.integer):
        try:
            zf = z.astype(np.float64)
        except (TypeError, ValueError):
            raise DiffgenError("atomic numbers must be integers") from None
        if not np.all(np.isfinite(zf)) or not np.all(zf == np.round(zf)):
            raise DiffgenError("atomic numbers must be integers")
    z = z.astype(np.int64)
    try:
        pos = pos.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise DiffgenError(f"positions must be numeric: {exc}") from None
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] != z.shape[0]:
        raise DiffgenError(
            f"positions must have shape ({z.shape[0]}, 3) to match {z.shape[0]} atoms, got shape {tuple(pos.shape)}"
        )
    return z, pos


def type_indices(z: np.ndarray) -> np.ndarray:
    """Type indices 0..4 (H, C, N, O, F) of atomic numbers ``z`` (int array, shape (n,)).

    Raises:
        DiffgenError: if an atomic number is not H, C, N, O or F.
    """
    z = np.asarray(z, dtype=np.int64)
    inside = (z >= 0) & (z < _Z_TO_INDEX.size)
    idx = np.full(z.shape, -1, dtype=np.int64)
    idx[inside] = _Z_TO_INDEX[z[inside]]
    if np.any(idx < 0):
        unknown = sorted({int(v) for v in z[idx < 0]})
        raise DiffgenError(
            f"unsupported atomic number(s) {unknown}: only H, C, N, O, F (1, 6, 7, 8, 9) are supported"
        )
    return idx


def bond_orders(z, pos) -> np.ndarray:
    """EDM bond order (0 = none, 1, 2, 3) for every atom pair of one molecule.

    For each pair with distance ``d`` (pm, ``= 100 * |pos_i - pos_j|`` in Å):
    no bond if ``d >= single + 10``; otherwise order 2 if a double-bond length exists
    for the pair and ``d < double + 5``, raised to 3 if a triple-bond length exists and
    ``d < triple + 3``; otherwise order 1. Computed with numpy broadcasting over
    (5, 5) threshold matrices indexed by type index.

    Args:
        z: atomic numbers, shape (n,) (numpy, torch or list).
        pos: positions in Å, shape (n, 3).

    Returns:
        ``int64`` array of shape (n, n), symmetric, zero diagonal. Non-finite positions
        produce no bonds for the affected atoms.

    Raises:
        DiffgenError: on malformed shapes or elements outside H, C, N, O, F.

    Source: Hoogeboom et al. 2022 (EDM), ``get_bond_order`` with margins 10/5/3 pm.
    """
    z, pos = as_numpy_molecule(z, pos)
    t = type_indices(z)
    diff = pos[:, None, :] - pos[None, :, :]
    d = 100.0 * np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))  # pm, (n, n)
    ti, tj = t[:, None], t[None, :]
    bonded = d < _THR1[ti, tj]
    double = bonded & (d < _THR2[ti, tj])
    triple = double & (d < _THR3[ti, tj])
    order = bonded.astype(np.int64) + double + triple
    np.fill_diagonal(order, 0)
    return order


def allowed_valence(z) -> np.ndarray:
    """Allowed valence for each atomic number in ``z`` (shape (n,)) as an int64 array."""
    return _VALENCE_BY_INDEX[type_indices(np.asarray(z, dtype=np.int64))]
