"""The element vocabulary of QM9 (H, C, N, O, F) and conversions between its encodings.

Atom types are encoded three ways in diffgen:

* ``z``: atomic numbers (1, 6, 7, 8, 9), the storage format of every dataset;
* type index ``0..4`` in the order H, C, N, O, F, the one-hot position used by models;
* element symbols, for file I/O and RDKit.
"""
from __future__ import annotations

import torch

from diffgen.errors import DiffgenError

ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: tuple[int, ...] = (1, 6, 7, 8, 9)
SYMBOL_TO_Z: dict[str, int] = dict(zip(ELEMENTS, ATOMIC_NUMBERS))
Z_TO_SYMBOL: dict[int, str] = dict(zip(ATOMIC_NUMBERS, ELEMENTS))
NUM_TYPES = len(ELEMENTS)

# lookup table: atomic number -> type index (-1 for elements outside the vocabulary)
_Z_TO_INDEX = torch.full((max(ATOMIC_NUMBERS) + 1,), -1, dtype=torch.long)
for _i, _z in enumerate(ATOMIC_NUMBERS):
    _Z_TO_INDEX[_z] = _i
_INDEX_TO_Z = torch.tensor(ATOMIC_NUMBERS, dtype=torch.long)


def z_to_index(z: torch.Tensor) -> torch.Tensor:
    """Map atomic numbers ``z`` (any shape, int) to type indices 0..4 (same shape).

    Raises:
        DiffgenError: if any atomic number is not one of H, C, N, O, F.
    """
    z = torch.as_tensor(z, dtype=torch.long)
    bad = (z < 0) | (z >= _Z_TO_INDEX.numel())
    idx = _Z_TO_INDEX.to(z.device)[z.clamp(0, _Z_TO_INDEX.numel() - 1)]
    bad = bad | (idx < 0)
    if bool(bad.any()):
        unknown = sorted({int(v) for v in z[bad].tolist()})
        raise DiffgenError(f"unsupported atomic number(s) {unknown}: only H, C, N, O, F (1, 6, 7, 8, 9) are supported")
    return idx


def index_to_z(index: torch.Tensor) -> torch.Tensor:
    """Map type indices 0..4 (any shape) to atomic numbers (same shape)."""
    return _INDEX_TO_Z.to(index.device)[index]


def symbol_to_z(symbol: str) -> int:
    """Atomic number of an element symbol ('C', 'c' and ' C ' all work).

    Raises:
        DiffgenError: for symbols outside H, C, N, O, F.
    """
    s = symbol.strip().capitalize()
    if s not in SYMBOL_TO_Z:
        raise DiffgenError(f"unsupported element {symbol.strip()!r}: only H, C, N, O, F are supported")
    return SYMBOL_TO_Z[s]
