"""The ``diffgen`` command line (Typer). Thin: parses, calls the tasks, prints tables.

Generation commands sit at the top level (:mod:`.generate`), with ``check`` and ``view`` (:mod:`.check`); the other
tasks under ``diffgen regress`` (:mod:`.regress`) and ``diffgen dynamics`` (:mod:`.dynamics`). User errors
(:class:`~diffgen.errors.DiffgenError`) end in a one-line ``error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from diffgen.cli.check import check_app
from diffgen.cli.dynamics import dynamics_app
from diffgen.cli.generate import generate_app
from diffgen.cli.regress import regress_app
from diffgen.errors import DiffgenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Equivariant diffusion models for 3D molecules (EDM recipe on QM9).")
app.add_typer(generate_app)
app.add_typer(check_app)
app.add_typer(regress_app, name="regress")
app.add_typer(dynamics_app, name="dynamics")


def main() -> None:
    """Console-script entry point: runs the app, turning user errors into one-line messages."""
    try:
        app()
    except DiffgenError as exc:
        Console(stderr=True).print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted", markup=False)
        sys.exit(130)
