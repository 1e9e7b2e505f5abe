"""Lightning datamodule over the QM9 splits (PyG ``DataLoader`` batches, no padding)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch_geometric.loader import DataLoader

from diffgen.data.qm9 import QM9, node_count_histogram


class QM9DataModule(pl.LightningDataModule):
    """Train/valid/test loaders of :class:`~diffgen.data.qm9.QM9`.

    Args:
        root: cache folder (None -> default cache dir).
        batch_size: molecules per batch.
        remove_h: drop hydrogens.
        num_workers: DataLoader workers.
        subset: ``None``, ``"half0"`` or ``"half1"`` (train split halves, EDM conditional protocol).
    """

    def __init__(self, root: str | None = None, batch_size: int = 64, remove_h: bool = False,
                 num_workers: int = 0, subset: str | None = None):
        super().__init__()
        self.root, self.batch_size, self.remove_h = root, batch_size, remove_h
        self.num_workers, self.subset = num_workers, subset
        self.train_set = self.valid_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = QM9(self.root, "train", self.remove_h, subset=self.subset)
            self.valid_set = QM9(self.root, "valid", self.remove_h)
            self.test_set = QM9(self.root, "test", self.remove_h)

    def node_histogram(self) -> torch.Tensor:
        """Training-split atom-count histogram ``[30]`` (index = atom count)."""
        self.setup()
        return node_count_histogram(self.train_set)

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.valid_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


class PackedQM9DataModule(pl.LightningDataModule):
    """Train/valid loaders over resident flat tensors (:mod:`diffgen.data.packed`): no per-step collation, and on
    a GPU the whole split lives in GPU memory.

    Args:
        packed: a packed file (``diffgen pack-qm9``; needs neither qm9pack nor RDKit), or None to pack the QM9
            cache of ``root`` in memory.
        root: QM9 cache folder when ``packed`` is None (None -> default cache dir).
        batch_size: molecules per batch and rank.
        seed: shuffling seed (epoch ``e`` uses ``seed + e``).
        remove_h: drop hydrogens (only without ``packed``: a packed file stores what it was made with).

    Raises:
        DiffgenError: an unusable packed file (see :func:`~diffgen.data.packed.load_packed`).
    """

    def __init__(self, packed: str | None = None, root: str | None = None, batch_size: int = 64, seed: int = 0,
                 remove_h: bool = False):
        super().__init__()
        self.packed, self.root, self.batch_size, self.seed, self.remove_h = packed, root, batch_size, seed, remove_h
        self.splits: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        from diffgen.data.packed import PackedSplit, load_packed

        if self.splits is None:
            if self.packed is not None:
                self.splits = load_packed(self.packed)
            else:
                self.splits = {s: PackedSplit.from_dataset(QM9(self.root, s, self.remove_h)) for s in ("train", "valid")}
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # resident on the training device
            device = trainer.strategy.root_device
            self.splits = {k: v.to(device) for k, v in self.splits.items()}

    def node_histogram(self) -> torch.Tensor:
        """Training-split atom-count histogram ``[30]`` (index = atom count)."""
        self.setup()
        return self.splits["train"].node_histogram()

    def _loader(self, name: str, shuffle: bool):
        from diffgen.data.packed import PackedLoader

        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        return PackedLoader(self.splits[name], self.batch_size, shuffle=shuffle, drop_last=shuffle, seed=self.seed,
                            epoch=epoch, rank=rank, world_size=world)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("valid", False)
