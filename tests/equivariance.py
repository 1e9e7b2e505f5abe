"""The one E(3) x permutation equivariance check of the test suite (one call per model test).

:func:`assert_e3_equivariant` evaluates ``fn`` on some inputs and on their images under ``g = (Q, t, P)`` for a
random rotation (``det Q = +1``) and a random reflection (``det Q = -1``), each with a random translation ``t``
and a random node permutation ``P``, and checks that every output moved as its kind says. With node axis
``node_dim`` (0 for sparse graphs ``[N, ...]``, 1 for batched systems ``[B, n, ...]``) and new node ``k`` = old
node ``perm[k]``:

    kind            image of a tensor ``a`` (``a Q^T`` acts on the last axis, of size 3)
    "pos"           P (a Q^T + t)   positions
    "vec"           P (a Q^T)       vectors: velocities, displacements, position noise (no translation)
    "scalar"        P a             invariant node features, node-indexed integers (types, batch)
    "global_pos"    a Q^T + t       positions not indexed by node (e.g. cluster centres)
    "global_vec"    a Q^T
    "global"        a               invariant, not indexed by node (per graph / system values, a loss, ints)
    "edges"         inputs only: ``[2, E]`` node ids, relabelled by ``P``, edge order shuffled
    "edge_scalar"   ``[E, ...]`` invariant edge features or messages, shuffled with the edges

``None`` (an absent optional input or output) stays ``None``. Tolerances: float64 is required for the default
``atol = rtol = 1e-9``; a float32 check must pass its own (looser) tolerances.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

F64 = torch.float64
NODE_KINDS = ("pos", "vec", "scalar")
KINDS = (*NODE_KINDS, "global_pos", "global_vec", "global", "edges", "edge_scalar")


def random_orthogonal(det: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random ``[3, 3]`` float64 orthogonal matrix with determinant ``det`` (+1 rotation, -1 reflection)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=F64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    assert torch.allclose(q @ q.T, torch.eye(3, dtype=F64), atol=1e-12) and round(float(torch.det(q))) == det
    return q


def random_permutation(n: int, generator: torch.Generator, batch: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation ``perm`` of ``range(n)`` (new node ``k`` = old node ``perm[k]``), never the identity.

    With ``batch`` ``[n]`` (graph of each node) nodes move only within their graph, so ``batch[perm] == batch``.
    """
    groups = [torch.arange(n)] if batch is None else [(batch == b).nonzero().flatten() for b in batch.unique()]
    for _ in range(100):
        perm = torch.arange(n)
        for nodes in groups:
            perm[nodes] = nodes[torch.randperm(nodes.numel(), generator=generator)]
        if not torch.equal(perm, torch.arange(n)):
            return perm
    raise AssertionError("no non-trivial permutation: every graph has a single node")


def _image(kind: str, a, q, t, perm, inv, edge_perm, node_dim: int):
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    if a is None or kind == "global":
        return a
    if kind == "edges":
        return inv[a][:, edge_perm]
    if kind == "edge_scalar":
        return a[edge_perm]
    if kind in NODE_KINDS:
        a = a.index_select(node_dim, perm.to(a.device))
    if kind in ("pos", "vec", "global_pos", "global_vec"):
        a = a @ q.to(a.dtype).T
    if kind in ("pos", "global_pos"):
        a = a + t.to(a.dtype)
    return a


def assert_e3_equivariant(fn: Callable, inputs: Sequence[tuple[str, object]], outputs: Sequence[str], *,
                          node_dim: int = 0, batch: torch.Tensor | None = None, translate: bool = True,
                          seed: int = 0, atol: float = 1e-9, rtol: float = 1e-9) -> tuple:
    """Assert ``fn(*g inputs) == g fn(*inputs)`` for a rotation and a reflection (with translation and permutation).

    Args:
        fn: called positionally with the input values; returns one tensor or a tuple (``len(outputs)`` items).
        inputs: ``(kind, value)`` pairs (kinds in the module docstring).
        outputs: the kind of each output.
        node_dim: node axis of the node-indexed inputs and outputs.
        batch: graph of each node ``[N]``: permute within graphs (needed when ``fn`` reads a batch vector).
        translate: False for functions defined on centred positions only (zero centre of mass), where a
            translation leaves the domain.
        seed: seed of ``Q``, ``t`` and ``P``.
        atol, rtol: tolerances of :func:`torch.testing.assert_close`; below 1e-6 all float inputs must be float64.

    Returns:
        the outputs on the untransformed inputs (a tuple), for further checks by the caller.

    Raises:
        AssertionError: an output does not transform as declared, or float32 inputs with float64 tolerances.
    """
    values = [v for _, v in inputs]
    dtypes = {v.dtype for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert atol >= 1e-6 or dtypes <= {F64}, f"inputs in {dtypes}: tolerance {atol} needs float64"
    nodes = [v.shape[node_dim] for k, v in inputs if k in NODE_KINDS and isinstance(v, torch.Tensor)]
    assert nodes and len(set(nodes)) == 1, f"node-indexed inputs disagree on the node count: {nodes}"
    edges = [v.shape[1] for k, v in inputs if k == "edges"]
    reference = fn(*values)
    reference = reference if isinstance(reference, tuple) else (reference,)
    assert len(reference) == len(outputs), f"fn returned {len(reference)} outputs, {len(outputs)} kinds given"
    g = torch.Generator().manual_seed(seed)
    for det in (1, -1):
        q = random_orthogonal(det, g)
        t = 3.0 * torch.randn(3, generator=g, dtype=F64) if translate else torch.zeros(3, dtype=F64)
        perm = random_permutation(nodes[0], g, batch)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        edge_perm = torch.randperm(edges[0], generator=g) if edges else None
        moved = fn(*(_image(k, v, q, t, perm, inv, edge_perm, node_dim) for k, v in inputs))
        moved = moved if isinstance(moved, tuple) else (moved,)
        for i, (kind, ref, out) in enumerate(zip(outputs, reference, moved)):
            if ref is None:
                assert out is None, f"output {i} ({kind}): None before the transform, not after"
                continue
            assert torch.isfinite(ref).all(), f"output {i} ({kind}) is not finite"
            expected = _image(kind, ref, q, t, perm, inv, edge_perm, node_dim)
            torch.testing.assert_close(out, expected, atol=atol, rtol=rtol,
                                       msg=lambda m, i=i, kind=kind: f"output {i} ({kind}), det Q = {det}: {m}")
    return reference
