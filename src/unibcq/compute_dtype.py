"""The dtype a model computes in, chosen by name on the command line, and the one pitfall of
half precision on a CPU.

Torch's bfloat16 and float16 matrix products run 6-10x slower than float32 ones on a CPU
where oneDNN does not take them: bfloat16 without AVX-512, float16 without AVX512-FP16 or
AMX-FP16 (measured on Zen 3, AVX2, one thread, 2026-12-07, docs/BENCHMARKS.md: 9.4-11.2 GFLOP/s
against 69.6-92.8; 98.5% of a bfloat16 forward pass of SmolLM2-135M was `aten::mm`). The
product of two bfloat16 (or float16) numbers is exact in float32 and torch's half-precision
GEMM sums in float32 and rounds once, so a float32 GEMM of the same values, rounded once to
the input's dtype, computes the same product up to the order of the sums (in our checks
99.97-99.99% of bfloat16 outputs and 99.8-99.9% of float16 ones bit-equal, the rest one unit
in the last place). `half_linear_in_float32` runs the large linear layers that way there: a
bfloat16 scoring run of PIQA and ARC-Challenge took 96 s instead of 673 s.

A whole bfloat16 model is another matter: one unit in the last place anywhere grows into
bfloat16's usual noise, so SmolLM2-135M's per-token log-probabilities on WikiText-2 moved by
0.0656 on average between torch's product and this one, as far as either lies from float32
(0.0652 and 0.0655; benchmarks/half_gemm_check.py); the same 150 PIQA and ARC-Challenge questions scored the same but one.
Summation order is no more part of a bfloat16 protocol than the machine is.
Decoding one token at a time keeps torch's product: there converting the weight costs more
than it saves.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from unibcq.errors import UnibcqError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str, flag: str) -> torch.dtype:
    """The torch dtype for a dtype name given with `flag`, or an error listing the choices."""
    if name not in COMPUTE_DTYPES:
        raise UnibcqError(f"{flag} must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


HALF_DTYPES = (torch.bfloat16, torch.float16)
# Below this many input rows (a decode step, a short prompt) converting the weight to float32
# costs more than the slow product saves: at 16 rows SmolLM2's 49152x576 output layer took
# 94 ms either way, small layers break even at 2-4 rows (same machine and day as above).
FLOAT32_GEMM_MIN_ROWS = 32


# Torch's own check of whether oneDNN computes a dtype's CPU GEMMs (the fast path), per dtype.
_ONEDNN_HALF_CHECKS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether torch hands CPU GEMMs in `dtype` (bfloat16 or float16) to oneDNN rather than to its
    slow generic loop. Asked per dtype because CPUs differ: by torch's rule oneDNN takes bfloat16
    on any AVX-512 core but float16 only with AVX512-FP16 or AMX-FP16, so a Zen 4 has the fast
    bfloat16 GEMM and the slow float16 one. Torch's own device check answers where this torch
    has it; otherwise an AVX-512 capability stands in for it."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, _ONEDNN_HALF_CHECKS[dtype])())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


def slow_half_matmul(model: nn.Module, dtype: torch.dtype | None = None) -> bool:
    """Whether `model` computes in half precision (`dtype`, by default its floating-point
    parameters') on a CPU whose torch GEMM in that dtype is the slow one."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32
    on_cpu = param is None or param.device.type == "cpu"
    return on_cpu and dtype in HALF_DTYPES and not native_half_gemm(dtype)


class _Float32Linear(TorchFunctionMode):
    """Computes `F.linear` on CPU half-precision inputs of at least FLOAT32_GEMM_MIN_ROWS rows as
    a float32 GEMM of the same values, rounded once to the input dtype (see the module docstring).
    Operands of mixed dtypes are left to torch, which refuses them."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.dtype in HALF_DTYPES and x.device.type == "cpu" and x.dim() > 0 and weight.dtype == x.dtype
                    and (bias is None or bias.dtype == x.dtype)
                    and x.numel() // max(x.shape[-1], 1) >= FLOAT32_GEMM_MIN_ROWS):
                wide_bias = bias.float() if bias is not None else None
                return F.linear(x.float(), weight.float(), wide_bias).to(x.dtype)
        return func(*args, **kwargs)


def _token_rows(args: tuple, kwargs: dict[str, Any]) -> int:
    """Token positions in one call of a causal LM (its input_ids, or its inputs_embeds)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() > 0:
        return embeds.numel() // max(embeds.shape[-1], 1)
    return 0


@contextmanager
def half_linear_in_float32(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[None]:
    """While `model` runs in bfloat16 or float16 (`dtype`, by default its floating-point
    parameters') on a CPU without oneDNN GEMMs in that dtype (`native_half_gemm`), compute the
    linear layers of its calls on at least FLOAT32_GEMM_MIN_ROWS token positions (a scoring
    batch, a perplexity window, a long prompt) as float32 GEMMs of the same values: 7x faster
    task scoring there, the same products up to the order of the sums. Anywhere else, and for
    decode steps, this does nothing: the mode is entered per call of `model`, since a mode
    intercepting every torch call of a one-token step cost that step 18%."""
    if not slow_half_matmul(model, dtype):
        yield
        return
    entered: list[_Float32Linear | None] = []

    def enter(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mode = _Float32Linear() if _token_rows(args, kwargs) >= FLOAT32_GEMM_MIN_ROWS else None
        if mode is not None:
            mode.__enter__()
        entered.append(mode)

    def leave(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        mode = entered.pop() if entered else None
        if mode is not None:
            mode.__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(enter, with_kwargs=True),
             model.register_forward_hook(leave, with_kwargs=True, always_call=True)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
