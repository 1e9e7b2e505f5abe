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


#: Sampling precisions (``--precision`` of ``diffgen sample``, ``precision=`` of the Python API).
PRECISIONS = ("auto", "fp32", "bf16")
#: ``auto``: bf16 autocast where the device computes bf16 natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs
#: with bf16), fp32 elsewhere; bf16 emulated in software would be slower than fp32.
DEFAULT_PRECISION = "auto"


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bf16 matrix products natively (oneDNN bf16 on CPU, ``is_bf16_supported`` on
    CUDA); other device types: False."""
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def resolve_precision(precision: str, device: str = "cpu", option: str = "--precision") -> str:
    """``fp32`` or ``bf16`` for ``precision`` (one of :data:`PRECISIONS`) on ``device``.

    Raises:
        DiffgenError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise DiffgenError(f"unknown {option} {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: str = "cpu"):
    """A context manager running ``device``'s matrix products in bf16 (``torch.autocast``) when ``precision`` is
    ``bf16``, and doing nothing for ``fp32``. Element-wise sums, norms and the sampler's own arithmetic stay fp32."""
    import torch

    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")
