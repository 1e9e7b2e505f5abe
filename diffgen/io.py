"""Reading and writing molecules as SDF and XYZ files.

A molecule is a pair ``(z, pos)``: atomic numbers, int array of shape (n,) (H, C, N,
O, F only), and positions in ångström (Å), float array of shape (n, 3).

* :func:`write_sdf` writes a multi-record SDF with 3D coordinates and the bonds
  inferred from distances with the EDM tables (Hoogeboom et al. 2022), so that any
  viewer shows the bonds that the evaluation used. Molecules are written unsanitized
  (and not kekulized), hence invalid molecules are written too.
* :func:`write_xyz` writes a multi-frame XYZ file.
* :func:`read_molecules` reads either format back, validating the contents.

Every problem caused by the file (missing, empty, unreadable, malformed, unsupported
element, no 3D coordinates, ...) raises :class:`~diffgen.errors.DiffgenError` with a
one-line message.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from rdkit import Chem
from rdkit.rdBase import BlockLogs

from diffgen.data.elements import Z_TO_SYMBOL, symbol_to_z
from diffgen.errors import DiffgenError
from diffgen.eval.bonds import as_numpy_molecule, type_indices
from diffgen.eval.chem import to_rdkit

__all__ = ["SDF_DECIMALS", "ensure_new", "sdf_record", "write_sdf", "write_xyz", "read_molecules"]

Molecule = tuple[np.ndarray, np.ndarray]

# molfile V2000 coordinates are written as %10.4f: larger magnitudes break the columns
_SDF_MAX_COORD = 99999.0
#: Decimals of an SDF coordinate (Å). Sampled molecules are rounded to this before they are scored and written
#: (:func:`diffgen.tasks.generation.build.generate_molecules`), so the files re-score to the reported metrics.
SDF_DECIMALS = 4


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> DiffgenError:
    return DiffgenError(_one_line(message))


def ensure_new(path: str | os.PathLike) -> Path:
    """Refuse to overwrite: raise if ``path`` already exists.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DiffgenError: if something (file, directory, link) already exists at ``path``.
    """
    p = Path(path)
    if p.exists() or p.is_symlink():
        raise _error(f"{p} already exists; refusing to overwrite it (choose another path or remove it first)")
    return p


def _prepare(molecules: Iterable, fmt: str) -> list[Molecule]:
    """Validate and convert all molecules before anything is written."""
    out = []
    for k, mol in enumerate(molecules, start=1):
        try:
            z, pos = mol
        except (TypeError, ValueError):
            raise _error(f"molecule {k} is not a (z, pos) pair") from None
        try:
            z, pos = as_numpy_molecule(z, pos)
            type_indices(z)
        except DiffgenError as exc:
            raise _error(f"molecule {k}: {exc}") from None
        if z.size == 0:
            raise _error(f"molecule {k} has no atoms")
        if not np.all(np.isfinite(pos)):
            raise _error(f"molecule {k} has non-finite coordinates; cannot write it as {fmt}")
        if fmt == "SDF" and np.abs(pos).max() >= _SDF_MAX_COORD:
            raise _error(f"molecule {k} has coordinates beyond {_SDF_MAX_COORD:g} Å, too large for an SDF file")
        out.append((z, pos))
    return out


def _check_writable(path: Path, overwrite: bool):
    if not overwrite:
        ensure_new(path)
    if path.is_dir():
        raise _error(f"{path} is a directory, not a file")
    if not path.parent.is_dir():
        raise _error(f"cannot write {path}: directory {path.parent} does not exist")


def sdf_record(z, pos, name: str, props: dict | None = None) -> Chem.RWMol:
    """One SDF record as an RDKit molecule: atoms in input order, a 3D conformer (Å) and the EDM distance-inferred
    bonds (:func:`diffgen.eval.chem.to_rdkit`), not sanitized (property cache updated leniently), titled ``name``,
    with ``props`` as string properties (one line each; None values skipped).

    Raises:
        DiffgenError: malformed molecule or elements outside H, C, N, O, F.
    """
    mol = to_rdkit(z, pos, add_conformer=True)
    mol.UpdatePropertyCache(strict=False)
    mol.SetProp("_Name", name)
    for key, value in (props or {}).items():
        if value is not None:
            mol.SetProp(_one_line(key), _one_line(value))
    return mol


def write_sdf(
    path: str | os.PathLike,
    molecules: Iterable,
    props: Sequence[dict] | None = None,
    overwrite: bool = True,
) -> None:
    """Write molecules to a multi-record SDF file (V2000; RDKit switches to V3000 above 999 atoms).

    Each record holds the atoms in input order, 3D coordinates in Å (4 decimals) and
    the EDM distance-inferred bonds (single / double / triple); molecules are not
    sanitized or kekulized, so chemically invalid samples are written as they are.
    Records are titled ``mol_<k>`` (1-based).

    Args:
        path: output file.
        molecules: iterable of ``(z, pos)``; z (n,) int, pos (n, 3) Å.
        props: optional list (one dict per molecule) of properties written as SDF data
            tags (``> <key>``); values are written with ``str``; None values are skipped.
        overwrite: if False, raise instead of replacing an existing file.

    Raises:
        DiffgenError: invalid molecules (shape, element, non-finite or huge
            coordinates), ``props`` of the wrong length, unwritable path.
    """
    path = Path(path)
    mols = _prepare(molecules, "SDF")
    if props is not None:
        props = list(props)
        if len(props) != len(mols):
            raise _error(f"got {len(props)} property dicts for {len(mols)} molecules")
    _check_writable(path, overwrite)
    try:
        writer = Chem.SDWriter(str(path))
    except Exception as exc:  # RDKit raises OSError/RuntimeError depending on version
        raise _error(f"cannot write {path}: {exc}") from None
    try:
        writer.SetKekulize(False)
        for k, (z, pos) in enumerate(mols):
            writer.write(sdf_record(z, pos, f"mol_{k + 1}", props[k] if props is not None else None))
    except OSError as exc:
        raise _error(f"cannot write {path}: {exc}") from None
    finally:
        writer.close()


def write_xyz(
    path: str | os.PathLike,
    molecules: Iterable,
    comments: Sequence[str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write molecules to a multi-frame XYZ file.

    Each frame: the atom count, a comment line (``comments[k]`` with newlines replaced
    by spaces; default ``mol_<k>``), then one ``Sym x y z`` line per atom with
    coordinates in Å and 6 decimals.

    Raises:
        DiffgenError: invalid molecules, ``comments`` of the wrong length, unwritable path.
    """
    path = Path(path)
    mols = _prepare(molecules, "XYZ")
    if comments is not None:
        comments = list(comments)
        if len(comments) != len(mols):
            raise _error(f"got {len(comments)} comments for {len(mols)} molecules")
    _check_writable(path, overwrite)
    lines: list[str] = []
    for k, (z, pos) in enumerate(mols):
        comment = _one_line(comments[k]) if comments is not None else f"mol_{k + 1}"
        lines.append(str(z.size))
        lines.append(comment)
        for zi, (x, y, w) in zip(z.tolist(), pos.tolist()):
            lines.append(f"{Z_TO_SYMBOL[zi]} {x:.6f} {y:.6f} {w:.6f}")
    try:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise _error(f"cannot write {path}: {exc.strerror or exc}") from None


