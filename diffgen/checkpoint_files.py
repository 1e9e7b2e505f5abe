"""Reading and writing checkpoint files with one-line errors: Lightning ``.ckpt`` and ``.safetensors``.

Shared by the generator (:mod:`diffgen.tasks.generation.checkpoints`), regressor (:mod:`diffgen.tasks.regression.checkpoints`) and
dynamics (:mod:`diffgen.tasks.dynamics.common`) loaders, which add what their own files must contain.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from diffgen.errors import DiffgenError

#: Folder of the weights shipped inside the package (``diffgen/pretrained``).
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (terminal escapes removed, at most 200 characters), or its type
    name."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _refused_unpickling(exc: BaseException) -> str | None:
    """For torch's weights_only refusal, the reason it gives (e.g. ``Unsupported global: GLOBAL getattr was not an
    allowed global by default``); else None. torch's own first line advises loading with weights_only=False."""
    text = _ANSI.sub("", str(exc))
    if "Weights only load failed" not in text:
        return None
    match = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. Please|\.?$)", text, flags=re.M)
    return (match.group(1) if match else "objects other than tensors and plain data")[:200]


def read_lightning(path: Path) -> dict:
    """The dict stored in a Lightning ``.ckpt`` (on CPU), read with ``weights_only=True``: tensors and plain
    Python data only, so a crafted file cannot run code while it is read.

    Raises:
        DiffgenError: the file cannot be read (corrupt, truncated, not a torch file, or holding objects other than
            tensors and plain data) or is not a dict.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on corrupt files
        refused = _refused_unpickling(exc)
        if refused is not None:
            raise DiffgenError(f"cannot read checkpoint {path}: it holds Python objects that only a full unpickling "
                               f"would rebuild, which could run code, so it is refused ({refused})") from None
        raise DiffgenError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(ckpt, dict):
        raise DiffgenError(f"cannot read checkpoint {path}: not a Lightning checkpoint ({type(ckpt).__name__})")
    return ckpt


def read_safetensors(path: Path, fmt: str, kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file whose metadata ``format`` must be ``fmt``.

    Raises:
        DiffgenError: unreadable file, or another format (the message names ``kind``, e.g. "generator").
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001
        raise DiffgenError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if meta.get("format") != fmt:
        raise DiffgenError(f"{path} is not a diffgen {kind} checkpoint (metadata format {meta.get('format')!r})")
    return meta, state


def write_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], out_path: Path) -> Path:
    """Write ``tensors`` with string metadata atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, out_path)
    return out_path
