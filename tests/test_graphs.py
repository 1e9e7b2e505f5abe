"""Graph builders against brute-force Python references."""
from __future__ import annotations

import itertools

import pytest
import torch

from diffgen.data.graphs import build_edges, fully_connected_edges, knn_edges, radius_edges

SIZES = [1, 2, 5, 8, 3]  # includes a single-atom graph and a 2-atom graph


def _batch(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def _graphs(sizes):
    """node ids of each graph"""
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


def _pairs(edge_index):
    lst = list(map(tuple, edge_index.t().tolist()))
    assert len(lst) == len(set(lst)), "duplicate edges"
    return set(lst)


@pytest.fixture
def random_graph():
    torch.manual_seed(0)
    pos = 1.5 * torch.randn(sum(SIZES), 3, dtype=torch.float64)
    return pos, _batch(SIZES)


def test_fully_connected_brute_force():
    batch = _batch(SIZES)
    ei = fully_connected_edges(batch)
    assert ei.shape == (2, sum(n * (n - 1) for n in SIZES)) and ei.dtype == torch.long
    expected = {(i, j) for g in _graphs(SIZES) for i, j in itertools.permutations(g, 2)}
    assert _pairs(ei) == expected
    assert bool((ei[0] != ei[1]).all())
    assert torch.equal(batch[ei[0]], batch[ei[1]])


def test_fully_connected_edge_cases():
    assert fully_connected_edges(torch.zeros(0, dtype=torch.long)).shape == (2, 0)
    assert fully_connected_edges(torch.zeros(1, dtype=torch.long)).shape == (2, 0)
    assert fully_connected_edges(torch.zeros(29, dtype=torch.long)).shape == (2, 29 * 28)


def test_fully_connected_on_real_batch(qm9_batch):
    ei = fully_connected_edges(qm9_batch.batch)
    n = torch.bincount(qm9_batch.batch)
    assert ei.shape[1] == int((n * (n - 1)).sum())
    assert torch.equal(qm9_batch.batch[ei[0]], qm9_batch.batch[ei[1]])
    assert len(_pairs(ei)) == ei.shape[1]


def _brute_radius(pos, sizes, cutoff):
    return {(i, j) for g in _graphs(sizes) for i, j in itertools.permutations(g, 2)
            if float((pos[i] - pos[j]).norm()) < cutoff}


@pytest.mark.parametrize("cutoff", [0.5, 1.5, 3.0])
def test_radius_brute_force(random_graph, cutoff):
    pos, batch = random_graph
    got = _pairs(radius_edges(pos, batch, cutoff))
    expected = _brute_radius(pos, SIZES, cutoff)
    assert got == expected
    n_full = sum(n * (n - 1) for n in SIZES)
    if cutoff == 1.5:  # the cutoff actually selects: some pairs in, some out
        assert 0 < len(expected) < n_full


def test_radius_is_strict(random_graph):
    pos, batch = random_graph
    d = (pos[3] - pos[4]).norm().item()  # nodes 3 and 4 are in the same 5-node graph
    assert (3, 4) not in _pairs(radius_edges(pos, batch, d))
    assert (3, 4) in _pairs(radius_edges(pos, batch, d + 1e-9))


def test_radius_on_real_batch(qm9_batch):
    pos, batch = qm9_batch.pos.double(), qm9_batch.batch
    sizes = torch.bincount(batch).tolist()
    got = _pairs(radius_edges(pos, batch, 1.6))  # ~ covalent bonds
    assert got == _brute_radius(pos, sizes, 1.6)
    # every atom of a real molecule has at least one neighbour within 1.6 Å
    assert set(i for i, _ in got) == set(range(batch.numel()))


@pytest.mark.parametrize("k", [1, 3, 4, 10])
def test_knn_brute_force(random_graph, k):
    pos, batch = random_graph
    ei = knn_edges(pos, batch, k)
    pairs = _pairs(ei)
    assert bool((ei[0] != ei[1]).all()) and torch.equal(batch[ei[0]], batch[ei[1]])
    for g in _graphs(SIZES):
        for i in g:
            others = [j for j in g if j != i]
            nearest = sorted(others, key=lambda j: float((pos[i] - pos[j]).norm()))[:k]
            incoming = {j for (r, j) in pairs if r == i}  # row = receiver i
            assert len(incoming) == min(k, len(g) - 1)
            assert incoming == set(nearest)


def test_knn_on_real_batch(qm9_batch):
    pos, batch = qm9_batch.pos, qm9_batch.batch
    k = 6
    ei = knn_edges(pos, batch, k)
    n = torch.bincount(batch)
    in_deg = torch.bincount(ei[0], minlength=batch.numel())
    assert torch.equal(in_deg, torch.clamp(n[batch] - 1, max=k))
    # the selected neighbours are never farther than any non-selected one (per receiver)
    d = torch.cdist(pos, pos)
    d[batch[:, None] != batch[None, :]] = float("inf")
    d.fill_diagonal_(float("inf"))
    sel = torch.zeros_like(d, dtype=torch.bool)
    sel[ei[0], ei[1]] = True
    for i in range(batch.numel()):
        far_sel = d[i][sel[i]].max()
        rest = d[i][~sel[i]]
        assert bool((rest >= far_sel - 1e-6).all())


def test_build_edges_dispatch(random_graph):
    pos, batch = random_graph
    assert torch.equal(build_edges(pos, batch), fully_connected_edges(batch))
    assert torch.equal(build_edges(pos, batch, "full"), fully_connected_edges(batch))
    assert torch.equal(build_edges(pos, batch, "radius", cutoff=1.5), radius_edges(pos, batch, 1.5))
    assert torch.equal(build_edges(pos, batch, "knn", k=3), knn_edges(pos, batch, 3))
    assert build_edges(pos, batch, "radius", cutoff=1.5).shape[1] < build_edges(pos, batch).shape[1]


@pytest.mark.parametrize("kwargs", [
    dict(kind="complete"),
    dict(kind="radius"),  # no cutoff
    dict(kind="radius", cutoff=0.0),
    dict(kind="radius", cutoff=-1.0),
    dict(kind="knn"),  # no k
    dict(kind="knn", k=0),
    dict(kind="knn", k=-2),
])
def test_build_edges_invalid(random_graph, kwargs):
    pos, batch = random_graph
    with pytest.raises(ValueError):
        build_edges(pos, batch, **kwargs)