def read_molecules(path: str | os.PathLike) -> list[Molecule]:
    """Read all molecules of an ``.sdf`` or ``.xyz`` file (suffix, case-insensitive).

    Returns:
        list of ``(z, pos)``: ``z`` int64 (n,), ``pos`` float64 (n, 3) in Å.

    Raises:
        DiffgenError: missing file, directory, empty or binary file, unsupported
            suffix, an SDF record RDKit cannot parse (named by its 1-based number) or
            without 3D coordinates, malformed XYZ (bad counts, non-numeric or
            non-finite coordinates), elements outside H, C, N, O, F, or no molecules.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".sdf", ".xyz"):
        raise _error(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; expected .sdf or .xyz")
    if not path.exists():
        raise _error(f"{path}: no such file")
    if path.is_dir():
        raise _error(f"{path} is a directory, not a molecule file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _error(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise _error(f"{path} is empty")
    if b"\x00" in data:
        raise _error(f"{path} is not a text file")
    if suffix == ".xyz":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _error(f"{path} is not a UTF-8 text file") from None
        mols = _parse_xyz(text, path)
    else:
        mols = _read_sdf(path)
    if not mols:
        raise _error(f"{path} contains no molecules")
    return mols


def _read_sdf(path: Path) -> list[Molecule]:
    block = BlockLogs()  # we report problems ourselves, one line each
    try:
        try:
            supplier = Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)
        except OSError as exc:
            raise _error(f"cannot read {path}: {exc}") from None
        n_records = len(supplier)  # counted before iterating: afterwards RDKit reports only the records it yielded
        out: list[Molecule] = []
        for k, mol in enumerate(supplier, start=1):
            if mol is None:
                raise _error(f"{path}: SDF record {k} could not be parsed by RDKit")
            n = mol.GetNumAtoms()
            if n == 0:
                raise _error(f"{path}: SDF record {k} has no atoms")
            if mol.GetNumConformers() == 0:
                raise _error(f"{path}: SDF record {k} has no 3D coordinates")
            conf = mol.GetConformer()
            pos = np.asarray(conf.GetPositions(), dtype=np.float64).reshape(n, 3)
            if not conf.Is3D() or (n > 1 and not np.any(pos)):
                raise _error(f"{path}: SDF record {k} has no 3D coordinates (2D or all-zero coordinates)")
            if not np.all(np.isfinite(pos)):
                raise _error(f"{path}: SDF record {k} has non-finite coordinates")
            try:
                z = np.array([symbol_to_z(a.GetSymbol()) for a in mol.GetAtoms()], dtype=np.int64)
            except DiffgenError as exc:
                raise _error(f"{path}: SDF record {k}: {exc}") from None
            out.append((z, pos))
        if len(out) < n_records:  # RDKit's iterator silently drops an unparsable last record
            raise _error(f"{path}: SDF record {len(out) + 1} of {n_records} (the last) could not be parsed by RDKit")
        return out
    finally:
        del block


def _parse_float(token: str, path: Path, lineno: int) -> float:
    try:
        value = float(token)
    except ValueError:
        raise _error(f"{path}, line {lineno}: coordinate {token!r} is not a number") from None
    if not math.isfinite(value):
        raise _error(f"{path}, line {lineno}: coordinate {token!r} is not finite")
    return value


def _parse_element(token: str, path: Path, lineno: int) -> int:
    try:
        if token.isdigit():  # some programs write atomic numbers instead of symbols
            z = int(token)
            if z not in Z_TO_SYMBOL:
                raise DiffgenError(f"unsupported atomic number {z}: only H, C, N, O, F (1, 6, 7, 8, 9) are supported")
            return z
        return symbol_to_z(token)
    except DiffgenError as exc:
        raise _error(f"{path}, line {lineno}: {exc}") from None


def _parse_xyz(text: str, path: Path) -> list[Molecule]:
    lines = text.splitlines()
    out: list[Molecule] = []
    i = 0
    frame = 0
    while i < len(lines):
        if not lines[i].strip():  # blank lines between / after frames
            i += 1
            continue
        frame += 1
        count_line = lines[i].strip()
        lineno = i + 1
        try:
            n = int(count_line)
        except ValueError:
            if frame > 1 and len(count_line.split()) >= 4:
                raise _error(
                    f"{path}, line {lineno}: frame {frame - 1} has more atom lines than its declared count "
                    f"{out[-1][0].size}"
                ) from None
            raise _error(f"{path}, line {lineno}: expected an atom count, got {count_line[:40]!r}") from None
        if n <= 0:
            raise _error(f"{path}, line {lineno}: frame {frame} declares {n} atoms; expected at least 1")
        if i + 1 >= len(lines):
            raise _error(f"{path}: frame {frame} (line {lineno}) has no comment line")
        atom_lines = lines[i + 2 : i + 2 + n]
        z = np.empty(n, dtype=np.int64)
        pos = np.empty((n, 3), dtype=np.float64)
        for a, line in enumerate(atom_lines):
            ln = i + 3 + a
            tokens = line.split()
            if len(tokens) < 4:
                raise _error(
                    f"{path}, line {ln}: frame {frame} declares {n} atoms but atom line {a + 1} "
                    f"has {len(tokens)} fields; expected 'Symbol x y z'"
                )
            z[a] = _parse_element(tokens[0], path, ln)
            pos[a] = [_parse_float(t, path, ln) for t in tokens[1:4]]
        if len(atom_lines) < n:
            raise _error(
                f"{path}: frame {frame} (line {lineno}) declares {n} atoms but only {len(atom_lines)} atom lines follow"
            )
        out.append((z, pos))
        i += 2 + n
    return out
