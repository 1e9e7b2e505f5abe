"""Training-efficiency ablations of the generator on an equal budget (same optimiser steps, same machine).

Each variant trains ``diffgen/configs/qm9_egnn.yaml`` plus the common budget overrides plus its own overrides with
``diffgen train``, then scores the EMA weights of its last checkpoint on

* the plain (uniformly weighted) eps-MSE of 2,000 validation molecules with fixed ``t`` and noise, and
* EDM metrics of ``--n-samples`` molecules from the ancestral sampler (``--eval-steps`` steps, seed 0).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/train_ablation.py --out /tmp/ablation baseline min_snr x0_min_snr
    python benchmarks/train_ablation.py --out /tmp/ablation --table    # markdown table of finished variants

Rows are printed as markdown for benchmarks/results/generation_ablation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

#: Overrides applied to every variant: the budget. Small network and few steps so that a CPU can afford it.
COMMON = ["model.hidden=64", "model.n_layers=4", "trainer.max_steps=2000", "trainer.sample_every_n_epochs=0",
          "trainer.limit_val_batches=0.05", "trainer.ckpt_every_n_steps=1000", "trainer.max_epochs=100"]

VARIANTS: dict[str, list[str]] = {
    "baseline": [],  # EDM recipe: eps-parameterisation, uniform weight, polynomial_2, lr 5e-4, batch 64
    "min_snr": ["diffusion.loss_weight=min_snr"],
    "x0_min_snr": ["diffusion.parameterization=x0", "diffusion.loss_weight=min_snr"],
    "cosine": ["diffusion.schedule=cosine"],
    "lr1e-3": ["optim.lr=1e-3"],
    "lr2e-4": ["optim.lr=2e-4"],
    "batch128": ["data.batch_size=128"],
}


def train(name: str, out: Path, extra: list[str]) -> float:
    run = out / name
    cmd = [sys.executable, "-m", "diffgen.cli", "train", "--config", "diffgen/configs/qm9_egnn.yaml", "--out-dir", str(run),
           *COMMON, *VARIANTS[name], *extra]
    t0 = time.perf_counter()
    with open(out / f"{name}.train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


@torch.no_grad()
def held_out_eps_mse(diffusion, n: int = 2000) -> float:
    from torch_geometric.loader import DataLoader

    from diffgen.data.qm9 import QM9

    data = QM9(split="valid")[:n]
    total, count = 0.0, 0
    for i, b in enumerate(DataLoader(data, batch_size=250)):
        gen = torch.Generator().manual_seed(i)
        t = torch.rand(b.num_graphs, generator=gen)
        loss = diffusion.loss(b.pos, b.z, b.batch, t=t, generator=gen, weighted=False)
        total, count = total + float(loss) * b.num_graphs, count + b.num_graphs
    return total / count


def score(name: str, out: Path, n_samples: int, eval_steps: int) -> dict:
    from diffgen.tasks.generation.checkpoints import load_generator
    from diffgen.tasks.generation.build import sample_molecules
    from diffgen.eval.chem import GenerationMetrics

    gen = load_generator(out / name / "checkpoints" / "last.ckpt")
    gen.diffusion.eval()
    result = {"eps_mse": held_out_eps_mse(gen.diffusion)}
    mols = sample_molecules(gen.diffusion, gen.node_dist, n_samples, steps=eval_steps, batch_size=125, seed=0,
                            sampler="ancestral", precision="fp32")
    m = GenerationMetrics()
    m.update(mols)
    result.update({k: v for k, v in m.compute().items() if isinstance(v, float)})
    return result


def row(name: str, r: dict) -> str:
    return (f"| {name} | `{' '.join(VARIANTS[name]) or '-'}` | {r['eps_mse']:.4f} | {100 * r['atom_stability']:.1f} | "
            f"{100 * r['mol_stability']:.1f} | {100 * r['validity']:.1f} | {r['train_s'] / 60:.1f} |")


HEADER = ("| variant | overrides | held-out eps-MSE | atom stab % | mol stab % | valid % | train min |\n"
          "|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, required=True, help="folder for runs, logs and <variant>.json")
    ap.add_argument("--n-samples", type=int, default=250)
    ap.add_argument("--eval-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=None, help="override the budget's step count (smoke tests)")
    ap.add_argument("--table", action="store_true", help="print the table of finished variants and exit")
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(f"budget: `{' '.join(COMMON)}`\n\n{HEADER}")
        for name in VARIANTS:
            f = args.out / f"{name}.json"
            if f.is_file():
                print(row(name, json.loads(f.read_text())))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads\n{HEADER}", flush=True)
    for name in args.variants:
        train_s = train(name, args.out, [f"trainer.max_steps={args.max_steps}"] if args.max_steps else [])
        r = {**score(name, args.out, args.n_samples, args.eval_steps), "train_s": train_s}
        (args.out / f"{name}.json").write_text(json.dumps(r, indent=2))
        print(row(name, r), flush=True)


if __name__ == "__main__":
    main()
