"""Generation speedrun: quality per CPU-hour at a fixed budget of training molecules seen.

Trains a generator config **from scratch** for ``--molecules`` training molecules (default 200,000 = 2 epochs of
QM9's 100,000), then samples ``--n-score`` molecules from the EMA weights with the default sampler
(dpm2m-sde, 50 steps) at noise scale ``--eta`` 1 (the published solver, fixed so that all rows compare; ``diffgen
sample`` now defaults to eta 3) and scores them with the EDM metrics. Each run writes one JSON row to
``benchmarks/results/speedrun/<name>-seed<S>.json`` holding the command, commit, threads, machine load (1-minute
load average before, every 30 s during training, and after), seed, wall-clock, training molecules/s and the
metrics; ``report`` turns the rows into the table of ``benchmarks/results/speedrun.md`` and a PNG (atom stability
against training wall time).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/speedrun.py run --name baseline
    OMP_NUM_THREADS=2 python benchmarks/speedrun.py run --name bf16 --set trainer.precision=bf16-mixed
    python benchmarks/speedrun.py run --name smoke --molecules 64 --n-score 4 --sampler-steps 2 \\
        --set model.hidden=16 --set model.n_layers=1 --out-dir /tmp/speedrun   # seconds: a smoke test
    python benchmarks/speedrun.py report

Rows measured under different loads are not comparable: compare variants only from runs made under the same
conditions (the row records the load). Bad input (unknown config or key, budget <= 0) exits with a one-line error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROWS = RESULTS / "speedrun"
REPORT = RESULTS / "speedrun.md"
START, END = "<!-- speedrun table: start (python benchmarks/speedrun.py report) -->", "<!-- speedrun table: end -->"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _check(args) -> None:
    from diffgen.errors import DiffgenError

    if args.molecules <= 0:
        raise DiffgenError(f"--molecules must be positive, got {args.molecules}")
    if args.n_score <= 0 or args.sampler_steps <= 0:
        raise DiffgenError("--n-score and --sampler-steps must be positive")
    from diffgen.diffusion import check_eta

    check_eta(args.eta)
    if not args.name or any(c in args.name for c in "/\\ "):
        raise DiffgenError(f"--name must be a plain word, got {args.name!r}")


def _sample_load(loads: list[float], stop: threading.Event, every_s: float = 30.0) -> None:
    """Append the 1-minute load average every ``every_s`` seconds until ``stop`` is set."""
    while not stop.wait(every_s):
        loads.append(os.getloadavg()[0])


def run(args) -> dict:
    """Train, sample, score; write and return the row."""
    from diffgen.tasks.generation.config import load_generation_config

    _check(args)
    base = load_generation_config(args.config, args.set)  # validates the variant before torch is even imported

    import torch

    from diffgen.diffusion import DEFAULT_SAMPLER
    from diffgen.diffusion.samplers import NodeCountDistribution
    from diffgen.eval.chem import GenerationMetrics
    from diffgen.tasks.generation.build import sample_molecules
    from diffgen.tasks.generation.module import train_generation

    out_dir = Path(args.out_dir) if args.out_dir else ROWS
    out_dir.mkdir(parents=True, exist_ok=True)
    row_path = out_dir / f"{args.name}-seed{args.seed}.json"
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        steps = math.ceil(args.molecules / base.data.batch_size)
        cfg = load_generation_config(args.config, [
            *args.set, f"trainer.out_dir={tmp}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
            "trainer.sample_every_n_epochs=0", f"trainer.limit_val_batches={args.val_fraction}",
            f"trainer.seed={args.seed}", "trainer.ckpt_every_n_steps=1000000", "trainer.accelerator=cpu",
            "trainer.devices=1"])
        load_before = os.getloadavg()[0]
        loads: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_load, args=(loads, stop), daemon=True)
        sampler.start()
        t0, c0 = time.perf_counter(), time.process_time()
        task = train_generation(cfg)
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        stop.set()
        seen = steps * cfg.data.batch_size
        ema = task.ema.module.eval()
        t1 = time.perf_counter()
        mols = sample_molecules(ema, NodeCountDistribution(task.hparams["node_histogram"]), args.n_score,
                                steps=args.sampler_steps, batch_size=100, seed=0, sampler=DEFAULT_SAMPLER,
                                precision="fp32", eta=args.eta)  # every row so far was scored in fp32 at eta 1
        sample_s = time.perf_counter() - t1
    metrics = GenerationMetrics()
    metrics.update(mols)
    scores = {k: v for k, v in metrics.compute().items() if isinstance(v, (int, float))}
    hours = train_s / 3600
    row = {
        "name": args.name, "seed": args.seed, "config": args.config, "overrides": list(args.set),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "commit": _commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "load_mean": round(sum(loads) / len(loads), 2) if loads else None,  # 1-min load sampled every 30 s
        "molecules_seen": seen, "steps": steps,
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),  # CPU time of this process (all its threads): less load-dependent
        "train_molecules_per_s": round(seen / train_s, 1),
        "sampler": f"{DEFAULT_SAMPLER} {args.sampler_steps}", "eta": args.eta, "n_scored": args.n_score,
        "sample_s": round(sample_s, 1), **scores,
        "atom_stability_per_cpu_hour": scores["atom_stability"] / hours if hours else None,
    }
    row_path.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row, indent=1))
    return row


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def report(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]
    lines = ["| variant | seed | overrides | molecules seen | threads | load (before/mean/after) | train min | train mol/s "
             "| train CPU min | scored | atom stab % | mol stab % | valid % | valid & unique % | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['seed']} | `{' '.join(r['overrides']) or '-'}` | {r['molecules_seen']:,} | "
            f"{r['threads']} | {r['load_before']}/{r.get('load_mean') or '-'}/{r['load_after']} | "
            f"{r['train_s'] / 60:.1f} | {r['train_molecules_per_s']:.0f} | {_minutes(r.get('train_cpu_s'))} | "
            f"{r['n_scored']} | {100 * r['atom_stability']:.1f} | "
            f"{100 * r['mol_stability']:.1f} | {100 * r['validity']:.1f} | {100 * r['valid_unique']:.1f} | "
            f"{r['commit']} |")
    table = "\n".join(lines)
    text = REPORT.read_text() if REPORT.is_file() else f"# Generation speedrun\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    REPORT.write_text(f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(table)
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.scatter(r["train_s"] / 60, 100 * r["atom_stability"])
            ax.annotate(f"{r['name']} s{r['seed']}", (r["train_s"] / 60, 100 * r["atom_stability"]), fontsize=7)
        ax.set_xlabel("training wall minutes")
        ax.set_ylabel("atom stability % (EMA, dpm2m-sde)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / "speedrun.png", dpi=110)


def main() -> None:
    from diffgen.errors import DiffgenError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True, help="variant name (one word)")
    r.add_argument("--config", default="qm9_egnn", help="packaged config name or YAML file")
    r.add_argument("--set", action="append", default=[], help="config override section.key=value (repeatable)")
    r.add_argument("--molecules", type=int, default=200_000, help="training molecules seen (the budget)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--n-score", type=int, default=500, help="molecules sampled for scoring (1,000 to adopt)")
    r.add_argument("--sampler-steps", type=int, default=50)
    r.add_argument("--eta", type=float, default=1.0,
                   help="noise scale of the scoring sampler: 1 (SDE-DPM-Solver++(2M) as published), as every row so "
                        "far, so that rows stay comparable; diffgen sample's default is 3")
    r.add_argument("--val-fraction", type=float, default=0.02, help="trainer.limit_val_batches")
    r.add_argument("--out-dir", default=None, help="where the row goes (default benchmarks/results/speedrun)")
    sub.add_parser("report")
    args = ap.parse_args()
    try:
        {"run": run, "report": report}[args.cmd](args)
    except DiffgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
