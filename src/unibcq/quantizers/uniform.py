"""Round-to-nearest uniform quantization (RTN), stored exactly as BCQ.

An n-bit asymmetric grid s * (q - z), q in 0..2^n - 1, equals BCQ with
alpha = s * (2^(n-2), ..., 1, 1/2) and offset s * ((2^n - 1) / 2 - z): writing
q = sum_j 2^j t_j with t_j in {0, 1} and b_j = 2 t_j - 1 gives q - c = sum_j 2^(j-1) b_j.

The identity is exact; storage is exact up to fp16 rounding of the offset. The alphas are
the fp16 scale times powers of two (exact), but s * (c - z) needs more significant bits than
fp16 keeps, so the stored grid is shifted from s * (q - z) by up to 2^-11 of the offset:
measured on 0.02-scale Gaussian rows of 128, at most 6e-4 of a grid step at 3 bits, 1.2e-3
at 4 bits and 2e-2 at 8 bits (2 bits: none), far below the rounding error itself.
"""

from __future__ import annotations

import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import MAX_BITS, MIN_BITS, STORAGE_DTYPE, BCQTensor
from unibcq.quantizers.grouping import GroupCodes, quantize_by_groups

# Smallest fp16 normal: scales below it would lose precision once stored.
MIN_SCALE = 2.0**-14


def check_bits(bits: int, low: int = MIN_BITS, high: int = MAX_BITS) -> None:
    """Reject bit widths a quantizer does not support."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise UnibcqError(f"bits must be an integer in {low}..{high}, got {bits!r}")


def minmax_params(
    x: torch.Tensor, bits: int, symmetric: bool, ratio: float | torch.Tensor = 1.0, integer_zero: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero point) of the min-max grid, range shrunk by `ratio`.

    integer_zero=True (default) is GPTQ's quantizer: the range is widened to contain 0 and
    the zero point rounded to an integer, so 0 is exactly a grid level. integer_zero=False
    keeps a real-valued zero point and the exact [min, max] range (the BCQ offset is fp16
    anyway). Measured on SmolLM2-135M (docs/BENCHMARKS.md), the real-valued zero point is much
    worse (w4 per-channel perplexity 82.9 vs 49.4): without an exact 0 level every near-zero
    weight of a row is pushed the same way, a systematic per-row bias in the layer output.
    Scales are rounded to fp16, as stored.
    """
    maxq = 2**bits - 1
    xmin, xmax = x.min(dim=1).values, x.max(dim=1).values
    # Integer zero points need 0 on the grid; a (near-)constant group needs it too, or its
    # tiny step would leave the fp16 offset's rounding as the whole error.
    degenerate = (xmax - xmin) <= 2.0**-10 * torch.maximum(xmin.abs(), xmax.abs())
    widen = torch.ones_like(degenerate) if (integer_zero or symmetric) else degenerate
    xmin = torch.where(widen, xmin.clamp(max=0), xmin)
    xmax = torch.where(widen, xmax.clamp(min=0), xmax)
    xmin, xmax = xmin * ratio, xmax * ratio
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    if integer_zero or symmetric:
        # An all-zero group would get a zero scale; any grid through 0 reproduces it.
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=MIN_SCALE).to(STORAGE_DTYPE).float()
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    elif integer_zero:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    else:
        zero = -xmin / scale
    return scale, zero


def quantize_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q in 0..2^n - 1 of the nearest grid point (rows of x share scale/zero)."""
    return torch.clamp(torch.round(x / scale[:, None] + zero[:, None]), 0, 2**bits - 1)


def lp_error(x: torch.Tensor, x_hat: torch.Tensor, p: float) -> torch.Tensor:
    """Per-row sum |x - x_hat|^p, the clipping-search criterion."""
    return (x - x_hat).abs().pow(p).sum(dim=1)


def search_clipping(
    x: torch.Tensor, bits: int, symmetric: bool, p: float = 2.4, grid: int = 100, max_shrink: float = 0.8,
    integer_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row best (scale, zero) over ratios 1, 1 - 1/grid, ... down to 1 - max_shrink.

    Shrinking the range clips outliers but refines the grid for the bulk of the weights;
    the Lp error with p = 2.4 (as in GPTQ's search) weighs large errors a bit more than MSE.
    """
    best_scale, best_zero = minmax_params(x, bits, symmetric, integer_zero=integer_zero)
    best_err = lp_error(x, dequantize_grid(quantize_to_grid(x, best_scale, best_zero, bits), best_scale, best_zero), p)
    for i in range(1, int(max_shrink * grid) + 1):
        scale, zero = minmax_params(x, bits, symmetric, 1 - i / grid, integer_zero)
        err = lp_error(x, dequantize_grid(quantize_to_grid(x, scale, zero, bits), scale, zero), p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def dequantize_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale[:, None] * (q - zero[:, None])


def uniform_to_bcq(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> GroupCodes:
    """BCQ form of uniform codes (exact in float32): plane j is bit j of q, alpha_j = s * 2^(j-1)."""
    q = q.to(torch.int64)
    signs = torch.stack([((q >> j) & 1).bool() for j in range(bits)], dim=-1)
    powers = 2.0 ** (torch.arange(bits, dtype=torch.float32, device=q.device) - 1)
    alpha = scale[:, None] * powers
    offset = scale * ((2**bits - 1) / 2 - zero)
    return GroupCodes(signs=signs, alpha=alpha, offset=offset)


def rtn_groups(
    x: torch.Tensor, bits: int, symmetric: bool = False, clip_search: bool = False, p: float = 2.4,
    integer_zero: bool = True,
) -> GroupCodes:
    """RTN on a group matrix (R, g), returned in BCQ form."""
    if clip_search:
        scale, zero = search_clipping(x, bits, symmetric, p, integer_zero=integer_zero)
    else:
        scale, zero = minmax_params(x, bits, symmetric, integer_zero=integer_zero)
    return uniform_to_bcq(quantize_to_grid(x, scale, zero, bits), scale, zero, bits)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int = 128,
    symmetric: bool = False,
    clip_search: bool = False,
    p: float = 2.4,
    integer_zero: bool = True,
) -> BCQTensor:
    """Round-to-nearest uniform quantization of one weight matrix, in the packed BCQ format."""
    check_bits(bits)
    return quantize_by_groups(
        weight, group_size, lambda x: rtn_groups(x, bits, symmetric, clip_search, p, integer_zero)
    )
