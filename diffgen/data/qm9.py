"""QM9 (130,831 molecules, B3LYP/6-31G(2df,p) geometries in Å) from the PyPI package ``qm9pack``.

The CSVs shipped in ``qm9pack`` are parsed once into a PyTorch Geometric
:class:`~torch_geometric.data.InMemoryDataset` cached under ``root`` (default
``$DIFFGEN_CACHE`` or ``~/.cache/diffgen``); later loads read the processed file
in a few seconds.

Each molecule is a :class:`~torch_geometric.data.Data` with

* ``z``: ``[n]`` long, atomic numbers (H, C, N, O, F);
* ``pos``: ``[n, 3]`` float, positions in Å;
* ``y``: ``[1, 12]`` float, the 12 standard regression targets in the order of
  :data:`TARGETS` and the units of :data:`TARGET_UNITS` (energies in eV);
* ``idx``: ``[1]`` long, the 1-based GDB-9 index.

The standard split (Anderson et al. 2019 Cormorant; Satorras et al. 2021 EGNN;
Hoogeboom et al. 2022 EDM) is a numpy seed-0 permutation of the 130,831 molecules
sorted by GDB-9 index: 100,000 train / 17,748 valid / 13,083 test.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch_geometric.data import Data, InMemoryDataset

from diffgen.data.cache import default_cache_dir
from diffgen.data.elements import SYMBOL_TO_Z
from diffgen.errors import DiffgenError

HARTREE_TO_EV = 27.211386246

#: The 12 standard QM9 regression targets (Gilmer et al. 2017; EGNN Table 3 order differs).
TARGETS: tuple[str, ...] = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv")
#: Units in which ``Data.y`` stores each target.
TARGET_UNITS: dict[str, str] = {
    "mu": "D", "alpha": "bohr^3", "homo": "eV", "lumo": "eV", "gap": "eV", "r2": "bohr^2",
    "zpve": "eV", "U0": "eV", "U": "eV", "H": "eV", "G": "eV", "Cv": "cal/mol/K",
}
_CSV_COLUMNS = {
    "mu": "Dipole_debye", "alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au", "r2": "R2_bohr2", "zpve": "ZPVE_au", "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au", "H": "Enthalphy_298K_au", "G": "GibbsFreeEnergy_298K_au",
    "Cv": "Heatcapacity_Cv_cal_mol_K",
}
_HARTREE_TARGETS = ("homo", "lumo", "gap", "zpve", "U0", "U", "H", "G")

#: Thermochemical atom reference values (QM9 atomref table, Ramakrishnan et al. 2014),
#: per atomic number, in the units of TARGET_UNITS (eV; cal/mol/K for Cv).
ATOMREF: dict[str, dict[int, float]] = {
    "U0": {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730},
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063163, 9: -99.717314},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062219, 9: -99.716370},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079532, 9: -99.733544},
    "Cv": {1: 2.981, 6: 2.981, 7: 2.981, 8: 2.981, 9: 2.981},
}
for _k in ("U0", "U", "H", "G"):
    ATOMREF[_k] = {z: v * HARTREE_TO_EV for z, v in ATOMREF[_k].items()}

N_MOLECULES = 130_831
SPLIT_SIZES = {"train": 100_000, "valid": 17_748, "test": 13_083}
SPLITS = ("train", "valid", "test")


def qm9pack_data_dir() -> Path:
    """Folder holding qm9pack's CSVs (found without importing qm9pack, whose ``__init__`` is broken)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DiffgenError("the QM9 data package is missing: pip install qm9pack")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def split_indices(n: int = N_MOLECULES) -> dict[str, np.ndarray]:
    """Row indices (into the index-sorted table) of the standard seed-0 split.

    Returns a dict ``{"train": [100000], "valid": [17748], "test": [13083]}``.
    """
    rng = np.random.RandomState(0)  # identical stream to np.random.seed(0); np.random.permutation
    perm = rng.permutation(n)
    n_train = SPLIT_SIZES["train"]
    n_test = int(0.1 * n)
    n_valid = n - n_train - n_test
    return {
        "train": perm[:n_train],
        "valid": perm[n_train:n_train + n_valid],
        "test": perm[n_train + n_valid:],
    }


def _parse_positions(s: str) -> np.ndarray:
    return np.fromstring(s.replace("[", " ").replace("]", " "), sep=",").reshape(-1, 3)


def _parse_elements(s: str) -> list[int]:
    return [SYMBOL_TO_Z[e.strip().strip("'\"")] for e in s.strip("[]").split(",")]


def read_qm9pack(data_dir: Path | None = None):
    """Read qm9pack's CSVs into a pandas DataFrame sorted by GDB-9 ``Index`` (130,831 rows)."""
    import pandas as pd

    data_dir = data_dir or qm9pack_data_dir()
    cols = ["Index", "SMILES", "Elements", "XYZ_Ang", *_CSV_COLUMNS.values()]
    parts = sorted(data_dir.glob("qm9_part*.csv"))
    if not parts:
        raise DiffgenError(f"no qm9_part*.csv files in {data_dir}; reinstall qm9pack")
    df = pd.concat([pd.read_csv(p, usecols=cols) for p in parts], ignore_index=True)
    return df.sort_values("Index").reset_index(drop=True)


