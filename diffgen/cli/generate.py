"""Generation commands of the ``diffgen`` CLI: ``sample``, ``evaluate``, ``train``, ``export``, ``pack-qm9``,
``draw``.

Thin: parses, calls the generation task, prints tables. User errors raise :class:`~diffgen.errors.DiffgenError`;
:func:`diffgen.cli.main` prints them as one line and exits with code 2.
"""
from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from diffgen.cli.common import (
    check_device, check_positive, check_writable, console, out_console, progress, write_json,
)
from diffgen.devices import DEFAULT_PRECISION, PRECISIONS, resolve_precision
from diffgen.diffusion import DEFAULT_ETAS, DEFAULT_SAMPLER, DEFAULT_STEPS, check_eta
from diffgen.errors import DiffgenError

generate_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

_METRIC_ROWS = [
    ("atom_stability", "atom stability", True),
    ("mol_stability", "mol stability", True),
    ("validity", "validity", True),
    ("uniqueness", "uniqueness", True),
    ("valid_unique", "valid & unique", True),
    ("novelty", "novelty", True),
    ("n_molecules", "molecules", False),
    ("n_atoms", "atoms", False),
]


def _print_metrics(metrics: dict, title: str) -> None:
    """Print ``title`` on its own line (never wrapped into the narrow table), then the metrics table."""
    out_console.print(title, soft_wrap=True, highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, percent in _METRIC_ROWS:
        value = metrics.get(key)
        if value is None:
            text = "n/a"
        elif percent:
            text = f"{100 * value:.2f} %"
        else:
            text = str(value)
        table.add_row(label, text)
    out_console.print(table)


def _reference(novelty: Optional[bool]):
    """Training SMILES for novelty: built if asked (True), read if cached (None), skipped (False)."""
    if novelty is False:
        return None
    from diffgen.eval.reference import training_smiles

    ref = training_smiles(build=bool(novelty))
    if ref is None:
        console.print("[dim]novelty: n/a until the QM9 reference is cached: run `diffgen evaluate --dataset qm9 "
                      "--split train` once, or pass --novelty[/dim]")
    return ref


#: Upper limits checked before sampling: beyond them a run would take days or exhaust memory.
MAX_STEPS = 100_000
_BYTES_PER_MOLECULE = 4096  # a sampled molecule kept until written: tensors, RDKit/SDF records, metrics (generous)
_EDGE_BYTES_PER_CHANNEL = 4 * 12  # fp32, ~12 live [E, hidden] tensors per EGNN layer on the full graph


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        return 8 << 30


def check_sampling_budget(n: int, steps: int, batch_size: int, hidden: int = 256, max_atoms: int = 29) -> None:
    """Refuse, before any work, a sampling run whose memory would exceed half of this machine's RAM.

    The estimate: ``n`` finished molecules kept until they are written (4 KiB each) plus one batch's full-graph
    edge tensors (``batch_size * max_atoms * (max_atoms - 1)`` edges x ``hidden`` channels x 48 bytes).

    Raises:
        DiffgenError: ``steps > MAX_STEPS`` or the estimate exceeds half of the physical memory.
    """
    if steps > MAX_STEPS:
        raise DiffgenError(f"--steps {steps} is more than {MAX_STEPS:,} (EDM's sampler uses 1000)")
    kept = n * _BYTES_PER_MOLECULE
    batch = min(batch_size, n) * max_atoms * (max_atoms - 1) * hidden * _EDGE_BYTES_PER_CHANNEL
    budget = _memory_bytes() // 2
    if kept + batch > budget:
        raise DiffgenError(f"--n {n} with --batch-size {batch_size} needs about {(kept + batch) / 2**30:.1f} GiB, more "
                           f"than half of this machine's {2 * budget / 2**30:.0f} GiB: sample in several runs "
                           "(different --seed) or with a smaller --batch-size")


def _make_out_dir(out: Optional[Path], overwrite: bool) -> Path:
    """Create the output folder before sampling; two runs never share one.

    ``out`` None: a new ``diffgen_samples/<time>`` folder, made with an exclusive ``mkdir`` (``-2``, ``-3``, ... if
    another run took the name first). ``out`` given: created if missing (its parent must exist); an existing one
    may not hold samples or metrics unless ``overwrite``.

    Raises:
        DiffgenError: unusable ``out`` (a file, missing parent, not writable, or holding results without overwrite).
    """
    if out is None:
        base = Path("diffgen_samples") / datetime.now().strftime("%Y%m%d-%H%M%S")
        base.parent.mkdir(exist_ok=True)
        for k in range(1, 10_000):
            candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
        raise DiffgenError(f"cannot create a new output folder next to {base}")
    if out.exists() and not out.is_dir():
        raise DiffgenError(f"--out {out} is a file; give a folder")
    if not out.exists():
        if not out.parent.is_dir():
            raise DiffgenError(f"cannot create --out {out}: folder {out.parent} does not exist")
        out.mkdir()
    for name in OUTPUT_FILES:
        check_writable(out / name, overwrite)
    return out


#: Files ``diffgen sample`` writes into its output folder (plus ``trajectory_<k>.xyz`` with ``--trajectory``).
OUTPUT_FILES = ("samples.sdf", "samples.xyz", "metrics.json")


def parse_atom_counts(text: str) -> list[int]:
    """``--n-atoms`` text: ``"12"``, a list ``"9,12"``, a range ``"10-15"`` or a mix (``"5,10-12"``) -> the counts.

    Raises:
        DiffgenError: anything else (the message quotes the text).
    """
    counts: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                counts.extend(range(a, b + 1))
            else:
                counts.append(int(lo))
        except ValueError:
            raise DiffgenError(f"--n-atoms {text!r}: give a count (12), a list (9,12) or a range (10-15)") from None
    return counts


def trajectory_files(out_dir: Path, k: int) -> list[Path]:
    """The ``--trajectory`` files: ``trajectory_<i>.xyz`` for the first ``k`` written molecules (``i`` 1-based, as
    the SDF records ``mol_<i>``)."""
    return [out_dir / f"trajectory_{i}.xyz" for i in range(1, k + 1)]


@generate_app.command()
def sample(
    n: int = typer.Option(100, "--n", help="Number of molecules."),
    checkpoint: Optional[Path] = typer.Option(None, help="Generator weights (.safetensors or Lightning .ckpt); default: shipped."),
    steps: int = typer.Option(DEFAULT_STEPS, help="Denoising steps (network evaluations per molecule)."),
    sampler: str = typer.Option(DEFAULT_SAMPLER, help="ancestral (EDM, stochastic), dpm2m-sde (SDE-DPM-Solver++(2M), "
                                "stochastic, noise scale --eta) or dpm2m (DPM-Solver++(2M), deterministic ODE)."),
    eta: Optional[float] = typer.Option(None, help="Noise scale of the SDE solver (default "
                                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_ETAS.items())
                                        + "; 1 = SDE-DPM-Solver++(2M) as published, 0 = its ODE, more = more fresh "
                                        "noise and pull toward the network's x0 per step)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same molecules, whatever --batch-size."),
    batch_size: int = typer.Option(100, help="Molecules per network call."),
    n_atoms: Optional[str] = typer.Option(None, "--n-atoms", help="Atom counts instead of the training "
                                          "distribution: 12, a list 9,12 or a range 10-15 (taken in turn)."),
    keep: str = typer.Option("all", help="all, valid (RDKit sanitization, EDM validity) or stable (EDM molecule "
                             "stability): sample until --n molecules pass, at most --max-attempts."),
    max_attempts: Optional[int] = typer.Option(None, help="Cap on sampled molecules with --keep valid|stable "
                                               "(default: 10 x --n)."),
    trajectory: int = typer.Option(0, help="Also write the denoising chain of the first K molecules as "
                                   "trajectory_<k>.xyz (steps + 1 frames each, prior draw first)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: a new diffgen_samples/<time> folder)."),
    overwrite: bool = typer.Option(False, help="Replace samples.sdf, samples.xyz, metrics.json (and trajectory "
                                   "files) if they exist in --out."),
    novelty: Optional[bool] = typer.Option(None, "--novelty/--no-novelty",
                                           help="Novelty vs QM9 train (default: only if its reference is cached)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu, cuda or mps."),
    precision: str = typer.Option(DEFAULT_PRECISION, help=f"{', '.join(PRECISIONS)}: the network's matrix products "
                                  "in bf16 (1.1-1.8x faster on CPUs with AVX512-BF16) or fp32; auto = bf16 where "
                                  "the device computes bf16 natively."),
    physics: bool = typer.Option(False, "--check", help="Also run the physics checks of `diffgen check` on the "
                                 "written molecules (PoseBusters, GFN2-xTB relaxation; needs the [check] extra): "
                                 "samples_checks.csv and samples_checks.json in --out."),
):
    """Generate 3D molecules, write SDF + XYZ, and print their EDM quality metrics."""
    from diffgen.checkpoint_files import existing_checkpoint

    # the checks that need no torch first: a typo costs 0.2 s, not the ~4 s of importing torch and PyG
    check_positive("--n", n)
    check_positive("--steps", steps)
    check_positive("--batch-size", batch_size)
    check_positive("--max-attempts", max_attempts)
    if not 0 <= trajectory <= n:
        raise DiffgenError(f"--trajectory must be between 0 and --n ({n}), got {trajectory}")
    counts = parse_atom_counts(n_atoms) if n_atoms is not None else None
    if eta is not None:
        check_eta(eta)
    if checkpoint is not None:  # a missing shipped default is reported by load() below
        existing_checkpoint(checkpoint)

    import torch

    import diffgen
    from diffgen.data.cache import file_sha256
    from diffgen.diffusion.samplers import get_sampler
    from diffgen.eval.chem import sd_tags
    from diffgen.io import write_sdf, write_xyz
    from diffgen.tasks.generation.build import KEEP_CHOICES, MAX_ATTEMPTS_FACTOR, check_atom_counts, \
        generate_molecules, sampler_options
    from diffgen.tasks.generation.checkpoints import load

    if keep not in KEEP_CHOICES:
        raise DiffgenError(f"unknown --keep {keep!r}: choose {', '.join(KEEP_CHOICES)}")
    cap = n if keep == "all" else (MAX_ATTEMPTS_FACTOR * n if max_attempts is None else max_attempts)
    if cap < n:
        raise DiffgenError(f"--max-attempts {cap} is less than --n {n}")
    check_device(device)
    precision = resolve_precision(precision, device)
    get_sampler(sampler)  # validate the name before loading anything
    if eta is not None and sampler not in DEFAULT_ETAS:
        raise DiffgenError(f"--eta applies to the {' and '.join(DEFAULT_ETAS)} sampler only, not --sampler {sampler}")
    gen, _ = load(checkpoint, device=device)
    counts = check_atom_counts(counts, gen.node_dist, "--n-atoms")
    check_sampling_budget(n, steps, batch_size, hidden=gen.config.model.hidden)
    if physics:  # before the output folder is made
        from diffgen.eval.physics import require_check_extra

        require_check_extra()
    out_dir = _make_out_dir(out, overwrite)
    sdf_path, xyz_path, json_path = (out_dir / name for name in OUTPUT_FILES)
    traj_paths = trajectory_files(out_dir, trajectory)
    for path in traj_paths:
        check_writable(path, overwrite)
    ref = _reference(novelty)
    if physics:
        from diffgen.cli.check import check_output_paths

        check_paths = check_output_paths(out_dir, sdf_path.stem, overwrite)
    start = time.perf_counter()
    with progress(transient=False) as bar:
        task = bar.add_task(f"sampling {n} molecules x {steps} steps", total=0)

        def on_chunk(count: int, kept: int, attempts: int) -> None:
            total = bar.tasks[0].total + steps * ((count + batch_size - 1) // batch_size)
            text = f"sampling {n} molecules x {steps} steps" if keep == "all" else \
                f"sampling until {n} are {keep}: {kept} so far, {attempts} sampled"
            bar.update(task, total=total, description=text)

        run = generate_molecules(gen.diffusion, gen.node_dist, n, keep=keep, max_attempts=cap, n_chains=trajectory,
                                 reference_smiles=ref, steps=steps, batch_size=batch_size, seed=seed,
                                 sampler=sampler, n_atoms=counts, progress=lambda k: bar.advance(task, k),
                                 precision=precision, on_chunk=on_chunk, eta=eta)
    seconds = time.perf_counter() - start
    molecules = run.molecules
    props = [{**sd_tags(r), "diffgen_index": i} for r, i in zip(run.reports, run.indices)]
    write_sdf(sdf_path, molecules, props=props)
    write_xyz(xyz_path, molecules, comments=[f"diffgen sample {i} seed={seed}" for i in run.indices])
    for k, (path, index) in enumerate(zip(traj_paths, run.indices), start=1):
        frames = run.chains[index]
        write_xyz(path, frames, comments=[f"mol_{k} (diffgen sample {index} seed={seed}) step {s}/{steps}"
                                          for s in range(len(frames))])
    result = dict(run.metrics)
    eta_used = sampler_options(sampler, eta).get("eta")
    result.update(seconds=round(seconds, 2), sampler=sampler, eta=eta_used, steps=steps, seed=seed,
                  batch_size=batch_size,
                  atom_counts=n_atoms, keep=keep, kept=len(molecules), attempts=run.attempts,
                  max_attempts=cap if keep != "all" else None, device=device, precision=precision,
                  checkpoint=str(gen.source),
                  checkpoint_sha256=file_sha256(gen.source), diffgen_version=diffgen.__version__,
                  torch_version=torch.__version__)
    write_json(json_path, result)
    what = f"{run.attempts} molecules" if keep == "all" else f"{run.attempts} molecules sampled ({len(molecules)} kept)"
    eta_text = "" if eta_used is None else f" (eta {eta_used:g})"
    _print_metrics(result, f"{what}, {sampler} sampler{eta_text}, {steps} steps, sampled in {seconds:.1f} s on {device} "
                           f"({precision})")
    written = ", ".join(str(p) for p in (sdf_path, xyz_path, *traj_paths[:len(run.chains)]))
    out_console.print(f"wrote {written}", soft_wrap=True, highlight=False)
    if physics and molecules:
        from diffgen.cli.check import run_physics_checks

        run_physics_checks(molecules, *check_paths, source=str(sdf_path))
    if len(molecules) < n:
        console.print(f"error: --keep {keep}: only {len(molecules)} of {n} molecules passed in {run.attempts} "
                      f"attempts (the cap, --max-attempts {cap}); wrote those {len(molecules)} to {out_dir}; "
                      "raise --max-attempts for more", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@generate_app.command()
def evaluate(
    file: Optional[Path] = typer.Argument(None, help="Molecules to score: .sdf or .xyz (3D coordinates)."),
    dataset: Optional[str] = typer.Option(None, help="Score a dataset instead of a file: qm9."),
    split: str = typer.Option("train", help="Dataset split: train, valid or test."),
    limit: Optional[int] = typer.Option(None, help="Score only the first LIMIT molecules of the dataset."),
    novelty: Optional[bool] = typer.Option(None, "--novelty/--no-novelty",
                                           help="Novelty vs QM9 train (default: only if its reference is cached)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
    overwrite: bool = typer.Option(False, help="Replace the --json file if it exists."),
):
    """EDM metrics (atom/mol stability, validity, uniqueness, novelty) of a file or of QM9 itself."""
    from diffgen.eval.chem import GenerationMetrics

    if (file is None) == (dataset is None):
        raise DiffgenError("give either a FILE or --dataset qm9")
    check_positive("--limit", limit)
    if json_out is not None:
        check_writable(json_out, overwrite, (".json",))
    if dataset is not None:
        if dataset.lower() != "qm9":
            raise DiffgenError(f"unknown dataset {dataset!r}: only qm9 is available")
        from diffgen.data.qm9 import QM9
        from diffgen.eval.reference import training_smiles

        ds = QM9(split=split)
        n = len(ds) if limit is None else min(limit, len(ds))
        molecules = [(ds[i].z, ds[i].pos) for i in range(n)]
        title = f"QM9 {split} ({n} molecules)"
        # evaluating the full train split builds the novelty reference as a side effect
        ref = training_smiles(build=True) if (split == "train" and limit is None and novelty is not False) \
            else _reference(novelty)
    else:
        from diffgen.io import read_molecules

        molecules = read_molecules(file)
        title = f"{file} ({len(molecules)} molecules)"
        ref = _reference(novelty)
    metrics = GenerationMetrics(reference_smiles=ref)
    metrics.update(molecules)
    result = metrics.compute()
    _print_metrics(result, title)
    if json_out is not None:
        write_json(json_out, result)


@generate_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    config: str = typer.Option("qm9_egnn", help="YAML config: a file, or the name of a packaged config "
                               "(qm9_egnn = the shipped model's recipe, qm9_egnn_edm = EDM's)."),
    accelerator: Optional[str] = typer.Option(None, help="cpu, gpu or auto (overrides trainer.accelerator)."),
    devices: Optional[str] = typer.Option(None, help="Number of devices or 'auto' (several GPUs use DDP)."),
    out_dir: Optional[str] = typer.Option(None, help="Run folder (overrides trainer.out_dir); resumes from its newest checkpoint."),
):
    """Train the generator. Extra arguments are config overrides: section.key=value (e.g. model.hidden=128)."""
    from diffgen.config import trainer_overrides
    from diffgen.tasks.generation.config import load_generation_config
    from diffgen.tasks.generation.module import train_generation

    overrides = list(ctx.args)
    overrides += trainer_overrides(accelerator, devices, out_dir)
    cfg = load_generation_config(config, overrides)
    train_generation(cfg)


@generate_app.command()
def export(
    checkpoints: list[Path] = typer.Argument(..., help="Lightning .ckpt from `diffgen train` (or an export); several "
                                             "are averaged.", show_default=False),
    out: Path = typer.Argument(..., help="Output .safetensors (EMA weights; config YAML written beside it)."),
    overwrite: bool = typer.Option(False, help="Replace OUT and the YAML beside it if they exist."),
    dtype: str = typer.Option("fp16", help="Storage type of the weights: fp16, bf16 or fp32."),
    with_raw: bool = typer.Option(False, help="Also store the trained (non-EMA) weights, so a later run can go on "
                                  "training from this file (optim.init_from=OUT) when the .ckpt is gone."),
):
    """Export the EMA weights of a training checkpoint to a small safetensors file. Given several checkpoints of one
    run (e.g. `trainer.keep_every_n_steps`), writes the uniform mean of their EMA weights (checkpoint averaging)."""
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise DiffgenError(f"unknown --dtype {dtype!r}: choose fp16, bf16 or fp32")
    check_writable(out, overwrite, (".safetensors",))
    check_writable(out.with_suffix(".yaml"), overwrite)
    if with_raw and len(checkpoints) > 1:
        raise DiffgenError("--with-raw takes one checkpoint, not an average of several")
    from diffgen.tasks.generation.checkpoints import export as export_checkpoint

    path = export_checkpoint(checkpoints, out, dtype=dtypes[dtype], overwrite=overwrite, with_raw=with_raw)
    averaged = f", the mean of {len(checkpoints)} checkpoints" if len(checkpoints) > 1 else ""
    out_console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB{averaged})")


@generate_app.command("pack-qm9")
def pack_qm9(
    out: Path = typer.Argument(..., help="Output .safetensors holding the train and valid splits as flat tensors."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Write QM9's train and valid splits (with H) as one compact tensor file (~28 MB) to train from with
    data.packed=OUT on a machine without qm9pack or RDKit (e.g. a GPU machine)."""
    check_writable(out, overwrite, (".safetensors",))
    from diffgen.data.packed import PackedSplit, save_packed
    from diffgen.data.qm9 import QM9

    splits = {s: PackedSplit.from_dataset(QM9(None, s)) for s in ("train", "valid")}
    path = save_packed(splits, out)
    counts = ", ".join(f"{k} {len(v):,} molecules" for k, v in splits.items())
    out_console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB: {counts})")


@generate_app.command()
def draw(
    file: Path = typer.Argument(..., help="Molecules (.sdf or .xyz) to depict."),
    out: Path = typer.Option(..., help="Output image: .png or .svg."),
    n: int = typer.Option(24, "--n", help="Draw at most this many molecules."),
    per_row: int = typer.Option(6, help="Molecules per row."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Grid of 2D depictions (bonds inferred as in evaluation): captions give each molecule's index in the file and
    its flags (EDM stability, RDKit validity, fragments, added hydrogens); atoms that break their valence are red."""
    from diffgen.eval.draw import draw_grid
    from diffgen.io import read_molecules

    check_positive("--n", n)
    check_positive("--per-row", per_row)
    check_writable(out, overwrite, (".png", ".svg"))
    molecules = read_molecules(file)[:n]
    draw_grid(molecules, out, per_row=per_row)
    out_console.print(f"wrote {out} ({len(molecules)} molecules)")
