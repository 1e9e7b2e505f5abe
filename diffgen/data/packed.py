"""QM9 splits as resident flat tensors: a compact file for machines without qm9pack/RDKit, and a loader that
builds batches by indexing (no per-molecule ``Data`` objects, no collation).

A packed split is three tensors, the layout of a collated PyG ``InMemoryDataset``:

* ``pos``: ``[A, 3]`` float32, positions in Å of all ``A`` atoms, molecule after molecule;
* ``z``: ``[A]`` uint8 in the file (long in memory), atomic numbers;
* ``ptr``: ``[M + 1]`` long, molecule ``m`` holds atoms ``ptr[m]:ptr[m + 1]``.

The file (``diffgen pack-qm9``) is a safetensors file holding the ``train`` and ``valid`` splits
(``train.pos``, ``train.z``, ``train.ptr``, ``valid.*``) with metadata ``format = "diffgen-packed-qm9"``; the
100,000 training and 17,748 validation molecules with hydrogens take about 28 MB.

:class:`PackedLoader` yields PyG :class:`~torch_geometric.data.Batch` objects with ``pos``, ``z``, ``batch``,
``ptr`` and ``idx`` (the molecule's row in the split) on the tensors' device, so a GPU run keeps the whole split on
the GPU. Shuffling is a seeded permutation per epoch (``seed + epoch``); with ``world_size > 1`` each rank takes
every ``world_size``-th molecule of the permutation (the ``DistributedSampler`` convention), so ranks see
disjoint data.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_geometric.data import Batch

from diffgen.errors import DiffgenError

FORMAT = "diffgen-packed-qm9"
VERSION = "1"
SPLITS = ("train", "valid")


@dataclass
class PackedSplit:
    """One split as flat tensors (see the module docstring for shapes and units)."""

    pos: torch.Tensor
    z: torch.Tensor
    ptr: torch.Tensor

    def __post_init__(self) -> None:
        self.z = self.z.long()
        self.ptr = self.ptr.long()
        self.pos = self.pos.float()

    def __len__(self) -> int:
        return self.ptr.numel() - 1

    @classmethod
    def from_dataset(cls, dataset) -> PackedSplit:
        """Pack a whole (not index-selected) collated PyG ``InMemoryDataset`` with ``pos`` and ``z`` (e.g. QM9)."""
        if getattr(dataset, "_indices", None) is not None:
            raise ValueError("pack the whole dataset, not an index-selected view")
        return cls(dataset._data.pos, dataset._data.z, dataset.slices["z"])

    def node_histogram(self, max_nodes: int = 29) -> torch.Tensor:
        """Counts of molecules by atom count: ``[max_nodes + 1]`` long, index = atom count."""
        return torch.bincount((self.ptr[1:] - self.ptr[:-1]).cpu(), minlength=max_nodes + 1)

    def to(self, device: torch.device | str) -> PackedSplit:
        return PackedSplit(self.pos.to(device), self.z.to(device), self.ptr.to(device))

    def batch(self, rows: torch.Tensor) -> Batch:
        """The molecules ``rows`` (``[B]`` long, on any device) as one PyG ``Batch`` on the split's device."""
        rows = rows.to(self.ptr.device)
        start, counts = self.ptr[rows], self.ptr[rows + 1] - self.ptr[rows]
        ptr = torch.zeros(rows.numel() + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        batch = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
        atoms = start[batch] + torch.arange(batch.numel(), device=rows.device) - ptr[batch]
        out = Batch(pos=self.pos[atoms], z=self.z[atoms], batch=batch, ptr=ptr, idx=rows)
        out._num_graphs = rows.numel()
        return out

    def check(self, name: str, path: Path) -> None:
        """Raise a one-line :class:`DiffgenError` unless the tensors form a valid packed split."""
        n_atoms = self.z.numel()
        bad = None
        if self.pos.shape != (n_atoms, 3):
            bad = f"pos has shape {tuple(self.pos.shape)}, expected ({n_atoms}, 3)"
        elif self.ptr.ndim != 1 or self.ptr.numel() < 2 or int(self.ptr[0]) != 0 or int(self.ptr[-1]) != n_atoms:
            bad = "ptr does not run from 0 to the number of atoms"
        elif bool((self.ptr[1:] <= self.ptr[:-1]).any()):
            bad = "ptr is not strictly increasing (an empty molecule)"
        elif not bool(torch.isfinite(self.pos).all()):
            bad = "pos holds non-finite values"
        elif not bool(((self.z >= 1) & (self.z <= 118)).all()):
            bad = "z holds values that are not atomic numbers"
        if bad:
            raise DiffgenError(f"{path}: split {name!r} is broken: {bad}")


def save_packed(splits: dict[str, PackedSplit], path: str | os.PathLike) -> Path:
    """Write ``splits`` (keys from :data:`SPLITS`) to a safetensors file, atomically. No overwrite check: callers
    run :func:`diffgen.checkpoint_files.check_writable` first."""
    from diffgen.checkpoint_files import write_safetensors

    tensors, meta = {}, {"format": FORMAT, "version": VERSION}
    for name, s in splits.items():
        tensors.update({f"{name}.pos": s.pos.cpu(), f"{name}.z": s.z.cpu().to(torch.uint8),
                        f"{name}.ptr": s.ptr.cpu()})
        meta[f"{name}.molecules"] = str(len(s))
    return write_safetensors(tensors, meta, Path(path))


def load_packed(path: str | os.PathLike) -> dict[str, PackedSplit]:
    """Read and verify a packed file written by :func:`save_packed`.

    Raises:
        DiffgenError: missing or unreadable file, another format or version, a missing split or tensor, or
            tensors that do not form a valid split (shapes, offsets, non-finite positions, molecule counts).
    """
    from diffgen.checkpoint_files import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise DiffgenError(f"packed data file not found: {path}")
    meta, tensors = read_safetensors(path, FORMAT, "packed QM9 data")
    if meta.get("version") != VERSION:
        raise DiffgenError(f"{path}: packed data version {meta.get('version')!r}, this diffgen reads {VERSION!r}")
    out = {}
    for name in SPLITS:
        missing = [k for k in ("pos", "z", "ptr") if f"{name}.{k}" not in tensors]
        if missing:
            raise DiffgenError(f"{path}: split {name!r} lacks tensor {missing[0]!r}")
        split = PackedSplit(*(tensors[f"{name}.{k}"] for k in ("pos", "z", "ptr")))
        split.check(name, path)
        if meta.get(f"{name}.molecules") != str(len(split)):
            raise DiffgenError(f"{path}: split {name!r} holds {len(split)} molecules, its metadata says "
                               f"{meta.get(f'{name}.molecules')}")
        out[name] = split
    return out


class PackedLoader:
    """Iterable of PyG batches over a :class:`PackedSplit` (drop-in for a ``DataLoader`` in Lightning).

    Args:
        split: the molecules (their device is the batches' device).
        batch_size: molecules per batch (per rank).
        shuffle: a new seeded permutation every epoch; else the split's order.
        drop_last: drop the last incomplete batch.
        seed: permutation seed; epoch ``e`` uses ``seed + e``.
        epoch: callable giving the current epoch (e.g. the trainer's), read at each ``iter()``; resuming at an
            epoch boundary then replays the same permutation as an uninterrupted run.
        rank, world_size: this process's share of each permutation (``rows[rank::world_size]``).
    """

    def __init__(self, split: PackedSplit, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, epoch: Callable[[], int] | None = None, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.split, self.batch_size, self.shuffle, self.drop_last = split, batch_size, shuffle, drop_last
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch or (lambda: 0), rank, world_size

    def _rows(self) -> torch.Tensor:
        n = len(self.split)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + int(self.epoch()))
            rows = torch.randperm(n, generator=gen)
        else:
            rows = torch.arange(n)
        if self.world_size > 1:  # pad to a multiple of world_size, as DistributedSampler does
            total = math.ceil(n / self.world_size) * self.world_size
            rows = torch.cat([rows, rows[: total - n]])[self.rank::self.world_size]
        return rows

    def __len__(self) -> int:
        n = math.ceil(len(self.split) / self.world_size) if self.world_size > 1 else len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        rows = self._rows().to(self.split.ptr.device)
        for i in range(len(self)):
            yield self.split.batch(rows[i * self.batch_size:(i + 1) * self.batch_size])
