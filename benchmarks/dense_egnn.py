"""Dense per-size-group EGNN vs the sparse edge-list EGNN: the same function, which is faster for a training step?

Issue "Generation quality per CPU-hour", throughput route "dense per-size-bucket batches": QM9 molecules have at
most 29 atoms, so instead of gathering ``[E, H]`` edge tensors from ``edge_index`` and scattering messages back,
a batch can be split into groups of molecules of similar size, padded to ``[b, n, H]`` node and ``[b, n, n, H]``
pair tensors, with broadcasts in place of gathers and sums over ``j`` in place of scatters (EDM's own
implementation pads every molecule to 29 atoms). This script computes the generator's EGNN (EGNN eqs. 3-6 with
EDM's attention gate and bounded coordinate update, :mod:`diffgen.models.egnn`) both ways **with the same
parameters**, checks that they agree, and times forward + backward of one batch of real QM9 training molecules
under bf16 autocast, eager and ``torch.compile``-d (dynamic shapes, as ``trainer.compile=true``).

The batch is sorted by atom count and cut into ``G`` groups of equal molecule count, each padded to its largest
molecule: ``G = 1`` pads the whole batch to its largest molecule; larger ``G`` pads less but launches ``G`` times
as many (smaller) kernels.

    OMP_NUM_THREADS=1 python benchmarks/dense_egnn.py [--groups 1 2 4 8] [--iters 20] [--no-compile]
        [--hidden 128 --layers 4 --batch 64]

Prints the largest difference between the two outputs and one markdown row per variant (seconds per forward +
backward), with the machine and the load average; compare rows of one run only. Results:
``benchmarks/results/speedrun.md`` ("Dense per-size-group batches").
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def _pair_linear(lin, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """:class:`diffgen.models.egnn._PairLinear` on dense tensors: ``h [b, n, H]``, ``e [b, n, n, k]`` -> ``[b, n, n, H]``."""
    return lin.src(h)[:, :, None] + lin.dst(h)[:, None, :] + lin.edge(e)


def dense_egnn(net, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass of ``net`` (:class:`diffgen.models.egnn.EGNN`, no velocity / vector channels / extra edge
    features) on padded molecules of one group.

    Args:
        h: ``[b, n, in_dim]`` node features; pos: ``[b, n, 3]`` Å; mask: ``[b, n]`` bool, True for real atoms.

    Returns:
        ``(h' [b, n, out_dim], pos' [b, n, 3])``; rows of padding atoms are meaningless.

    The full graph without self loops becomes the pair mask ``mask_i & mask_j & (i != j)``: messages of masked
    pairs are zeroed before the sum over ``j``.
    """
    if net.vector_channels or net.velocity or net.edge_dim or net.invariant:
        raise ValueError("dense_egnn covers the generator's EGNN only (no vel/vec/edge_attr, not invariant)")
    n = pos.shape[1]
    pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=pos.device)
    pair = pair.unsqueeze(-1).to(pos.dtype)
    d0 = (pos[:, :, None] - pos[:, None, :]).pow(2).sum(-1, keepdim=True)
    h = net.embed_in(h)
    for layer in net.layers:
        diff = pos[:, :, None] - pos[:, None, :]
        d2 = diff.pow(2).sum(-1, keepdim=True)
        e = torch.cat([d2, d0], dim=-1)
        msg = layer.message
        m = msg.edge_mlp(_pair_linear(msg.edge_in, h, e))
        if msg.att is not None:
            m = m * msg.att(m)
        agg = (m * pair.to(m.dtype)).sum(2) / msg.norm_factor
        h = h + msg.node_mlp(torch.cat([h, agg.to(h.dtype)], dim=-1))
        up = layer.update
        dist = torch.where(d2 > 0, d2, torch.ones_like(d2)).sqrt()
        gate = torch.tanh(up.coord_mlp(_pair_linear(up.coord_in, h, e))) * up.coords_range
        pos = pos + (diff / (dist + 1.0) * gate * pair).sum(2) / up.norm_factor
    return net.embed_out(h), pos


