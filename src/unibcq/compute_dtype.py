"""The dtype a model computes in, chosen by name on the command line, and the one pitfall of
half precision on a CPU."""

from __future__ import annotations

import sys

import torch
from torch import nn

from unibcq.errors import UnibcqError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str, flag: str) -> torch.dtype:
    """The torch dtype for a dtype name given with `flag`, or an error listing the choices."""
    if name not in COMPUTE_DTYPES:
        raise UnibcqError(f"{flag} must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def note_slow_cpu_dtype(model: nn.Module, dtype: torch.dtype, flag: str) -> None:
    """Say so before half precision crawls: on a CPU without AVX-512, torch's bfloat16 and
    float16 linear layers ran 7-10x slower than float32 (Zen 3, AVX2, one thread, 2026-12-07,
    docs/BENCHMARKS.md), while with AVX512-BF16 bfloat16 was the faster one."""
    param = next(iter(model.parameters()), None)
    on_cpu = param is None or param.device.type == "cpu"
    capability = torch.backends.cpu.get_cpu_capability()
    if on_cpu and dtype != torch.float32 and capability != "AVX512":
        print(f"unibcq: note: this CPU has no AVX-512 ({capability}); {str(dtype).removeprefix('torch.')} "
              f"runs several times slower here than {flag} float32", file=sys.stderr)
