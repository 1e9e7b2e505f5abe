"""2D depictions of generated molecules (RDKit), for looking at samples rather than reading them.

Each molecule is drawn as evaluated: its atoms and EDM distance-inferred bonds (:func:`diffgen.eval.chem.to_rdkit`),
hydrogens hidden except those with a bond count other than one. Atoms whose bond orders do not add up to their
allowed valence (EDM atom stability, :func:`diffgen.eval.stability.atom_stability`) are highlighted in red, and each
caption gives the molecule's index and its flags (EDM stability, RDKit validity, fragments, hydrogens RDKit adds).
"""
from __future__ import annotations

from pathlib import Path

from rdkit import Chem
from rdkit.Chem import rdDepictor
from rdkit.Chem.Draw import rdMolDraw2D
from rdkit.rdBase import BlockLogs

from diffgen.errors import DiffgenError
from diffgen.eval.bonds import as_numpy_molecule, bond_orders
from diffgen.eval.chem import rdkit_report, to_rdkit
from diffgen.eval.stability import atom_stability

__all__ = ["depiction", "caption", "draw_grid"]

_ORIG = "diffgen_atom"  # atom property: index in the input molecule
HIGHLIGHT = (0.95, 0.3, 0.3)  # RGB of atoms that break their valence


def depiction(z, pos) -> tuple[Chem.Mol, list[int], dict]:
    """The molecule to draw, the atoms to highlight (indices in it) and its flags.

    Returns:
        ``(mol, highlight, flags)``: ``mol`` with 2D coordinates, hydrogens with exactly one bond removed;
        ``highlight`` its atoms whose EDM bond orders do not sum to their allowed valence; ``flags`` the
        :func:`~diffgen.eval.chem.rdkit_report` dict plus ``unstable_atoms`` (count, hydrogens included) and
        ``n_atoms``.

    Raises:
        DiffgenError: malformed molecule or elements outside H, C, N, O, F.
    """
    z, pos = as_numpy_molecule(z, pos)
    bonds = bond_orders(z, pos)
    stable = atom_stability(z, pos, bonds)
    mol = to_rdkit(z, pos, bonds, add_conformer=False)
    flags = rdkit_report(mol)
    flags.update(unstable_atoms=int((~stable).sum()), n_atoms=int(z.size))
    for atom in mol.GetAtoms():
        atom.SetIntProp(_ORIG, atom.GetIdx())
    block = BlockLogs()
    try:
        mol.UpdatePropertyCache(strict=False)
        # RemoveHs keeps hydrogens with no bond or several bonds by default: exactly the unstable ones
        drawn = Chem.RemoveHs(mol, sanitize=False)
        drawn.UpdatePropertyCache(strict=False)
        rdDepictor.Compute2DCoords(drawn)
    finally:
        del block
    highlight = [a.GetIdx() for a in drawn.GetAtoms() if not stable[a.GetIntProp(_ORIG)]]
    return drawn, highlight, flags


def _heavy_smiles(smiles: str | None) -> str | None:
    """The SMILES without explicit hydrogens (shorter captions), or None."""
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    return Chem.MolToSmiles(Chem.RemoveHs(mol)) if mol is not None else None


def caption(index: int, flags: dict) -> str:
    """Two-line legend: ``#index SMILES`` (heavy atoms of the largest fragment, or "invalid"), then the flags,
    e.g. ``stable, valid`` or ``2 atoms unstable, valid +2 H, 2 fragments``."""
    first = f"#{index} {_heavy_smiles(flags['smiles']) or 'invalid'}"
    bad = flags["unstable_atoms"]
    parts = ["stable" if bad == 0 else f"{bad} atom{'s' if bad > 1 else ''} unstable"]
    if flags["smiles"] is None:
        parts.append("invalid")
    else:
        parts.append("valid" + (f" +{flags['implicit_hs']} H" if flags["implicit_hs"] else ""))
    if flags["n_fragments"] > 1:
        parts.append(f"{flags['n_fragments']} fragments")
    return f"{first}\n{', '.join(parts)}"


def draw_grid(molecules, path: str | Path, per_row: int = 6, size: int = 250, start: int = 1) -> Path:
    """Write a grid of 2D depictions (:func:`depiction`), captioned by :func:`caption`, as PNG or SVG (by suffix).

    Args:
        molecules: sequence of ``(z [n], pos [n, 3] Å)``.
        path: output ``.png`` or ``.svg``.
        per_row: molecules per row.
        size: panel width and height in pixels.
        start: index of the first molecule in the captions (1 = SDF record numbers).

    Returns:
        ``path`` as a Path.

    Raises:
        DiffgenError: another suffix, no molecules, malformed molecules.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise DiffgenError(f"{path} must end in .png or .svg")
    molecules = list(molecules)
    if not molecules:
        raise DiffgenError("no molecules to draw")
    mols, legends, highlights = [], [], []
    for k, (z, pos) in enumerate(molecules, start=start):
        mol, hl, flags = depiction(z, pos)
        mols.append(mol)
        highlights.append(hl)
        legends.append(caption(k, flags))
    cols = min(per_row, len(mols))
    rows = (len(mols) + cols - 1) // cols
    if suffix == ".svg":  # text as <text> elements (selectable, searchable) rather than glyph outlines
        drawer = rdMolDraw2D.MolDraw2DSVG(cols * size, rows * size, size, size, noFreetype=True)
    else:
        drawer = rdMolDraw2D.MolDraw2DCairo(cols * size, rows * size, size, size)
    opts = drawer.drawOptions()
    opts.legendFraction = 0.2
    opts.legendFontSize = 14
    colours = [{i: HIGHLIGHT for i in hl} for hl in highlights]
    block = BlockLogs()
    try:
        drawer.DrawMolecules(mols, legends=legends, highlightAtoms=highlights, highlightAtomColors=colours,
                             highlightBonds=[[] for _ in mols])
    finally:
        del block
    drawer.FinishDrawing()
    data = drawer.GetDrawingText()
    if suffix == ".svg":
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path
