"""Generation benchmark: sampling speed and EDM metrics of a checkpoint, training throughput on this machine.

Usage::

    python benchmarks/generation.py speed                 # `diffgen sample --n 100` wall time at 1000 and 100 steps
    python benchmarks/generation.py quality --n 1000 --steps 1000 100 [--sampler dpm2m]
    python benchmarks/generation.py train-throughput      # training molecules/s of diffgen/configs/qm9_egnn.yaml
    python benchmarks/generation.py sweep --samplers ancestral dpm2m dpm2m-sde --nfe 100 50 20 10 --n 1000
    python benchmarks/generation.py score-sdf --sampler ancestral --nfe 1000 --seconds 2900 runs/s*/samples.sdf
    python benchmarks/generation.py report                # -> the sweep table in benchmarks/results/generation.md

``sweep`` and ``score-sdf`` store one JSON per (sampler, NFE) cell in benchmarks/results/generation_cells/
(a cell that exists is skipped, so a sweep can be split across processes or resumed); ``report`` turns the
cells into the markdown table between the sweep markers of benchmarks/results/generation.md.

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
    from diffgen.tasks.generation.checkpoints import load_generator
    from diffgen.eval.reference import training_smiles
    from diffgen.tasks.generation.build import sample_molecules, sampler_options

    eta = sampler_options(args.sampler, args.eta).get("eta")  # resolved; a bad --eta fails before loading anything
    label = _label(args.sampler, eta)
    gen = load_generator(args.checkpoint)
    ref = training_smiles()
    print(f"machine: {machine()}; checkpoint: {gen.source}")
    print(f"precision: {args.precision}")
    print("| sampler | steps | n | atom stab % | mol stab % | valid % | valid&unique % | novelty % | mol/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps in args.steps:
        t0 = time.perf_counter()
        mols = sample_molecules(gen.diffusion, gen.node_dist, args.n, steps=steps, batch_size=args.batch_size,
                                seed=args.seed, sampler=args.sampler, precision=args.precision, eta=args.eta)
        dt = time.perf_counter() - t0
        r = _score(mols, args.n, dt, ref, precision=args.precision, seed=args.seed, sampler=label, nfe=steps,
                   eta=eta)
        print(f"| {label} | {steps} | {args.n} | {100 * r['atom_stability']:.1f} | {100 * r['mol_stability']:.1f} | "
              f"{100 * r['validity']:.1f} | {100 * r['valid_unique']:.1f} | {100 * r['novelty']:.1f} | "
              f"{args.n / dt:.2f} |", flush=True)
        if args.json:
            tag = "" if args.precision == "fp32" else f".{args.precision}"
            tag += "" if eta is None else f".eta{eta:g}"
            Path(args.json).with_suffix(f".{args.sampler}{steps}{tag}.json").write_text(json.dumps(r, indent=2))


CELLS = Path(__file__).parent / "results" / "generation_cells"
REPORT = Path(__file__).parent / "results" / "generation.md"
START, END = "<!-- sweep table: start (python benchmarks/generation.py report) -->", "<!-- sweep table: end -->"
#: EDM (Hoogeboom et al. 2022, Table 2), 10,000 samples; see ../shared/reference/qm9_generation.md.
PUBLISHED_EDM = {"atom_stability": 0.987, "mol_stability": 0.820, "validity": 0.919, "valid_unique": 0.907}


def _label(sampler: str, eta: float | None) -> str:
    """The sampler's name in tables and cell files, with the resolved noise scale it ran at (``sampler_options``):
    ``ancestral`` (None), ``dpm2m-sde eta=3``."""
    return sampler if eta is None else f"{sampler} eta={eta:g}"


def _cell_path(sampler: str, nfe: int) -> Path:
    return CELLS / f"{sampler.replace(' eta=', '-eta')}_{nfe}.json"


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{machine()}, load average {os.getloadavg()[0]:.1f} at the end"


def _score(mols, n: int, seconds: float, ref: set[str], **info) -> dict:
    """EDM metrics of ``mols`` (novelty against ``ref``) plus ``n``, ``seconds``, molecules/s and ``info``."""
    from diffgen.eval.chem import GenerationMetrics

    m = GenerationMetrics(reference_smiles=ref)
    m.update(mols)
    r = {k: v for k, v in m.compute().items() if isinstance(v, (int, float))}
    return {**r, "n": n, "seconds": seconds, "molecules_per_s": n / seconds if seconds else None, **info}


def sweep(args) -> None:
    from diffgen.tasks.generation.checkpoints import load_generator
    from diffgen.tasks.generation.build import sample_molecules, sampler_options
    from diffgen.diffusion import DEFAULT_ETAS
    from diffgen.diffusion.samplers import get_sampler

    def eta_of(name: str):  # --eta applies to the samplers that have a noise scale
        return args.eta if name in DEFAULT_ETAS else None

    for name in args.samplers:
        get_sampler(name)
        sampler_options(name, eta_of(name))
    from diffgen.eval.reference import training_smiles

    gen = load_generator(args.checkpoint, device=args.device)
    ref = training_smiles()
    CELLS.mkdir(parents=True, exist_ok=True)
    for name in args.samplers:
        for nfe in args.nfe:
            label = _label(name, sampler_options(name, eta_of(name)).get("eta"))
            out = _cell_path(label, nfe)
            if out.exists() and not args.force:
                print(f"skip {out} (exists; --force to redo)", flush=True)
                continue
            t0 = time.perf_counter()
            mols = sample_molecules(gen.diffusion, gen.node_dist, args.n, steps=nfe, batch_size=args.batch_size,
                                    seed=args.seed, sampler=name, precision="fp32", eta=eta_of(name))
            dt = time.perf_counter() - t0
            ckpt = f" --checkpoint {args.checkpoint}" if args.checkpoint else ""
            eta = "" if eta_of(name) is None else f" --eta {args.eta:g}"
            cmd = (f"python benchmarks/generation.py sweep{ckpt} --samplers {name}{eta} --nfe {nfe} --n {args.n} "
                   f"--batch-size {args.batch_size} --seed {args.seed}")
            r = _score(mols, args.n, dt, ref, sampler=label, nfe=nfe, device=_device_name(args.device),
                       checkpoint=str(gen.source), command=cmd)
            out.write_text(json.dumps(r, indent=2))
            print(f"{label} {nfe}: atom {100 * r['atom_stability']:.1f} mol {100 * r['mol_stability']:.1f} "
                  f"valid {100 * r['validity']:.1f} ({dt:.0f} s)", flush=True)


def score_sdf(args) -> None:
    """Score molecules sampled elsewhere (e.g. several `diffgen sample` runs) as one cell."""
    from diffgen.eval.reference import training_smiles
    from diffgen.io import read_molecules

    mols = [m for f in args.files for m in read_molecules(f)]
    CELLS.mkdir(parents=True, exist_ok=True)
    r = _score(mols, len(mols), args.seconds, training_smiles(), sampler=args.sampler, nfe=args.nfe, device=args.device_name or machine(),
               checkpoint=args.checkpoint or "shipped", command=args.command or "")
    _cell_path(args.sampler, args.nfe).write_text(json.dumps(r, indent=2))
    print(json.dumps(r, indent=2))


def report(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))]
    order = {s: i for i, s in enumerate(["ancestral", "dpm2m-sde", "dpm2m"])}
    rows.sort(key=lambda r: (order.get(r["sampler"].split()[0], 99), r["sampler"], -r["nfe"]))
    lines = ["", "",
             "EDM metrics (family A) for each sampler and number of network evaluations (NFE), checkpoint: "
             + "; ".join(sorted({f"`{r['checkpoint']}`" for r in rows})) + ".",
             "Cells come from benchmarks/results/generation_cells/*.json; each names its command and device.",
             "molecules/s is the sampling rate during the cell, on the device named in the cell.", "",
             "| sampler | NFE | molecules | atom stab % | mol stab % | valid % | valid & unique % | novelty % | "
             "molecules/s | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mps = f"{r['molecules_per_s']:.2f}" if r.get("molecules_per_s") else "-"
        lines.append(f"| {r['sampler']} | {r['nfe']} | {r['n']} | {100 * r['atom_stability']:.1f} | "
                     f"{100 * r['mol_stability']:.1f} | {100 * r['validity']:.1f} | {100 * r['valid_unique']:.1f} | "
                     f"{100 * r['novelty']:.1f} | {mps} | {r['device']} |")
    p = PUBLISHED_EDM
    lines += [f"| EDM, published (GPU-trained 5.3 M model) | 1000 | 10,000 | {100 * p['atom_stability']:.1f} | "
              f"{100 * p['mol_stability']:.1f} | {100 * p['validity']:.1f} | {100 * p['valid_unique']:.1f} | - | - | "
              "RTX 3090 (paper) |", "", "Commands:", ""]
    lines += [f"* {r['sampler']} {r['nfe']}: `{r['command']}`" for r in rows if r.get("command")]
    block = "\n".join([START, *lines[2:], END])
    text = REPORT.read_text() if REPORT.exists() else ""
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    REPORT.write_text(text)
    print(block)


def train_throughput(args) -> None:
    from torch_geometric.loader import DataLoader

    from diffgen.tasks.generation.config import load_generation_config as load_config
    from diffgen.data.qm9 import QM9
    from diffgen.devices import autocast
    from diffgen.tasks.generation.build import build_diffusion

    cfg = load_config(args.config)
    torch.manual_seed(0)
    diffusion = build_diffusion(cfg)
    if args.compile:  # the backbone only: the loss has data-dependent shapes (zero-CoM noise per molecule)
        diffusion.denoiser.backbone.compile(dynamic=True)  # in place, as trainer.compile=true does
    precision = "bf16" if args.bf16 else "fp32"
    opt = torch.optim.AdamW(diffusion.parameters(), lr=cfg.optim.lr)
    if args.resident:  # flat tensors, batches by indexing (data.loader=resident)
        from diffgen.data.packed import PackedLoader, PackedSplit

        loader = PackedLoader(PackedSplit.from_dataset(QM9(split="train")), cfg.data.batch_size)
    else:
        loader = DataLoader(QM9(split="train"), batch_size=cfg.data.batch_size, shuffle=True)
    it = iter(loader)
    n_mol, t0 = 0, None
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            t0, n_mol = time.perf_counter(), 0
        batch = next(it)
        with autocast(precision):
            loss = diffusion.loss(batch.pos, batch.z, batch.batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n_mol += batch.num_graphs
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in diffusion.parameters())
    print(f"machine: {machine()}")
    variant = " + ".join(["bf16 autocast"] * args.bf16 + ["compiled backbone"] * args.compile
                         + ["resident loader"] * args.resident) or "fp32 eager"
    print(f"| {args.config} ({variant}) | {n_params / 1e6:.2f} M params | batch {cfg.data.batch_size} | "
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
    q.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="sampling precision (default fp32, as every earlier row of the results files)")
    q.add_argument("--checkpoint", default=None)
    q.add_argument("--eta", type=float, default=None, help="noise scale of dpm2m-sde (default: the sampler's)")
    q.add_argument("--json", default=None)
    t = sub.add_parser("train-throughput")
    t.add_argument("--config", default="qm9_egnn")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU")
    t.add_argument("--compile", action="store_true", help="torch.compile the EGNN backbone (dynamic shapes)")
    t.add_argument("--resident", action="store_true", help="resident packed tensors instead of the PyG DataLoader")
    t.add_argument("--iters", type=int, default=30)
    t.add_argument("--warmup", type=int, default=5)
    w = sub.add_parser("sweep")
    w.add_argument("--samplers", nargs="+", default=["ancestral", "dpm2m-sde", "dpm2m"])
    w.add_argument("--nfe", type=int, nargs="+", default=[1000, 100, 50, 20, 10])
    w.add_argument("--n", type=int, default=1000)
    w.add_argument("--batch-size", type=int, default=100)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--checkpoint", default=None)
    w.add_argument("--eta", type=float, default=None,
                   help="noise scale of dpm2m-sde (default: its default); cells are named dpm2m-sde-etaX")
    w.add_argument("--device", default="cpu")
    w.add_argument("--force", action="store_true")
    f = sub.add_parser("score-sdf")
    f.add_argument("files", nargs="+")
    f.add_argument("--sampler", required=True)
    f.add_argument("--nfe", type=int, required=True)
    f.add_argument("--seconds", type=float, default=0.0, help="total sampling seconds of these molecules")
    f.add_argument("--checkpoint", default=None)
    f.add_argument("--device-name", default=None)
    f.add_argument("--command", default=None)
    sub.add_parser("report")
    args = p.parse_args()
    {"speed": speed, "quality": quality, "train-throughput": train_throughput, "sweep": sweep, "score-sdf": score_sdf,
     "report": report}[args.mode](args)


if __name__ == "__main__":
    main()
