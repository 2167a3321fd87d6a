"""The one BCQ matmul op and how it picks a backend.

`unibcq::bcq_matmul` is declared once with `torch.library`, so it is a single opaque node
under torch.compile and every backend shares its signature:

    bcq_matmul(x, planes, alpha, offset, in_features, group_size, backend) -> x @ W^T

Backends: "reference" (dequantize + dense matmul, any device and batch; the dequantize is
`cpu_bitplane`'s compiled one on the CPU and `triton_bcq`'s on a GPU, value for value the
same as the torch `kernels.reference` ground truth the tests compare every backend with), "bitplane" (the
CPU bit-plane GEMV of `cpu_bitplane`, for few rows) and "triton" (`triton_bcq`: a bit-plane GEMV
for few rows and a dequantize-in-tile GEMM for more; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1). "auto" takes the bit-plane GEMV on the CPU and the Triton GEMV on a GPU
when the input has at most `cpu_bitplane.gemv_max_rows` rows (4 with AVX-512; without it 3,
2 or 1 at 2, 3 or 4 bits) or `triton_bcq.GEMV_MAX_ROWS` rows, and the reference path
otherwise: large batches are compute-bound, where BLAS wins. The Triton GEMM
stays opt-in: on an H200 (2026-11-27, docs/BENCHMARKS.md) it ran 9x slower than cuBLAS at
64 rows, and at prefill sizes it has not been timed. The choice can be forced per process
with the environment variable UNIBCQ_BACKEND. Should a Triton kernel that `auto` chose fail
(a Triton or driver it was not built for), one warning says so and the reference path, which
computes the same values, takes over for the rest of the process; forced, the error stands.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor
from unibcq.kernels import cpu_bitplane

BACKENDS = ("auto", "reference", "bitplane", "triton")


def _triton() -> ModuleType | None:
    """The Triton kernels module, imported on first use (importing triton takes a while)."""
    try:
        module = importlib.import_module("unibcq.kernels.triton_bcq")
    except ImportError:  # pragma: no cover - the module itself guards the triton import
        return None
    return module if module.AVAILABLE else None


# The first error a Triton kernel raised when `auto` chose it (it is never chosen again in
# this process); None while it has not failed.
_triton_failure: str | None = None


def _requested(backend: str) -> str:
    """The backend asked for: the argument, or UNIBCQ_BACKEND where the argument is "auto"."""
    if backend not in BACKENDS:
        raise UnibcqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("UNIBCQ_BACKEND", "auto")
        if backend not in BACKENDS:
            raise UnibcqError(f"UNIBCQ_BACKEND={backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _give_up_on_triton(error: Exception) -> None:
    """Stop `auto` choosing Triton after it failed (a Triton or driver this code was not
    compiled against, say), saying so once: the reference path computes the same values."""
    global _triton_failure
    if _triton_failure is None:
        _triton_failure = f"{type(error).__name__}: {error}"
        warnings.warn(f"unibcq: the Triton kernel failed ({_triton_failure.splitlines()[0][:300]}); using the "
                      "reference backend from now on. UNIBCQ_BACKEND=triton shows the whole error.", RuntimeWarning,
                      stacklevel=3)


def _unless_triton_fails(call: Callable[[], torch.Tensor], forced: bool) -> torch.Tensor | None:
    """call()'s result, or None once a Triton kernel failed under `auto` (see `_give_up_on_triton`;
    the caller then takes the torch path, which computes the same values). Out of memory is
    the memory, not Triton, and a forced backend keeps its error: both raise."""
    try:
        return call()
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any Triton failure: a Triton or driver it was not built for
        if forced:
            raise
        _give_up_on_triton(error)
        return None


def choose_backend(x: torch.Tensor, in_features: int, group_size: int, backend: str = "auto",
                   bits: int | None = None) -> str:
    """Which backend runs a call with these inputs (see the module docstring); `bits`, the
    weight's planes, refines the CPU GEMV's row bound (None takes the bound every width meets)."""
    backend = _requested(backend)
    rows = x.numel() // max(x.shape[-1], 1)
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        kernels = _triton()
        triton_ok = kernels is not None and kernels.usable(x) and not x.requires_grad
        if backend == "triton" and not triton_ok:
            raise UnibcqError("the triton backend needs triton, an input without grad, and a CUDA input "
                              "(or TRITON_INTERPRET=1 for CPU)")
        if backend == "triton":
            return backend
        return "triton" if triton_ok and _triton_failure is None and rows <= kernels.GEMV_MAX_ROWS else "reference"
    gemv_ok = x.device.type == "cpu" and cpu_bitplane.supports(in_features, group_size) and not x.requires_grad
    if backend == "bitplane" and not gemv_ok:
        raise UnibcqError("the bitplane backend needs a CPU input without grad, numba, and byte-aligned groups")
    if backend == "auto":
        return "bitplane" if gemv_ok and rows <= cpu_bitplane.gemv_max_rows(bits) else "reference"
    return backend


_WORKSPACE = threading.local()
WORKSPACE_MAX_BYTES = 256 * 2**20


def _workspace(shape: tuple[int, int]) -> torch.Tensor | None:
    """A per-thread float32 scratch matrix of `shape`, reusing (and growing) one buffer.

    The reference path's dense weight lives only for one matmul; refilling the same pages
    avoids a fresh allocation's page faults (~25 ms for a 4096x4096 fp32 matrix, ten times
    the dequantize). It holds the largest layer seen by this thread in fp32, up to
    WORKSPACE_MAX_BYTES; larger layers (None) get a fresh matrix each call.
    """
    numel = shape[0] * shape[1]
    if numel * 4 > WORKSPACE_MAX_BYTES:
        return None
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACE.buffer = torch.empty(numel, dtype=torch.float32)
    return buffer[:numel].view(shape)


def dequantize_weight(weight, dtype: torch.dtype = torch.float32, scratch: bool = False) -> torch.Tensor:
    """The dense weight of any packed tensor; BCQ through a compiled kernel on the CPU and on a GPU.

    Same values as `weight.dequantize(dtype)` (the tests check equality), several times
    faster for BCQ layers (on the CPU, those with byte-aligned groups), which is what the
    reference backend and dense evaluation spend their time on. With `scratch` a CPU result
    may live in this thread's workspace (see `_workspace`): valid only until the next
    scratch call.
    """
    if isinstance(weight, BCQTensor):
        if weight.planes.device.type == "cpu" and cpu_bitplane.supports(weight.shape[1], weight.group_size):
            dense = cpu_bitplane.dequantize(weight.planes, weight.alpha, weight.offset, weight.shape[1],
                                            weight.group_size, out=_workspace(weight.shape) if scratch else None)
            return dense.to(dtype)
        if weight.planes.is_cuda and _triton_failure is None and (kernels := _triton()) is not None:
            dense = _unless_triton_fails(lambda: kernels.dequantize_triton(
                weight.planes, weight.alpha, weight.offset, weight.shape[1], weight.group_size, dtype),
                forced=_requested("auto") == "triton")
            if dense is not None:
                return dense
    return weight.dequantize(dtype)


def _bcq_matmul_eager(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
                     in_features: int, group_size: int, backend: str = "auto") -> torch.Tensor:
    """`bcq_matmul`'s computation, callable without the op (see `bcq_linear`)."""
    out_features = planes.shape[1]
    chosen = choose_backend(x, in_features, group_size, backend, bits=planes.shape[0])
    if chosen == "bitplane":
        y = cpu_bitplane.bitplane_linear(x.reshape(-1, in_features), planes, alpha, offset, in_features, group_size)
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
    if chosen == "triton":
        y = _unless_triton_fails(lambda: _triton().bcq_matmul_triton(
            x.reshape(-1, in_features), planes, alpha, offset, in_features, group_size),
            forced=_requested(backend) == "triton")
        if y is not None:
            return y.reshape(*x.shape[:-1], out_features)  # already in x's dtype
    weight = BCQTensor(planes, alpha, offset, (out_features, in_features), group_size)
    return F.linear(x, dequantize_weight(weight, x.dtype, scratch=True))


