"""2D depictions of generated molecules (RDKit), for looking at samples rather than reading them."""
from __future__ import annotations

from pathlib import Path

from rdkit import Chem
from rdkit.Chem import Draw, rdDepictor

from diffgen.eval.chem import smiles_of, to_rdkit


def draw_grid(molecules, path: str | Path, per_row: int = 6, size: int = 250) -> Path:
    """Write a PNG grid: valid molecules drawn from their SMILES (hydrogens hidden) with the SMILES as legend;
    invalid ones drawn from their raw inferred bonds and labelled "invalid".

    Args:
        molecules: iterable of ``(z [n], pos [n, 3] Å)``.
        path: output PNG.
    """
    mols, legends = [], []
    for z, pos in molecules:
        smi = smiles_of(z, pos)
        if smi is not None:
            mol = Chem.RemoveHs(Chem.MolFromSmiles(smi))
            legends.append(Chem.MolToSmiles(mol))
        else:
            mol = to_rdkit(z, pos, add_conformer=False).GetMol()
            mol.UpdatePropertyCache(strict=False)
            legends.append("invalid")
        rdDepictor.Compute2DCoords(mol)
        mols.append(mol)
    img = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=(size, size), legends=legends)
    path = Path(path)
    img.save(str(path))
    return path
