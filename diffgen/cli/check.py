"""``diffgen check`` (physics checks of a molecule file) and ``diffgen view`` (self-contained 3D HTML gallery).

Thin: parses, calls :mod:`diffgen.eval.physics` / :mod:`diffgen.eval.gallery`, prints tables. For ``sample --check``
the same work is exposed as :func:`check_output_paths` (call before sampling: refuses existing outputs and a
missing extra) and :func:`run_physics_checks` (call after sampling: checks, prints, writes the CSV and JSON).
User errors raise :class:`~diffgen.errors.DiffgenError`; :func:`diffgen.cli.main` prints them as one line and exits
with code 2.
"""
from __future__ import annotations

import csv
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from diffgen.cli.common import check_positive, check_writable, console, out_console, progress, write_json
from diffgen.errors import DiffgenError

check_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def check_output_paths(out_dir: Path, stem: str, overwrite: bool) -> tuple[Path, Path]:
    """The CSV and JSON paths ``<out_dir>/<stem>_checks.{csv,json}``, checked before any work.

    Also checks that the ``check`` extra is installed, so that a long sampling run does not end in that error.

    Raises:
        DiffgenError: ``out_dir`` is a file or cannot be created (missing parent), an output exists without
            ``overwrite``, or the extra is missing.
    """
    from diffgen.eval.physics import require_check_extra

    if out_dir.exists() and not out_dir.is_dir():
        raise DiffgenError(f"--out {out_dir} is a file; give a folder")
    if not out_dir.exists() and not out_dir.parent.is_dir():
        raise DiffgenError(f"cannot create --out {out_dir}: folder {out_dir.parent} does not exist")
    csv_path, json_path = out_dir / f"{stem}_checks.csv", out_dir / f"{stem}_checks.json"
    if out_dir.is_dir():
        check_writable(csv_path, overwrite)
        check_writable(json_path, overwrite)
    require_check_extra()
    return csv_path, json_path


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _q(stats: Optional[dict], digits: int) -> str:
    if stats is None:
        return "n/a"
    return " / ".join(f"{stats[k]:.{digits}f}" for k in ("q10", "median", "q90"))


def print_summary(summary: dict, title: str) -> None:
    """The summary table of :func:`diffgen.eval.physics.summarize` on stdout."""
    out_console.print(title, soft_wrap=True, highlight=False)
    table = Table()
    table.add_column("check")
    table.add_column("value", justify="right")
    n = summary["n_molecules"]
    table.add_row("molecules", str(n))
    table.add_row("valid (EDM) / stable (EDM)", f"{summary['n_valid']} / {summary['n_mol_stable']}")
    table.add_row("PoseBusters pass (of checked)", f"{_pct(summary['pb_pass_rate_checked'])} of {summary['n_pb_checked']}")
    table.add_row("PoseBusters pass (of all)", _pct(summary["pb_pass_rate_all"]))
    table.add_row("xTB single point ok", f"{summary['n_xtb_ok']} of {n}")
    if summary["n_relaxed"]:
        table.add_row("relax. energy kcal/mol q10/med/q90", _q(summary["relax_energy_kcal_mol"], 2))
        table.add_row("heavy-atom RMSD Å q10/med/q90", _q(summary["heavy_rmsd_angstrom"], 3))
        table.add_row("bond graph kept", _pct(summary["graph_kept_rate"]))
        table.add_row("bond orders kept", _pct(summary["orders_kept_rate"]))
        table.add_row("EDM-stable after relaxation", _pct(summary["stable_relaxed_rate"]))
        table.add_row("relaxation converged", _pct(summary["converged_rate"]))
    table.add_row("seconds / molecule (PB, xTB)",
                  f"{summary['pb_seconds'] or 0:.2f}, {summary['xtb_seconds'] or 0:.2f}")
    out_console.print(table)
    fails = summary["pb_fail_counts"]
    if fails:
        out_console.print("PoseBusters failures (molecules): " + ", ".join(f"{k} {v}" for k, v in fails.items()),
                          soft_wrap=True, highlight=False)
    undecided = summary["pb_not_computed_counts"]
    if undecided:
        out_console.print("PoseBusters checks not computed (molecules, not counted as failures): "
                          + ", ".join(f"{k} {v}" for k, v in undecided.items())
                          + f"; internal-energy time limit hit by {summary['n_pb_timed_out']}",
                          soft_wrap=True, highlight=False)


