"""Memory a model really holds, the process's resident memory, what is still available,
and the --max-memory budget enforced while a run goes (`MemoryCap`).

`model_memory_bytes` counts what the tensors occupy as stored (a packed BCQ layer's uint8
planes and fp16 scales, not the dense matrix they stand for), so a 3-bit checkpoint
reports a fraction of its full-precision model. Process RSS is measured next to it
because it also shows what the model count cannot: allocator slack, framework overhead,
and any dense copy a kernel keeps outside the module's parameters and buffers. Available
memory sizes what evaluation may cache and decides the precision of a KL reference.
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from unibcq.errors import UnibcqError

_STATM = Path("/proc/self/statm")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once.

    Counting storages (not tensors) gives tied embeddings and views their true cost once,
    and each tensor its stored dtype. A packed layer's dequantized `dense_cache` (set only
    inside `unibcq.nn.dense_weights`) is counted too while it exists: it is memory the
    model holds, even though it is neither a parameter nor a buffer.
    """
    caches = (m.dense_cache for m in model.modules() if getattr(m, "dense_cache", None) is not None)
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in chain(model.parameters(), model.buffers(), caches):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def resident_memory_bytes() -> int | None:
    """This process's current resident set size (Linux; None where /proc is unavailable)."""
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def cgroup_room(root: Path = _CGROUP) -> int | None:
    """Bytes this process's memory cgroup (a container's limit) still allows; None if unlimited.

    cgroup v2 names the limit `memory.max` ("max" when there is none); v1 `memory.limit_in_bytes`
    under `memory/`, with a huge number for none.
    """
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit, usage = (root / limit_file).read_text().strip(), (root / usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:
            return max(int(limit) - int(usage), 0)
        return None
    return None


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on `device`: free GPU memory, or on a CPU the
    kernel's MemAvailable estimate (free plus reclaimable page cache), lowered to what a
    container's memory limit still allows; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    room = cgroup_room()
    if room is None:
        return available
    return room if available is None else min(available, room)


def peak_resident_bytes() -> int | None:
    """This process's peak resident set size (VmHWM: since it started, or since the last
    `reset_peak_resident`); None where /proc is unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def reset_peak_resident() -> bool:
    """Restart the peak at the current resident size (Linux's clear_refs); False if refused."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class MemoryCapExceeded(UnibcqError):
    """The process's resident memory passed the budget a `MemoryCap` enforces."""


class MemoryCap:
    """A --max-memory budget enforced while a run goes, not only estimated before it.

    `check` is called after every training step and every quantized layer, and raises once
    this process's peak resident memory has passed the budget. The peak (VmHWM) also holds
    what was allocated and freed between two checks, such as a backward pass's activations,
    so nothing escapes; but it stops the run, it cannot refuse the allocation: the step that
    crossed the budget has already run. The whole process counts, loading included; with
    `from_now` (a long Python session that did other work first) the peak restarts here.
    """

    def __init__(self, limit_bytes: int, from_now: bool = False) -> None:
        self.limit_bytes = limit_bytes
        if from_now:
            reset_peak_resident()

    def check(self, where: str) -> None:
        peak = peak_resident_bytes()
        if peak is not None and peak > self.limit_bytes:
            raise MemoryCapExceeded(f"resident memory reached {peak / 2**20:.0f} MiB in {where}, past the "
                                    f"--max-memory budget of {self.limit_bytes / 2**20:.0f} MiB")
