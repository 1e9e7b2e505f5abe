"""Generation benchmark: sampling speed and EDM metrics of a checkpoint, training throughput on this machine.

Usage::

    python benchmarks/generation.py speed                 # `diffgen sample --n 100` wall time at 1000 and 100 steps
    python benchmarks/generation.py quality --n 1000 --steps 1000 100 [--sampler dpm2m]
    python benchmarks/generation.py train-throughput      # training molecules/s of configs/qm9_egnn.yaml

Every mode prints markdown rows to paste into benchmarks/results/generation.md, together with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def speed(args) -> None:
    print(f"machine: {machine()}")
    print("| command | wall s | sampling s |\n|---|---|---|")
    for steps in args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "diffgen.cli", "sample", "--n", str(args.n), "--steps", str(steps),
                   "--out", f"{tmp}/o", "--no-novelty"]
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            sampling = json.loads(Path(f"{tmp}/o/metrics.json").read_text())["seconds"]
        print(f"| `diffgen sample --n {args.n} --steps {steps}` | {wall:.1f} | {sampling:.1f} |", flush=True)


def quality(args) -> None:
    from diffgen.checkpoints import load_generator
    from diffgen.eval.chem import GenerationMetrics
    from diffgen.eval.reference import training_smiles
    from diffgen.diffusion.build import sample_molecules

    gen = load_generator(args.checkpoint)
    ref = training_smiles()
    print(f"machine: {machine()}; checkpoint: {gen.source}")
    print("| sampler | steps | n | atom stab % | mol stab % | valid % | valid&unique % | novelty % | mol/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps in args.steps:
        t0 = time.perf_counter()
        mols = sample_molecules(gen.diffusion, gen.node_dist, args.n, steps=steps, batch_size=args.batch_size,
                                seed=args.seed, sampler=args.sampler)
        dt = time.perf_counter() - t0
        m = GenerationMetrics(reference_smiles=ref)
        m.update(mols)
        r = m.compute()
        print(f"| {args.sampler} | {steps} | {args.n} | {100 * r['atom_stability']:.1f} | {100 * r['mol_stability']:.1f} | "
              f"{100 * r['validity']:.1f} | {100 * r['valid_unique']:.1f} | {100 * r['novelty']:.1f} | "
              f"{args.n / dt:.2f} |", flush=True)
        if args.json:
            Path(args.json).with_suffix(f".{args.sampler}{steps}.json").write_text(json.dumps({**r, "seconds": dt}, indent=2))


def train_throughput(args) -> None:
    from torch_geometric.loader import DataLoader

    from diffgen.config import load_config
    from diffgen.data.qm9 import QM9
    from diffgen.diffusion.build import build_diffusion

    cfg = load_config(args.config)
    torch.manual_seed(0)
    diffusion = build_diffusion(cfg)
    opt = torch.optim.AdamW(diffusion.parameters(), lr=cfg.optim.lr)
    loader = DataLoader(QM9(split="train"), batch_size=cfg.data.batch_size, shuffle=True)
    it = iter(loader)
    n_mol, t0 = 0, None
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            t0, n_mol = time.perf_counter(), 0
        batch = next(it)
        loss = diffusion.loss(batch.pos, batch.z, batch.batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n_mol += batch.num_graphs
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in diffusion.parameters())
    print(f"machine: {machine()}")
    print(f"| {args.config} | {n_params / 1e6:.2f} M params | batch {cfg.data.batch_size} | "
          f"{n_mol / dt:.0f} molecules/s | {dt / args.iters:.3f} s/step |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--steps", type=int, nargs="+", default=[1000, 100])
    s.add_argument("--checkpoint", default=None)
    q = sub.add_parser("quality")
    q.add_argument("--n", type=int, default=1000)
    q.add_argument("--steps", type=int, nargs="+", default=[1000, 100])
    q.add_argument("--batch-size", type=int, default=250)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--sampler", default="ancestral")
    q.add_argument("--checkpoint", default=None)
    q.add_argument("--json", default=None)
    t = sub.add_parser("train-throughput")
    t.add_argument("--config", default="configs/qm9_egnn.yaml")
    t.add_argument("--iters", type=int, default=30)
    t.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    {"speed": speed, "quality": quality, "train-throughput": train_throughput}[args.mode](args)


if __name__ == "__main__":
    main()
