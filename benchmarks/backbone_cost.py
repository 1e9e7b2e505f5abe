"""Forward-pass cost per molecule of each backbone (EGNN, E(3) transformer) at the same config widths.

For each task's model as its config builds it (``model.backbone`` set to each backbone in turn, every other key the
same), times the network on one batch of real inputs: ``--batch`` QM9 training molecules (generator: the
denoiser on noised molecules at random times; regressor: the property prediction) or N-body systems (dynamics
model). Reports the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, per molecule/system,
for the forward pass (no gradients) and, with ``--backward``, forward + backward (a training step's network cost).

    python benchmarks/backbone_cost.py [--task generation regression dynamics] [--batch 100] [--backward]
        [--threads 1] [overrides applied to every config, e.g. model.hidden=64]

Prints a markdown table with the machine, threads and the load average before and after (a shared machine's load
changes the numbers: compare rows of one run only).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

BACKBONES = ("egnn", "e3transformer")
CONFIGS = {"generation": "qm9_egnn", "regression": "qm9_regress", "dynamics": "nbody_egnn"}


def _qm9_batch(n: int):
    from torch_geometric.loader import DataLoader

    from diffgen.data.qm9 import QM9

    train = QM9(split="train")
    rows = torch.arange(0, len(train), len(train) // n)[:n]  # spread over the split, fixed
    return next(iter(DataLoader(train[rows], batch_size=n, shuffle=False)))


def _workload(task: str, backbone: str, overrides: list[str], batch: int, mols):
    """``(model, call)``: ``call()`` runs the network once on a fixed batch and returns a tensor to sum."""
    overrides = [*overrides, f"model.backbone={backbone}"]
    gen = torch.Generator().manual_seed(0)
    if task == "generation":
        from diffgen.diffusion.vp import encode_types, remove_mean
        from diffgen.tasks.generation.build import build_diffusion
        from diffgen.tasks.generation.config import load_generation_config

        model = build_diffusion(load_generation_config(CONFIGS[task], overrides))
        pos = remove_mean(mols.pos, mols.batch)
        t = torch.rand(batch, generator=gen)
        pos_t, h_t, _, _ = model.noise(pos, encode_types(mols.z), t, mols.batch, generator=gen)
        return model, lambda: sum(out.sum() for out in model.denoiser(pos_t, h_t, t, mols.batch))
    if task == "regression":
        from diffgen.tasks.regression.checkpoints import build_model
        from diffgen.tasks.regression.config import load_regression_config

        model = build_model(load_regression_config(CONFIGS[task], overrides))
        return model, lambda: model(mols.z, mols.pos, mols.batch).sum()
    from diffgen.tasks.dynamics.checkpoints import build_model
    from diffgen.tasks.dynamics.config import load_dynamics_config

    model = build_model(load_dynamics_config(CONFIGS[task], overrides))
    pos, vel = torch.randn(batch, 5, 3, generator=gen), torch.randn(batch, 5, 3, generator=gen)
    charges = torch.randint(0, 2, (batch, 5), generator=gen).float() * 2 - 1
    return model, lambda: model(pos, vel, charges).sum()


def _median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every model, e.g. model.hidden=64")
    ap.add_argument("--task", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=100, help="molecules (or N-body systems) per call")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mols = _qm9_batch(args.batch) if {"generation", "regression"} & set(args.task) else None
    load_before = os.getloadavg()[0]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}"
          + (f" (QM9 train, {mols.num_nodes / args.batch:.1f} atoms per molecule)" if mols is not None else "")
          + (f"; overrides {' '.join(args.overrides)}" if args.overrides else ""))
    print("\n| task | backbone | parameters | forward ms / molecule |" + (" fwd+bwd ms / molecule |" if args.backward
                                                                         else ""))
    print("|---|---|---|---|" + ("---|" if args.backward else ""))
    for task in args.task:
        for backbone in BACKBONES:
            model, call = _workload(task, backbone, args.overrides, args.batch, mols)
            n_params = sum(p.numel() for p in model.parameters())
            model.eval()
            with torch.no_grad():
                fwd = _median_seconds(call, args.warmup, args.repeats)
            row = f"| {task} | {backbone} | {n_params:,} | {1e3 * fwd / args.batch:.2f} |"
            if args.backward:
                model.train()

                def step():
                    model.zero_grad(set_to_none=True)
                    call().backward()

                row += f" {1e3 * _median_seconds(step, args.warmup, args.repeats) / args.batch:.2f} |"
            print(row, flush=True)
    print(f"\nload average (1 min): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
