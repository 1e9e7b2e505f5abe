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
