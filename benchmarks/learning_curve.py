"""Learning curve of the default generator across sessions: quality against training epochs and CPU hours.

The points live in ``benchmarks/results/learning_curve.json`` (one object per measurement: steps, epochs, training
hours, molecules scored, sampler, atom / mol stability, validity, where it was measured). ``plot`` draws them as
``benchmarks/results/learning_curve.png`` and prints the markdown table for ``benchmarks/results/generation.md``.

Usage::

    python benchmarks/generation.py quality --checkpoint W.safetensors --n 1000 --steps 50 --sampler dpm2m-sde \
        --eta 1 --json /tmp/q
    python benchmarks/learning_curve.py add --steps 14000 --hours 2.9 --json /tmp/q.dpm2m-sde50.eta1.json \
        --note "session 2026-11-25, 1 thread under load"
    python benchmarks/learning_curve.py plot
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
POINTS = RESULTS / "learning_curve.json"
PLOT = RESULTS / "learning_curve.png"
STEPS_PER_EPOCH = 100_000 / 64  # QM9 train split at batch 64


def load() -> list[dict]:
    return json.loads(POINTS.read_text()) if POINTS.is_file() else []


def add(args) -> None:
    cell = json.loads(Path(args.json).read_text())
    if args.sampler is None:
        if "sampler" not in cell or "nfe" not in cell:
            raise SystemExit("error: the cell names no sampler: give --sampler")
        args.sampler = f"{cell['sampler']} {cell['nfe']}"
    points = [p for p in load() if not (p["steps"] == args.steps and p["n_molecules"] == cell["n_molecules"]
                                        and p["sampler"] == args.sampler)]
    points.append({
        "steps": args.steps, "epochs": round(args.steps / STEPS_PER_EPOCH, 2), "hours": args.hours,
        "n_molecules": cell["n_molecules"], "sampler": args.sampler,
        "atom_stability": cell["atom_stability"], "mol_stability": cell["mol_stability"],
        "validity": cell["validity"], "note": args.note,
    })
    points.sort(key=lambda p: (p["steps"], p["n_molecules"], p["sampler"]))
    POINTS.write_text(json.dumps(points, indent=1) + "\n")
    print(f"{len(points)} points in {POINTS}")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = load()
    samplers = list(dict.fromkeys(p["sampler"] for p in points))  # first-seen order: the curve's own sampler first
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "epochs", "training epochs (QM9 train, batch 64)"),
                           (axes[1], "hours", "training hours (2-core CPU)")):
        for color, (metric, name) in zip(("C0", "C1", "C2"), (("atom_stability", "atom stability"),
                                                             ("mol_stability", "mol stability"),
                                                             ("validity", "validity"))):
            for k, sampler in enumerate(samplers):  # one series per sampler: solid the first, dashed the others
                series = [p for p in points if p["sampler"] == sampler]
                ax.plot([p[key] for p in series], [100 * p[metric] for p in series], "o-" if k == 0 else "s--",
                        color=color, mfc=None if k == 0 else "none", label=f"{name} ({sampler})")
        ax.axhline(96, color="grey", ls=":", lw=1)
        ax.axhline(40, color="grey", ls=":", lw=1)
        ax.axhline(85, color="grey", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% (1,000 molecules, 50 NFE)")
    axes[0].legend(loc="lower right", fontsize=7)
    fig.suptitle("Default generator (EGNN 4 x 128, x0 + min-SNR): quality vs training; dotted: targets 96 / 85 / 40")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    print(f"wrote {PLOT}\n")
    print("| steps | epochs | CPU hours | molecules | sampler | atom stab % | mol stab % | valid % | measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['steps']:,} | {p['epochs']:.1f} | {p['hours']:.2f} | {p['n_molecules']:,} | {p['sampler']} | "
              f"{100 * p['atom_stability']:.1f} | {100 * p['mol_stability']:.1f} | {100 * p['validity']:.1f} | "
              f"{p['note']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add")
    a.add_argument("--steps", type=int, required=True, help="optimizer steps since the start of the run's lineage")
    a.add_argument("--hours", type=float, required=True, help="training wall hours since the start")
    a.add_argument("--json", required=True, help="a cell written by benchmarks/generation.py quality --json")
    a.add_argument("--sampler", default=None,
                   help="the point's sampler label (default: the cell's, e.g. 'dpm2m-sde eta=1 50'; the curve so far is "
                        "eta 1: score with generation.py quality --eta 1)")
    a.add_argument("--note", default="")
    sub.add_parser("plot")
    args = ap.parse_args()
    {"add": add, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()
