"""The one device rule of both stages: what ``auto`` means, and which requests are refused before any work starts."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from manifests.errors import InputError

if TYPE_CHECKING:
    import torch


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity where the OS tells it (a container's or a scheduler's share),
    else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


DEVICE_HELP = "auto (the GPU when there is one, else cpu) | cpu | cuda | cuda:N"


def resolve_device(requested: str = "auto", *, source: str = "--device") -> torch.device:
    """The torch device for a request.

    ``auto`` is CUDA when it is available, else the CPU; under ``torchrun`` it is this process's GPU
    (``LOCAL_RANK``), so each rank of a DDP run gets its own. Any other string is taken as a torch device name.

    Args:
        requested: ``auto``, or a torch device name such as ``cpu``, ``cuda``, ``cuda:1``.
        source: where the request came from (an option or a manifest key), named in the error.

    Returns:
        The device.

    Raises:
        InputError: a string that names no device, or a CUDA device this machine does not have.
    """
    # torch is imported here, not at the top: manifests is the light contracts package every command imports.
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{source}: '{requested}' is not a device (expected {DEVICE_HELP})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{source}: '{requested}' asked for, but CUDA is not available on this machine; use auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InputError(f"{source}: '{requested}' asked for, but this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(
            f"{source}: '{requested}' asked for, but MPS is not available on this machine; use auto or cpu"
        )
    return device