def _write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return int(v)
        return v

    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([cell(r.get(c)) for c in columns])
    tmp.replace(path)


def run_physics_checks(molecules: Sequence, csv_path: Path, json_path: Path, relax: bool = True,
                       max_steps: Optional[int] = None, source: str = "") -> dict:
    """Check ``molecules`` (list of ``(z, pos)``, Å), print the summary, write the per-molecule CSV and summary JSON.

    ``csv_path`` / ``json_path`` come from :func:`check_output_paths`; their folder is created if missing.

    Returns:
        the summary dict of :func:`diffgen.eval.physics.summarize`, plus ``seconds`` (wall time), ``relax``,
        ``max_steps``, ``fmax`` and ``source``.
    """
    from diffgen.eval.physics import CSV_COLUMNS, DEFAULT_FMAX, DEFAULT_MAX_STEPS, check_molecules, summarize

    max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
    csv_path.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with progress(transient=True) as bar:
        task = bar.add_task(f"checking {len(molecules)} molecules", total=len(molecules))
        rows = check_molecules(molecules, relax=relax, max_steps=max_steps,
                               progress=lambda k: bar.advance(task, k))
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    summary.update(seconds=round(seconds, 2), relax=relax, max_steps=max_steps, fmax=DEFAULT_FMAX, source=source,
                   machine=platform.machine())
    _write_csv(csv_path, rows, CSV_COLUMNS)
    write_json(json_path, summary)
    print_summary(summary, f"physics checks of {len(molecules)} molecules ({source or 'input'}) in {seconds:.1f} s"
                  + ("" if relax else ", no relaxation"))
    out_console.print(f"wrote {csv_path} and {json_path}")
    return summary


@check_app.command()
def check(
    file: Path = typer.Argument(..., help="Molecules to check: .sdf or .xyz with 3D coordinates (H, C, N, O, F)."),
    out: Optional[Path] = typer.Option(None, help="Output folder for <name>_checks.csv and <name>_checks.json "
                                       "(default: the folder of FILE)."),
    overwrite: bool = typer.Option(False, help="Replace the outputs if they exist."),
    relax: bool = typer.Option(True, "--relax/--no-relax", help="Relax with GFN2-xTB (else single point only)."),
    max_molecules: Optional[int] = typer.Option(None, help="Check only the first N molecules."),
    max_steps: Optional[int] = typer.Option(None, help="Cap on xTB energy+gradient evaluations per relaxation "
                                            "(default 300)."),
):
    """Physics checks: PoseBusters (molecules RDKit can read) and GFN2-xTB relaxation (tblite) of every molecule."""
    from diffgen.io import read_molecules

    check_positive("--max-molecules", max_molecules)
    check_positive("--max-steps", max_steps)
    out_dir = out if out is not None else file.parent
    molecules = read_molecules(file)
    csv_path, json_path = check_output_paths(out_dir, file.stem, overwrite)
    if max_molecules is not None:
        molecules = molecules[:max_molecules]
    if len(molecules) > 20:
        console.print(f"[dim]about 1 s per QM9-size molecule on one core: {len(molecules)} molecules[/dim]")
    run_physics_checks(molecules, csv_path, json_path, relax=relax, max_steps=max_steps, source=str(file))


@check_app.command()
def view(
    file: Path = typer.Argument(..., help="Molecules to show: .sdf or .xyz with 3D coordinates."),
    out: Path = typer.Option(..., help="Output .html (one self-contained file, opens offline)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    max_molecules: Optional[int] = typer.Option(None, help="Show only the first N molecules."),
):
    """Self-contained HTML gallery: a rotatable 3D view (3Dmol.js, inlined) of every molecule, with its SMILES,
    EDM stability and validity, and a filter by those flags."""
    from diffgen.eval.gallery import write_gallery
    from diffgen.io import read_molecules

    check_positive("--max-molecules", max_molecules)
    check_writable(out, overwrite, (".html", ".htm"))
    molecules = read_molecules(file)
    if max_molecules is not None:
        molecules = molecules[:max_molecules]
    counts = write_gallery(molecules, out, title=file.name)
    out_console.print(f"wrote {out} ({counts['n']} molecules: {counts['stable']} stable, {counts['valid']} valid)")
