"""Shared fixtures: the real QM9 training split (qm9pack, cached under ~/.cache/diffgen) and a small batch of it."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.loader import DataLoader

from diffgen.data.qm9 import QM9

# The test machines have 2 cores shared with training runs: multi-threaded intra-op parallelism then
# thrashes (measured ~100x slower per step of a tiny EGNN); the tests use tiny models, one thread is enough.
torch.set_num_threads(1)

#: rows of the training split used for the small real batch (spread over the split, fixed)
BATCH_ROWS = list(range(0, 96_000, 6_000))  # 16 molecules


@pytest.fixture(scope="session")
def qm9_train() -> QM9:
    """``QM9(split="train")``: 100,000 real molecules (first build of the processed cache ~25 s)."""
    return QM9(split="train")


@pytest.fixture(scope="session")
def qm9_all() -> QM9:
    """``QM9(split="all")``: the 130,831 molecules in GDB-9 index order."""
    return QM9(split="all")


@pytest.fixture
def qm9_batch(qm9_train):
    """A PyG ``Batch`` of 16 real training molecules (fresh per test, so tests may modify it)."""
    loader = DataLoader(qm9_train[torch.tensor(BATCH_ROWS)], batch_size=len(BATCH_ROWS), shuffle=False)
    batch = next(iter(loader))
    assert batch.num_graphs == len(BATCH_ROWS)
    return batch
