"""The compute device a user names, checked before any model loads."""

from __future__ import annotations

import torch

from unibcq.errors import UnibcqError


def check_device(name: str | torch.device) -> torch.device:
    """`name` (cpu, cuda or cuda:N) as a torch device, or one clear error: torch's own for a
    CUDA device on a machine without one is an AssertionError deep inside the first copy."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UnibcqError(f"--device takes cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cpu" and device.index is None:
        return device
    if device.type != "cuda":
        raise UnibcqError(f"--device {name}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UnibcqError(f"--device {name} requested but no CUDA GPU is available; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UnibcqError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
