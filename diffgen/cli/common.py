"""Helpers shared by the CLI commands: threads, devices, progress bars, splits, the output guard, JSON.

The output guard :func:`check_writable` is :func:`diffgen.checkpoint_files.check_writable` (one guard for the
exports and the CLI), and :func:`check_device` is :func:`diffgen.devices.check_device` (shared with the Python API),
both re-exported here.

Every check here runs **before** long work starts and raises :class:`~diffgen.errors.DiffgenError` with one line;
:func:`diffgen.cli.main` prints it as ``error: ...`` and exits with code 2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from diffgen.checkpoint_files import check_writable  # noqa: F401 - the one output guard, re-exported for the CLI
from diffgen.devices import check_device  # noqa: F401 - the one device check, re-exported for the CLI
from diffgen.errors import DiffgenError

console = Console(stderr=True)
out_console = Console()

SPLITS = ("test", "valid", "train")


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` if ``n`` is given.

    Raises:
        DiffgenError: ``n < 1``.
    """
    if n is not None:
        if n < 1:
            raise DiffgenError(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def check_positive(name: str, value: int | None) -> None:
    """Raises DiffgenError if ``value`` is given and not positive (``name`` is the option, e.g. ``--n``)."""
    if value is not None and value <= 0:
        raise DiffgenError(f"{name} must be positive, got {value}")


def check_split(split: str) -> None:
    """Raises DiffgenError unless ``split`` is one of test, valid, train."""
    if split not in SPLITS:
        raise DiffgenError(f"unknown split {split!r}: choose {', '.join(SPLITS)}")


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def progress(transient: bool = True):
    """The rich progress bar every long command shows (description, bar, done/total, elapsed, remaining)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient)