def groups(n_atoms: torch.Tensor, n_groups: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Molecules sorted by size and cut into ``n_groups``: per group ``(node index [b, n], mask [b, n])``, the
    index of each padded slot in the flat ``[N]`` node order of a PyG batch (0 where padding)."""
    starts = torch.cumsum(n_atoms, 0) - n_atoms
    out = []
    for chunk in torch.tensor_split(torch.argsort(n_atoms, stable=True), n_groups):
        if chunk.numel():
            slots = torch.arange(int(n_atoms[chunk].max()))
            mask = slots[None] < n_atoms[chunk][:, None]
            out.append((torch.where(mask, starts[chunk][:, None] + slots[None], 0), mask))
    return out


def dense_forward(fn, net, h: torch.Tensor, pos: torch.Tensor, n_atoms: torch.Tensor, n_groups: int):
    """Sparse-layout in and out (``h [N, F]``, ``pos [N, 3]``), :func:`dense_egnn` (or its compiled ``fn``) per group."""
    hs, ps, idx = [], [], []
    for index, mask in groups(n_atoms, n_groups):
        h_g, pos_g = fn(net, h[index], pos[index], mask)
        hs.append(h_g[mask]), ps.append(pos_g[mask]), idx.append(index[mask])
    idx = torch.cat(idx)
    h_out, pos_out = torch.cat(hs), torch.cat(ps)
    return (h_out.new_empty(h.shape[0], h_out.shape[1]).index_copy(0, idx, h_out),
            pos_out.new_empty(pos.shape).index_copy(0, idx, pos_out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    if min(args.groups) < 1 or args.iters < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--groups, --iters and --batch must be >= 1, --warmup >= 0")

    from diffgen.data.graphs import fully_connected_edges
    from diffgen.data.packed import PackedLoader, PackedSplit
    from diffgen.data.qm9 import QM9
    from diffgen.devices import autocast
    from diffgen.models.egnn import EGNN

    torch.manual_seed(0)
    net = EGNN(7, args.hidden, 6, args.layers, attention=True, norm_factor=10.0, coords_range=15.0)
    for layer in net.layers:  # trained coordinate heads are not ~0 as at initialisation
        torch.nn.init.normal_(layer.update.coord_mlp[-1].weight, std=0.01)
    batches = iter(PackedLoader(PackedSplit.from_dataset(QM9(split="train")), args.batch))

    def draw():
        b = next(batches)
        return torch.randn(b.pos.shape[0], 7), b.pos, b.batch, torch.bincount(b.batch)

    h, pos, batch, n_atoms = draw()
    h_s, pos_s = net(h, pos, fully_connected_edges(batch))
    for g in args.groups:
        h_d, pos_d = dense_forward(dense_egnn, net, h, pos, n_atoms, g)
        print(f"G={g}: max |h_dense - h_sparse| = {(h_d - h_s).abs().max():.2e}, "
              f"max |pos_dense - pos_sparse| = {(pos_d - pos_s).abs().max():.2e} Å (fp32)")

    def time_it(forward) -> float:
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                t0 = time.perf_counter()
            h, pos, batch, n_atoms = draw()
            with autocast("bf16"):
                h_out, pos_out = forward(h, pos, batch, n_atoms)
                loss = h_out.float().pow(2).mean() + pos_out.float().pow(2).mean()
            loss.backward()
        return (time.perf_counter() - t0) / args.iters

    load0 = os.getloadavg()[0]
    rows = [("sparse (edge lists, today's path)", "eager",
             time_it(lambda h, pos, b, n: net(h, pos, fully_connected_edges(b))))]
    rows += [(f"dense, G={g}", "eager", time_it(lambda h, pos, b, n, g=g: dense_forward(dense_egnn, net, h, pos, n, g)))
             for g in args.groups]
    if not args.no_compile:
        compiled_net = torch.compile(net, dynamic=True)
        compiled_dense = torch.compile(dense_egnn, dynamic=True)
        rows.append(("sparse (edge lists, today's path)", "compiled",
                     time_it(lambda h, pos, b, n: compiled_net(h, pos, fully_connected_edges(b)))))
        rows += [(f"dense, G={g}", "compiled",
                  time_it(lambda h, pos, b, n, g=g: dense_forward(compiled_dense, net, h, pos, n, g)))
                 for g in args.groups]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {load0:.2f} before / {os.getloadavg()[0]:.2f} after; EGNN {args.layers} x {args.hidden}, "
          f"batch {args.batch}, bf16 autocast, forward + backward")
    print("| layout | mode | s per forward + backward |\n|---|---|---|")
    for name, mode, s in rows:
        print(f"| {name} | {mode} | {s:.3f} |")


if __name__ == "__main__":
    main()