class QM9(InMemoryDataset):
    """One split of QM9 as a PyG InMemoryDataset (see module docstring for the fields).

    Args:
        root: cache folder; the processed file lives in ``root/qm9/processed``. Default
            :func:`default_cache_dir`.
        split: ``"train"``, ``"valid"``, ``"test"``, or ``"all"`` (index order).
        remove_h: drop hydrogen atoms (the "QM9 without H" setting of EDM).
        subset: optional ``"half0"``/``"half1"``: the train split cut in two halves
            (first/second 50,000 of the seed-0 permutation), as used by EDM for the
            conditional-generation protocol (generator on one half, property classifier on the other).
        transform: optional PyG transform applied on access.

    Raises:
        DiffgenError: unknown split/subset or missing qm9pack data.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        remove_h: bool = False,
        subset: str | None = None,
        transform: Callable | None = None,
    ):
        if split not in (*SPLITS, "all"):
            raise DiffgenError(f"unknown split {split!r}: choose train, valid, test or all")
        if subset not in (None, "half0", "half1"):
            raise DiffgenError(f"unknown subset {subset!r}: choose half0 or half1")
        if subset is not None and split != "train":
            raise DiffgenError("subset halves are defined on the train split only")
        self.split, self.remove_h, self.subset = split, remove_h, subset
        root = Path(root) if root is not None else default_cache_dir()
        super().__init__(str(root / "qm9"), transform=transform)
        self.load(self.processed_paths[self._file_index()])
        self.smiles: list[str] = torch.load(self.processed_paths[-1], weights_only=False)[self._file_index()]

    # --- InMemoryDataset plumbing -------------------------------------------------
    @property
    def raw_file_names(self) -> list[str]:
        return []

    def download(self) -> None:  # data come from the installed qm9pack wheel
        pass

    def _names(self) -> list[str]:
        h = "noH" if self.remove_h else "H"
        names = [f"{s}_{h}" for s in SPLITS] + [f"all_{h}", f"half0_{h}", f"half1_{h}"]
        return names

    def _file_index(self) -> int:
        key = self.subset or self.split
        return ["train", "valid", "test", "all", "half0", "half1"].index(key)

    @property
    def processed_file_names(self) -> list[str]:
        return [f"{n}.pt" for n in self._names()] + [f"smiles_{'noH' if self.remove_h else 'H'}.pt"]

    def process(self) -> None:
        from rich.progress import track

        df = read_qm9pack()
        if len(df) != N_MOLECULES:
            raise DiffgenError(f"qm9pack holds {len(df)} molecules, expected {N_MOLECULES}")
        y = np.stack([df[_CSV_COLUMNS[t]].to_numpy(np.float64) for t in TARGETS], axis=1)
        for t in _HARTREE_TARGETS:
            y[:, TARGETS.index(t)] *= HARTREE_TO_EV
        y = torch.tensor(y, dtype=torch.float32)
        data_list = []
        for i, (els, xyz, idx) in enumerate(
            track(zip(df["Elements"], df["XYZ_Ang"], df["Index"]), total=len(df),
                  description=f"Processing QM9 ({'no H' if self.remove_h else 'with H'})")
        ):
            z = torch.tensor(_parse_elements(els), dtype=torch.long)
            pos = torch.tensor(_parse_positions(xyz), dtype=torch.float32)
            if self.remove_h:
                keep = z != 1
                z, pos = z[keep], pos[keep]
            data_list.append(Data(z=z, pos=pos, y=y[i:i + 1], idx=torch.tensor([int(idx)])))
        smiles = df["SMILES"].tolist()
        splits = split_indices(len(df))
        half = SPLIT_SIZES["train"] // 2
        order = {
            **splits,
            "all": np.arange(len(df)),
            "half0": splits["train"][:half],
            "half1": splits["train"][half:],
        }
        all_smiles = []
        for name, path in zip(["train", "valid", "test", "all", "half0", "half1"], self.processed_paths[:-1]):
            rows = order[name]
            self.save([data_list[r] for r in rows], path)
            all_smiles.append([smiles[r] for r in rows])
        torch.save(all_smiles, self.processed_paths[-1])


def node_count_histogram(dataset: QM9, max_nodes: int = 29) -> torch.Tensor:
    """Counts of molecules by number of atoms: ``[max_nodes + 1]`` long, index = atom count."""
    counts = dataset.slices["z"][1:] - dataset.slices["z"][:-1]
    if dataset._indices is not None:  # an index-selected view (ds[idx], ds[:k]) shares the full storage
        counts = counts[torch.tensor(list(dataset.indices()), dtype=torch.long)]
    return torch.bincount(counts, minlength=max_nodes + 1)
