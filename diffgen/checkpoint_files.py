"""Checkpoint files shared by the three tasks: reading Lightning ``.ckpt`` and ``.safetensors`` with one-line errors,
writing safetensors atomically, and the one output guard (:func:`check_writable`).

The contract every task follows (``diffgen.tasks.<task>.checkpoints``):

* ``load(path, device="cpu") -> (model, config)`` reads a Lightning ``.ckpt`` from training or a ``.safetensors``
  export (chosen by the file suffix);
* ``export(ckpt_path, out_path, dtype=..., overwrite=False) -> Path`` writes a small safetensors file whose tensors
  are the model's weights and whose metadata holds ``format`` (``diffgen-<task>-vN``) and ``config`` (the task's
  config as a JSON object), plus task-specific JSON entries.

Every problem a user can cause (missing, truncated or foreign file, metadata that is missing or not JSON, a config
with unknown keys, weights that do not fit the config, an existing output) is a one-line
:class:`~diffgen.errors.DiffgenError`. torch is imported inside the functions, so the CLI can use
:func:`check_writable` without loading torch.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from diffgen.errors import DiffgenError

if TYPE_CHECKING:
    import torch

#: Folder of the weights shipped inside the package (``diffgen/pretrained``).
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"

T = TypeVar("T")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (terminal escapes removed, at most 200 characters), or its type
    name."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def check_writable(path: str | os.PathLike, overwrite: bool = False, suffixes: tuple[str, ...] | None = None) -> Path:
    """The one output guard (exports and every CLI output): check, before any work, that ``path`` can be written.

    Its folder must exist and be writable, it must not be a folder, it must not exist unless ``overwrite``, and its
    suffix must be one of ``suffixes`` (lower case, with the dot) if given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DiffgenError: any of the above fails (one line).
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise DiffgenError(f"{path} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise DiffgenError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise DiffgenError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise DiffgenError(f"cannot write {path}: folder {path.parent} is not writable")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DiffgenError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    return path


def existing_checkpoint(path: str | os.PathLike | None, default: Path | None = None) -> Path:
    """``path`` (or ``default`` if None) as a Path, checked to be a file.

    Raises:
        DiffgenError: no path and no default, or the file does not exist (the message says when the missing file is
            the shipped default).
    """
    if path is None and default is None:
        raise DiffgenError("no checkpoint given")
    path = Path(path) if path is not None else default
    if not path.is_file():
        hint = " (the shipped weights are missing from this installation)" if path == default else ""
        raise DiffgenError(f"checkpoint not found: {path}{hint}")
    return path


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
    import torch

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


def lightning_parts(path: Path, kind: str, keys: tuple[str, ...] = ("config",)) -> tuple[dict, dict]:
    """``(hyper_parameters, state_dict)`` of a Lightning checkpoint written by a diffgen task.

    Args:
        path: the ``.ckpt`` file.
        kind: task name for messages ("generator", "regressor", "dynamics").
        keys: hyperparameters that must be present.

    Raises:
        DiffgenError: unreadable file, no ``hyper_parameters``/``state_dict`` dicts, a missing key in ``keys``, or a
            ``config`` that is not a mapping.
    """
    ckpt = read_lightning(path)
    hp, state = ckpt.get("hyper_parameters"), ckpt.get("state_dict")
    if not isinstance(hp, dict) or not isinstance(state, dict):
        raise DiffgenError(f"{path} is not a diffgen {kind} checkpoint (no hyper_parameters/state_dict)")
    missing = [k for k in keys if k not in hp]
    if missing:
        raise DiffgenError(f"{path} is not a diffgen {kind} checkpoint (missing hyperparameter {missing[0]!r})")
    if "config" in keys and not isinstance(hp["config"], dict):
        raise DiffgenError(f"{path}: its config is not a mapping ({type(hp['config']).__name__})")
    return hp, state


def read_safetensors(path: Path, formats: str | tuple[str, ...], kind: str,
                     ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file whose metadata ``format`` is one of ``formats``.

    Raises:
        DiffgenError: unreadable file, or another format (the message names ``kind``, e.g. "generator").
    """
    from safetensors import safe_open

    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001
        raise DiffgenError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if meta.get("format") not in formats:
        raise DiffgenError(f"{path} is not a diffgen {kind} checkpoint (metadata format {meta.get('format')!r})")
    return meta, state


def metadata_json(meta: dict[str, str], key: str, path: Path, expect: type | tuple[type, ...] | None = None) -> Any:
    """The JSON value stored under ``key`` in safetensors metadata.

    Args:
        expect: required Python type(s) of the decoded value (e.g. ``dict`` for a config, ``list`` for a histogram).

    Raises:
        DiffgenError: ``key`` missing, not valid JSON, or of another type than ``expect``.
    """
    if key not in meta:
        raise DiffgenError(f"{path}: metadata entry {key!r} is missing")
    try:
        value = json.loads(meta[key])
    except (TypeError, ValueError) as exc:
        raise DiffgenError(f"{path}: metadata entry {key!r} is not valid JSON ({first_line(exc)})") from None
    if expect is not None and not isinstance(value, expect):
        raise DiffgenError(f"{path}: metadata entry {key!r} is a {type(value).__name__}, not the expected type")
    return value


def stored_config(build: Callable[[dict], T], values: dict, path: Path) -> T:
    """The typed config ``build(values)`` of a stored (checkpoint) config.

    Raises:
        DiffgenError: the config does not validate (unknown key, wrong type, bad value); the message names the file.
    """
    try:
        return build(values)
    except DiffgenError as exc:
        raise DiffgenError(f"{path}: invalid stored config: {exc}") from None


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strictly load ``state`` into ``module``, each tensor converted to the dtype of the module's own entry
    (fp16/bf16 exports come back in the module's dtype; float64 buffers such as target statistics stay float64).

    Raises:
        DiffgenError: missing, unexpected or wrongly shaped weights ("does not match its config").
    """
    own = module.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DiffgenError(f"checkpoint {path} does not match its config: {first_line(exc)}") from None


def export_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype,
                   keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """CPU copies of ``state`` for an export: floating-point tensors in ``dtype`` except the names in ``keep``."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = v.to(dtype) if v.is_floating_point() and k not in keep else v
    return out


def average_states(states: list[dict[str, torch.Tensor]], paths: list[Path]) -> dict[str, torch.Tensor]:
    """Uniform mean of several state dicts of one network (checkpoint averaging: Polyak & Juditsky 1992; over the
    weights of one run, Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization").

    Floating-point tensors are averaged and returned in float32 (float64 ones in float64), whatever their stored
    dtype, so the order of the states never changes the result; other tensors (integer buffers) must be equal in all
    states and are taken from the first.

    Args:
        states: the state dicts (at least one), all with the same keys and shapes.
        paths: the file each state came from (for the error messages), same length as ``states``.

    Raises:
        DiffgenError: a state with other keys, another shape or a differing non-floating tensor than the first.
        ValueError: ``states`` is empty or ``paths`` has another length.
    """
    import torch

    if not states or len(paths) != len(states):
        raise ValueError(f"average_states needs one path per state ({len(states)} states, {len(paths)} paths)")
    first, first_path = states[0], paths[0]
    for state, path in zip(states[1:], paths[1:], strict=True):
        if state.keys() != first.keys():
            diff = sorted(set(state) ^ set(first))
            raise DiffgenError(f"cannot average {path} with {first_path}: different weights ({', '.join(diff[:3])})")
        for k, v in state.items():
            if v.shape != first[k].shape:
                raise DiffgenError(f"cannot average {path} with {first_path}: {k} has shape {tuple(v.shape)}, "
                                   f"not {tuple(first[k].shape)}")
            if not v.is_floating_point() and not torch.equal(v, first[k]):
                raise DiffgenError(f"cannot average {path} with {first_path}: {k} differs")
    out = {}
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        out[k] = sum(s[k].detach().to(acc) for s in states) / len(states)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], out_path: Path) -> Path:
    """Write ``tensors`` with string metadata atomically (temporary file, then rename). No overwrite check: callers
    run :func:`check_writable` first."""
    from safetensors.torch import save_file

    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, out_path)
    return out_path


def write_text(text: str, out_path: Path) -> Path:
    """Write ``text`` atomically (temporary file, then rename)."""
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_path)
    return out_path

