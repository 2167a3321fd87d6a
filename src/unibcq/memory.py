"""Memory a model really holds, and the process's resident memory.

`model_memory_bytes` counts what the tensors occupy as stored (a packed BCQ layer's uint8
planes and fp16 scales, not the dense matrix they stand for), so a 3-bit checkpoint
reports a fraction of its full-precision model. Process RSS is measured next to it
because it also shows what the model count cannot: allocator slack, framework overhead,
and any dense copy a kernel keeps outside the module's parameters and buffers.
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path

import torch
from torch import nn

_STATM = Path("/proc/self/statm")
_MEMINFO = Path("/proc/meminfo")


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



def available_memory_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on `device`: free GPU memory, or the kernel's
    MemAvailable estimate (free plus reclaimable page cache) on a CPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None
