"""QM9 regression targets in the EGNN / Cormorant convention and the units of the EGNN QM9 table.

``QM9.y`` stores the 12 targets in the units of :data:`diffgen.data.qm9.TARGET_UNITS` (energies
in eV). Regression reports them as Satorras et al. 2021 (EGNN, Table 3) and Anderson et al. 2019
(Cormorant) do:

* energies (homo, lumo, gap, zpve, U0, U, H, G) in meV;
* mu in D, alpha in bohr^3, r2 in bohr^2, Cv in cal/mol K;
* U0, U, H, G and Cv minus the sum of the thermochemical atom references of the molecule's atoms
  (the QM9 ``atomref`` table, Ramakrishnan et al. 2014), i.e. atomisation quantities. Cormorant
  subtracts every ``*_thermo`` column of that table; its zpve column is zero, so zpve is unchanged.

Models learn these "regression values"; :func:`diffgen.tasks.regression.predict.predict` adds the atom
references back, so its output is the total property in reported units.
"""
from __future__ import annotations

import torch
from torch_geometric.utils import scatter

from diffgen.data.qm9 import ATOMREF, TARGET_UNITS, TARGETS

#: Reported unit of each target (EGNN Table 3).
REPORT_UNITS: dict[str, str] = {
    "mu": "D", "alpha": "bohr^3", "homo": "meV", "lumo": "meV", "gap": "meV", "r2": "bohr^2",
    "zpve": "meV", "U0": "meV", "U": "meV", "H": "meV", "G": "meV", "Cv": "cal/mol K",
}
#: Multiplier from the stored unit (TARGET_UNITS) to the reported unit.
TO_REPORT: dict[str, float] = {t: (1000.0 if TARGET_UNITS[t] == "eV" else 1.0) for t in TARGETS}
#: Targets whose atom references are subtracted (Cormorant ``subtract_thermo``).
ATOMREF_TARGETS: tuple[str, ...] = ("U0", "U", "H", "G", "Cv")

#: Test MAE of published models on the same split (EGNN Table 3; PaiNN, MACE), reported units.
REFERENCE_MAE: dict[str, dict[str, float]] = {
    "EGNN": {"alpha": 0.071, "gap": 48, "homo": 29, "lumo": 25, "mu": 0.029, "Cv": 0.031, "G": 12, "H": 12,
             "r2": 0.106, "U": 12, "U0": 11, "zpve": 1.55},
    "PaiNN": {"alpha": 0.045, "gap": 46, "homo": 28, "lumo": 20, "mu": 0.012, "Cv": 0.024, "G": 7.4, "H": 6.0,
              "r2": 0.066, "U": 5.8, "U0": 5.9, "zpve": 1.28},
    "MACE": {"alpha": 0.038, "gap": 42, "homo": 22, "lumo": 19, "mu": 0.015, "Cv": 0.021, "G": 5.5, "H": 4.7,
             "r2": 0.210, "U": 4.1, "U0": 4.1, "zpve": 1.23},
}

def column_name(target: str) -> str:
    """CSV column for a target with its unit, e.g. ``gap_meV``, ``alpha_bohr3``, ``Cv_cal_mol_K``."""
    unit = REPORT_UNITS[target].replace("^", "").replace("/", "_").replace(" ", "_")
    return f"{target}_{unit}"


def atomref_table(targets: list[str]) -> torch.Tensor:
    """Atom references in reported units: ``[10, T]`` float64, row = atomic number (0 where none)."""
    table = torch.zeros(10, len(targets), dtype=torch.float64)
    for j, t in enumerate(targets):
        if t in ATOMREF_TARGETS:
            for z, value in ATOMREF[t].items():
                table[z, j] = value * TO_REPORT[t]
    return table


def molecule_atomref(z: torch.Tensor, batch: torch.Tensor, num_graphs: int, table: torch.Tensor) -> torch.Tensor:
    """Sum of atom references per molecule: ``z [N]``, ``batch [N]`` -> ``[num_graphs, T]`` (table's dtype)."""
    return scatter(table.to(z.device)[z], batch, dim=0, dim_size=num_graphs, reduce="sum")


def regression_values(y: torch.Tensor, z: torch.Tensor, batch: torch.Tensor, targets: list[str]) -> torch.Tensor:
    """The values a model learns, in reported units, float64.

    Args:
        y: ``[B, 12]`` stored targets (``QM9.y``, order :data:`TARGETS`).
        z: ``[N]`` atomic numbers; batch: ``[N]`` molecule of each atom.
        targets: canonical names (see :func:`resolve_targets`).

    Returns:
        ``[B, T]``: ``y * TO_REPORT`` minus the molecule's atom references for :data:`ATOMREF_TARGETS`.
    """
    cols = [TARGETS.index(t) for t in targets]
    scale = torch.tensor([TO_REPORT[t] for t in targets], dtype=torch.float64, device=y.device)
    values = y[:, cols].double() * scale
    return values - molecule_atomref(z, batch, y.shape[0], atomref_table(targets))
