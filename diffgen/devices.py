"""Torch devices named by users (``--device`` of the CLI, ``device=`` of the Python API), checked before any work."""
from __future__ import annotations

from diffgen.errors import DiffgenError


def check_device(device: str, option: str = "--device") -> str:
    """A torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    Args:
        device: the name given.
        option: how the message names the setting (``--device`` on the command line, ``device=`` in Python).

    Raises:
        DiffgenError: unknown device name, or a device this machine does not have.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DiffgenError(f"unknown {option} {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffgenError(f"{option} {device} requested but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffgenError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DiffgenError(f"{option} {device} requested but MPS is not available on this machine")
        return device
    raise DiffgenError(f"unsupported {option} {device!r}: use cpu, cuda, cuda:N or mps")
