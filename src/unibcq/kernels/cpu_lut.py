"""CPU lookup-table GEMV for packed BCQ weights (LUT-GEMM's idea, compiled with numba).

With signs s = 2 * bit - 1, one row's output is

    y[r] = sum_g [ offset[r, g] * X_g + sum_b alpha[r, g, b] * (2 * P_{r,g,b} - X_g) ]

where X_g is the sum of x over group g and P_{r,g,b} the sum of x over the columns whose bit
in plane b is set. P is read from a table instead of computed: for every 8-column chunk k,
T[k, v] = sum of x[8k + j] over the set bits j of the byte v (256 entries, built once per
input vector with 255 additions). Each packed byte of each plane is then one table lookup,
so the kernel reads ~bits/8 bytes per weight and never materialises the dense matrix.
This pays off for a few input rows (decode); for larger batches the dense matmul is
compute-bound and the reference path (dequantize + BLAS) wins, which the dispatcher uses.

Groups must start on byte boundaries (group size a multiple of 8, or per-channel); other
layouts go to the reference path. The fp16 scales are converted to float32 once per weight
and cached (weakly keyed by the stored tensor, invalidated when it is modified in place):
converting them on every call cost more than the GEMV itself. The cache adds 2 bytes per
stored scale, e.g. 0.75 bits per weight at 3 bits, group 128.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from unibcq.formats.bcq import effective_group_size

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a declared dependency; keep the reference path usable
    numba = None

AVAILABLE = numba is not None
if AVAILABLE:
    # numba's own thread pool, not OpenMP: the OpenMP layer shares libgomp with torch and
    # resets torch's intra-op thread count on its first parallel call.
    numba.config.THREADING_LAYER = "workqueue"


def supports(in_features: int, group_size: int) -> bool:
    """Whether the LUT kernel handles this layout (groups aligned to packed bytes)."""
    return AVAILABLE and (group_size == -1 or group_size >= in_features or group_size % 8 == 0)


if AVAILABLE:

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _tables(x: np.ndarray, chunks: int) -> np.ndarray:
        """T[b, k, v]: sum of x[b, 8k + j] over the set bits j of v (x zero-padded to 8 * chunks)."""
        batch = x.shape[0]
        in_features = x.shape[1]
        table = np.zeros((batch, chunks, 256), dtype=np.float32)
        for idx in prange(batch * chunks):
            b = idx // chunks
            k = idx % chunks
            for j in range(8):
                col = 8 * k + j
                value = x[b, col] if col < in_features else np.float32(0.0)
                step = 1 << j
                for v in range(step):
                    table[b, k, step + v] = table[b, k, v] + value
        return table

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _lut_gemv(table: np.ndarray, planes: np.ndarray, alpha: np.ndarray, offset: np.ndarray,
                  group_sums: np.ndarray, bytes_per_group: int, has_offset: bool) -> np.ndarray:
        batch, chunks = table.shape[0], table.shape[1]
        bits, rows = planes.shape[0], planes.shape[1]
        groups = alpha.shape[1]
        out = np.empty((batch, rows), dtype=np.float32)
        for r in prange(rows):
            for b in range(batch):
                acc = np.float32(0.0)
                for g in range(groups):
                    k0 = g * bytes_per_group
                    k1 = min(k0 + bytes_per_group, chunks)
                    xs = group_sums[b, g]
                    if has_offset:
                        acc += offset[r, g] * xs
                    for i in range(bits):
                        p = np.float32(0.0)
                        for k in range(k0, k1):
                            p += table[b, k, planes[i, r, k]]
                        acc += alpha[r, g, i] * (np.float32(2.0) * p - xs)
                out[b, r] = acc
        return out


    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _dequantize(planes: np.ndarray, alpha: np.ndarray, offset: np.ndarray, has_offset: bool,
                    bytes_per_group: int, in_features: int) -> np.ndarray:
        """Dense (rows, in) float32: each group's 2^bits levels, indexed by the codes of each column."""
        bits, rows, chunks = planes.shape
        groups = alpha.shape[1]
        out = np.empty((rows, in_features), dtype=np.float32)
        for r in prange(rows):
            levels = np.empty(1 << bits, dtype=np.float32)
            for g in range(groups):
                for code in range(1 << bits):
                    value = offset[r, g] if has_offset else np.float32(0.0)
                    for i in range(bits):
                        value += alpha[r, g, i] if (code >> i) & 1 else -alpha[r, g, i]
                    levels[code] = value
                k1 = min((g + 1) * bytes_per_group, chunks)
                for k in range(g * bytes_per_group, k1):
                    for j in range(min(8, in_features - 8 * k)):
                        code = 0
                        for i in range(bits):
                            code |= ((planes[i, r, k] >> j) & 1) << i
                        out[r, 8 * k + j] = levels[code]
        return out


_FLOAT32_CACHE: dict[int, tuple[weakref.ref, int, np.ndarray]] = {}


def _float32(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` as a contiguous float32 array, converted once per stored version."""
    key = id(tensor)
    cached = _FLOAT32_CACHE.get(key)
    if cached is None or cached[0]() is not tensor or cached[1] != tensor._version:
        ref = weakref.ref(tensor, lambda _, key=key: _FLOAT32_CACHE.pop(key, None))
        cached = (ref, tensor._version, tensor.detach().float().contiguous().numpy())
        _FLOAT32_CACHE[key] = cached
    return cached[2]


def _prepare(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None, in_features: int,
             group_size: int, what: str) -> tuple[int, int, np.ndarray, np.ndarray]:
    """What both kernels need: (columns per group, packed bytes per group, fp32 alpha, fp32 offset).

    Also sizes numba's pool to torch's thread count, so a kernel never uses more threads
    than the caller allowed torch.
    """
    if not AVAILABLE:
        raise RuntimeError(f"the {what} needs numba")
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    gs = effective_group_size(in_features, group_size)
    bytes_per_group = gs // 8 if gs % 8 == 0 else planes.shape[-1]  # the latter: one group per row
    offset_np = _float32(offset) if offset is not None else np.zeros((1, 1), dtype=np.float32)
    return gs, bytes_per_group, _float32(alpha), offset_np


def dequantize(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None, in_features: int,
               group_size: int) -> torch.Tensor:
    """The dense float32 weight of a packed BCQ layer (see `BCQTensor.dequantize`), compiled.

    Several times faster than the torch version, which materialises every bit-plane; the
    reference matmul path and dense evaluation go through it on the CPU.
    """
    _, bytes_per_group, alpha_np, offset_np = _prepare(planes, alpha, offset, in_features, group_size,
                                                       "compiled dequantize")
    return torch.from_numpy(_dequantize(planes.contiguous().numpy(), alpha_np, offset_np, offset is not None,
                                        bytes_per_group, in_features))


def lut_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
               in_features: int, group_size: int) -> torch.Tensor:
    """x (B, in) float -> (B, out) float32 through the lookup-table kernel."""
    gs, bytes_per_group, alpha_np, offset_np = _prepare(planes, alpha, offset, in_features, group_size, "LUT kernel")
    groups = alpha.shape[1]
    xf = x.detach().to(torch.float32).contiguous()
    padded = torch.nn.functional.pad(xf, (0, groups * gs - in_features)) if groups * gs > in_features else xf
    group_sums = padded.reshape(xf.shape[0], groups, gs).sum(-1).contiguous()
    table = _tables(xf.numpy(), planes.shape[-1])
    out = _lut_gemv(table, planes.contiguous().numpy(), alpha_np, offset_np, group_sums.numpy(), bytes_per_group,
                    offset is not None)
    return torch.from_numpy(out)