@torch.library.custom_op("unibcq::bcq_matmul", mutates_args=())
def bcq_matmul(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
               in_features: int, group_size: int, backend: str = "auto") -> torch.Tensor:
    """x (..., in) @ W^T for the packed BCQ weight W; the result has x's dtype."""
    return _bcq_matmul_eager(x, planes, alpha, offset, in_features, group_size, backend)


@bcq_matmul.register_fake
def _(x, planes, alpha, offset, in_features, group_size, backend="auto"):
    return x.new_empty(*x.shape[:-1], planes.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    _, planes, alpha, offset, in_features, group_size, _ = inputs
    ctx.save_for_backward(planes, alpha, offset)
    ctx.layout = (in_features, group_size)


def _backward(ctx, grad):
    """Gradient for the input only (packed weights are frozen): grad @ W. Under torch.compile
    the backward formula is traced, not opaque, so W comes from torch's own dequantization
    there: the compiled kernel reads data pointers that fake tensors do not have."""
    planes, alpha, offset = ctx.saved_tensors
    in_features, group_size = ctx.layout
    packed = BCQTensor(planes, alpha, offset, (planes.shape[1], in_features), group_size)
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor
    weight = packed.dequantize(grad.dtype) if traced else dequantize_weight(packed, grad.dtype)
    return grad @ weight, None, None, None, None, None, None


bcq_matmul.register_autograd(_backward, setup_context=_setup_context)


def _needs_the_op(x: torch.Tensor) -> bool:
    """Whether a BCQ matmul on `x` must go through the registered op rather than its body:
    whenever anything watches or transforms the call. That is torch.compile and torch.jit.trace
    (one opaque node), tensor subclasses such as fake tensors (the fake kernel), functorch
    transforms (vmap, grad) and active dispatch modes (which must see the op), and a gradient
    due to `x` (the autograd formula). Plain eager inference calls the body directly: the op's
    Python dispatch cost ~60 us a call on a Zen 3, as much as a SmolLM2 layer's GEMV, 210 times
    per decoded token (docs/BENCHMARKS.md)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not torch.Tensor
            or torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._len_torch_dispatch_stack() > 0
            or (x.requires_grad and torch.is_grad_enabled()))


def _has_tangent(x: torch.Tensor) -> bool:
    """Whether `x` carries a forward-mode AD tangent. A custom op has no forward-mode formula
    (torch.library registers backward only), and through it the tangent would silently vanish."""
    return type(x) is torch.Tensor and forward_ad.unpack_dual(x).tangent is not None


def bcq_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """y = x W^T + b for any packed weight: BCQ through `bcq_matmul` (its body, directly, in plain
    eager inference: see `_needs_the_op`), other formats by dequantizing. An input carrying a
    forward-mode tangent (forward_ad, torch.func.jvp) takes the dense product of torch's own
    dequantization, whose every op has a forward formula: the custom op has none, and the
    compiled kernels hand torch arrays it cannot trace."""
    if _has_tangent(x):
        y = F.linear(x, weight.dequantize(x.dtype))
    elif isinstance(weight, BCQTensor):
        matmul = bcq_matmul if _needs_the_op(x) else _bcq_matmul_eager
        y = matmul(x, weight.planes, weight.alpha, weight.offset, weight.shape[1], weight.group_size, backend)
    else:
        y = F.linear(x, dequantize_weight(weight, x.dtype))
    return y + bias.to(y.dtype) if bias is not None else y
