"""QM9 (130,831 molecules, B3LYP/6-31G(2df,p) geometries in Å) from the PyPI package ``qm9pack``.

The CSVs shipped in ``qm9pack`` are parsed once into a PyTorch Geometric
:class:`~torch_geometric.data.InMemoryDataset` cached under ``root`` (default
``$DIFFGEN_CACHE`` or ``~/.cache/diffgen``); later loads read the processed file
in a few seconds. The processed files are written atomically with a version/integrity
stamp and verified on every load (:mod:`diffgen.data.cache`): a broken one is rebuilt.

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

from diffgen.data.cache import CacheError, default_cache_dir, note, verify, write_stamped
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


#: Format version of the processed files (stamped beside each; bump when their content or layout changes).
CACHE_VERSION = 1
#: The six processed files of one H setting, in the order of ``QM9.processed_file_names``.
_FILE_KEYS = ("train", "valid", "test", "all", "half0", "half1")
_FILE_SIZES = {**SPLIT_SIZES, "all": N_MOLECULES,
               "half0": SPLIT_SIZES["train"] // 2, "half1": SPLIT_SIZES["train"] - SPLIT_SIZES["train"] // 2}


def molecules_from_table(df, remove_h: bool = False, progress: bool = False) -> list[Data]:
    """One :class:`~torch_geometric.data.Data` per row of a qm9pack table, in row order.

    Args:
        df: rows of :func:`read_qm9pack` (columns ``Index``, ``Elements``, ``XYZ_Ang`` and the target columns).
        remove_h: drop hydrogen atoms (``z == 1``) and their positions; ``y`` and ``idx`` are unchanged.
        progress: show a progress bar.

    Returns:
        list of ``Data(z [n] long, pos [n, 3] float Å, y [1, 12] float, idx [1] long)`` (see module docstring).
    """
    y = np.stack([df[_CSV_COLUMNS[t]].to_numpy(np.float64) for t in TARGETS], axis=1)
    for t in _HARTREE_TARGETS:
        y[:, TARGETS.index(t)] *= HARTREE_TO_EV
    y = torch.tensor(y, dtype=torch.float32)
    rows = zip(df["Elements"], df["XYZ_Ang"], df["Index"])
    if progress:
        from rich.progress import track

        rows = track(rows, total=len(df), description=f"Processing QM9 ({'no H' if remove_h else 'with H'})")
    data_list = []
    for i, (els, xyz, idx) in enumerate(rows):
        z = torch.tensor(_parse_elements(els), dtype=torch.long)
        pos = torch.tensor(_parse_positions(xyz), dtype=torch.float32)
        if remove_h:
            keep = z != 1
            z, pos = z[keep], pos[keep]
        data_list.append(Data(z=z, pos=pos, y=y[i:i + 1], idx=torch.tensor([int(idx)])))
    return data_list


class QM9(InMemoryDataset):
    """One split of QM9 as a PyG InMemoryDataset (see module docstring for the fields).

    The processed files (one per split and H setting, plus one of SMILES) are built once from qm9pack,
    written atomically and stamped (:mod:`diffgen.data.cache`); each load verifies the stamp, and a
    missing, empty, truncated, stale or swapped file is rebuilt (about half a minute, one line on stderr).

    Args:
        root: cache folder; the processed file lives in ``root/qm9/processed``. Default
            :func:`~diffgen.data.cache.default_cache_dir`.
        split: ``"train"``, ``"valid"``, ``"test"``, or ``"all"`` (index order).
        remove_h: drop hydrogen atoms (the "QM9 without H" setting of EDM).
        subset: optional ``"half0"``/``"half1"``: the train split cut in two halves
            (first/second 50,000 of the seed-0 permutation), as used by EDM for the
            conditional-generation protocol (generator on one half, property classifier on the other).
        transform: optional PyG transform applied on access.

    Raises:
        DiffgenError: unknown split/subset, missing qm9pack data, or a cache file that cannot be written
            or still does not load after a rebuild.
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
        self._smiles: list[str] | None = None
        root = Path(root) if root is not None else default_cache_dir()
        # no process()/download() methods: PyG leaves the folder alone and this class owns its files
        super().__init__(str(root / "qm9"), transform=transform)
        key = self.subset or self.split
        self._ensure(key)
        path = self._path(key)
        try:
            self.load(str(path))
        except Exception as exc:  # noqa: BLE001 - a stamped file that does not load is a cache problem
            raise CacheError(path, f"unreadable: {_first_line(exc)}", "delete it; diffgen rebuilds it") from None

    @property
    def smiles(self) -> list[str]:
        """GDB SMILES (qm9pack column) of every stored molecule of this split, in storage order.

        Loaded (and verified, rebuilt if broken) on first access.
        """
        if self._smiles is None:
            self._ensure("smiles")
            path = self._path("smiles")
            try:
                lists = torch.load(path, weights_only=True)
                smiles = lists[_FILE_KEYS.index(self.subset or self.split)]
            except Exception as exc:  # noqa: BLE001
                raise CacheError(path, f"unreadable: {_first_line(exc)}", "delete it; diffgen rebuilds it") from None
            self._smiles = smiles
        return self._smiles

    # --- processed files --------------------------------------------------------------
    @property
    def processed_file_names(self) -> list[str]:
        h = "noH" if self.remove_h else "H"
        return [f"{k}_{h}.pt" for k in _FILE_KEYS] + [f"smiles_{h}.pt"]

    def _path(self, key: str) -> Path:
        return Path(self.processed_paths[-1 if key == "smiles" else _FILE_KEYS.index(key)])

    def _kind(self, key: str) -> str:
        return f"qm9/{key}_{'noH' if self.remove_h else 'H'}"

    def _verify(self, key: str) -> None:
        counts = dict(_FILE_SIZES) if key == "smiles" else {"molecules": _FILE_SIZES[key]}
        verify(self._path(key), self._kind(key), CACHE_VERSION, counts, fix="delete it; diffgen rebuilds it")

    def _ensure(self, key: str) -> None:
        """Verify the file of ``key``; rebuild this H setting's files if it is missing or broken.

        Raises:
            CacheError: the file still fails verification after the rebuild.
        """
        try:
            self._verify(key)
            return
        except CacheError as err:
            if err.reason != "missing":
                note(f"{err.path} is unusable ({err.reason}); rebuilding the QM9 cache")
        self._build()
        self._verify(key)

    def _build(self) -> None:
        """Parse qm9pack into the six split files and the SMILES file of this H setting (atomic, stamped)."""
        df = read_qm9pack()
        if len(df) != N_MOLECULES:
            raise DiffgenError(f"qm9pack holds {len(df)} molecules, expected {N_MOLECULES}")
        data_list = molecules_from_table(df, self.remove_h, progress=True)
        smiles = df["SMILES"].tolist()
        splits = split_indices(len(df))
        half = _FILE_SIZES["half0"]
        order = {**splits, "all": np.arange(len(df)), "half0": splits["train"][:half], "half1": splits["train"][half:]}
        all_smiles = []
        try:
            for key in _FILE_KEYS:
                rows = order[key]
                data, slices = self.collate([data_list[r] for r in rows])
                write_stamped(self._path(key), lambda tmp: torch.save((data.to_dict(), slices, data.__class__), tmp),
                              self._kind(key), CACHE_VERSION, {"molecules": len(rows), "atoms": data.z.numel()})
                all_smiles.append([smiles[r] for r in rows])
            write_stamped(self._path("smiles"), lambda tmp: torch.save(all_smiles, tmp), self._kind("smiles"),
                          CACHE_VERSION, {k: len(v) for k, v in zip(_FILE_KEYS, all_smiles)})
        except OSError as exc:
            raise DiffgenError(f"cannot write the QM9 cache in {self.processed_dir}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def node_count_histogram(dataset: QM9, max_nodes: int = 29) -> torch.Tensor:
    """Counts of molecules by number of atoms: ``[max_nodes + 1]`` long, index = atom count."""
    counts = dataset.slices["z"][1:] - dataset.slices["z"][:-1]
    if dataset._indices is not None:  # an index-selected view (ds[idx], ds[:k]) shares the full storage
        counts = counts[torch.tensor(list(dataset.indices()), dtype=torch.long)]
    return torch.bincount(counts, minlength=max_nodes + 1)
