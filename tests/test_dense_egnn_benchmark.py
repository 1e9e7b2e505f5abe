"""benchmarks/dense_egnn.py computes the generator's EGNN on padded per-size groups; its timings are only
meaningful if that is the same function as the sparse edge-list EGNN, with the same parameters."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffgen.data.graphs import fully_connected_edges
from diffgen.models.egnn import EGNN

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_egnn.py"
_spec = importlib.util.spec_from_file_location("dense_egnn", SCRIPT)
dense = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dense)


@pytest.mark.parametrize("n_groups", [1, 3, 16])
def test_dense_groups_compute_the_sparse_egnn(qm9_batch, n_groups):
    torch.manual_seed(0)
    net = EGNN(7, 32, 6, 3, attention=True, norm_factor=10.0, coords_range=15.0)
    for layer in net.layers:  # non-trivial coordinate updates (at init they are ~0)
        torch.nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.05)
    h = torch.randn(qm9_batch.pos.shape[0], 7)
    n_atoms = torch.bincount(qm9_batch.batch)
    assert n_atoms.unique().numel() > 3  # molecules of several sizes: padding is exercised
    h_s, pos_s = net(h, qm9_batch.pos, fully_connected_edges(qm9_batch.batch))
    h_d, pos_d = dense.dense_forward(dense.dense_egnn, net, h, qm9_batch.pos, n_atoms, n_groups)
    assert (pos_d - qm9_batch.pos).abs().max() > 1e-3  # positions really moved
    torch.testing.assert_close(h_d, h_s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pos_d, pos_s, atol=1e-4, rtol=1e-4)


def test_dense_egnn_refuses_what_it_does_not_implement():
    net = EGNN(7, 16, 6, 1, velocity=True)
    with pytest.raises(ValueError, match="generator's EGNN only"):
        dense.dense_egnn(net, torch.zeros(1, 2, 7), torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))


def test_bad_arguments_exit_2_before_loading_data():
    res = subprocess.run([sys.executable, str(SCRIPT), "--groups", "0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr
