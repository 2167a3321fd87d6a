"""Triton kernels for packed BCQ weights: a bit-plane GEMV, a dequantize-in-tile GEMM and a
one-pass dequantize.

All read the stored layout directly (uint8 planes (bits, out, ceil(in / 8)), fp16 alpha
(out, groups, bits), fp16 offset (out, groups)). The two matmuls never write a dense
weight to memory; `dequantize_triton` writes one, for the reference backend and the dense
caches of evaluation:

- `gemv` (few input rows, decode): each program owns BLOCK_N output rows, one input row and
  one slice of the input (split-K), decodes the signs of its weight tiles from the planes
  (bits / 8 bytes per weight), scales them by the group's alphas, and accumulates w * x in a
  float32 tile that is reduced once at the end. Batch-1 decode is bound by reading weights,
  so reading ~bits/8 bytes instead of 2 (fp16) is where a speed-up can come from.
- `gemm` (larger batches): a classic tiled matmul whose B tile is decoded the same way in
  registers, then fed to `tl.dot` in the input's dtype with float32 accumulation, also split
  along K.

The first H200 timing (2026-11-27, docs/BENCHMARKS.md) measured the first version of the
GEMV at 20x slower than cuBLAS fp32. Two causes, both fixed since (not yet timed): a
4096-row layer in 64-row tiles was 64 programs, half an H100's SMs, each walking all of K;
and loading planes through one pointer per weight took all 255 registers and spilled. Now
the kernels split K (each split writes float32 partial sums to its own slice of a
(splits, rows, out) buffer, added afterwards, so results do not depend on scheduling: no
atomics), planes are loaded as bytes and spread into bits in registers, and tiles are
sized so that ptxas reports no spills for the GEMV (the fp32 GEMM still spills; see
benchmarks/triton_sm90_compile.py).

A K tile lies inside one quantization group when the group size is a multiple of BLOCK_K
(or the row is one group); then a tile's scales are one load per output row. Other group
sizes (e.g. 20) take the per-element path (`TILE_GROUP=False`), which looks up each
column's group. fp32 inputs use IEEE fp32 `tl.dot` (no TF32), matching the reference.

Triton needs a GPU, except in its interpreter (`TRITON_INTERPRET=1`, set before this
module is imported), which runs the same kernels on CPU tensors; CI tests them that way,
and also compiles them for a Hopper GPU with Triton's compiler and ptxas
(benchmarks/triton_sm90_compile.py, which also prints each variant's registers and spills),
which the interpreter does not exercise.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl
    from triton import knobs
except ImportError:  # triton is optional: the `gpu` extra, or bundled with CUDA builds of torch
    triton = None

AVAILABLE = triton is not None
INTERPRET = AVAILABLE and bool(knobs.runtime.interpret)
GEMV_MAX_ROWS = 8
# Tile shapes and warps. Chosen from ptxas's register report for sm_90 (no GPU timing yet):
# 64 x 64 weight tiles with 4 warps needed all 255 registers and spilled; the GEMV's and the
# 16-bit GEMM's tiles here do not (benchmarks/triton_sm90_compile.py prints the report).
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS = 16, 128, 8
GEMM_BLOCK_N, GEMM_BLOCK_K, GEMM_WARPS, GEMM_STAGES = 64, 64, 8, 2
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 64


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x: a CUDA tensor, or any tensor under the interpreter."""
    return AVAILABLE and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


if AVAILABLE:

    @triton.jit
    def _decode_tile(planes_ptr, alpha_ptr, offset_ptr, rn, k0, N, K, KB, G, gs,
                     BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, TILE_GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The (BLOCK_N, BLOCK_K) float32 weight tile for output rows rn and input columns k0 + 0..BLOCK_K-1.

        Each plane is loaded as its (BLOCK_N, BLOCK_K / 8) bytes and spread into bits in
        registers: a pointer per byte rather than per weight, which keeps the tile's
        address arithmetic from taking most of the registers.
        """
        n_mask = rn < N
        kb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        # int64 row offsets: planes of a 152k-row lm_head at 8 bits pass int32's range
        byte_ptr = planes_ptr + rn.to(tl.int64)[:, None] * KB + kb[None, :]
        plane_stride = tl.cast(N, tl.int64) * KB
        byte_mask = n_mask[:, None] & (kb < KB)[None, :]
        shifts = tl.arange(0, 8).to(tl.uint8)
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if TILE_GROUP:
            group = k0 // gs
            for i in tl.static_range(BITS):
                packed = tl.load(byte_ptr + i * plane_stride, mask=byte_mask, other=0)
                bit = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, BLOCK_K))
                a = tl.load(alpha_ptr + rn * (G * BITS) + group * BITS + i, mask=n_mask, other=0.0).to(tl.float32)
                w += tl.where(bit != 0, a[:, None], -a[:, None])
            if HAS_OFFSET:
                o = tl.load(offset_ptr + rn * G + group, mask=n_mask, other=0.0)
                w += o.to(tl.float32)[:, None]
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            group = (rk // gs)[None, :]
            mask = n_mask[:, None] & (rk < K)[None, :]
            for i in tl.static_range(BITS):
                packed = tl.load(byte_ptr + i * plane_stride, mask=byte_mask, other=0)
                bit = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, BLOCK_K))
                a = tl.load(alpha_ptr + rn[:, None] * (G * BITS) + group * BITS + i, mask=mask, other=0.0)
                w += tl.where(bit != 0, a.to(tl.float32), -a.to(tl.float32))
            if HAS_OFFSET:
                o = tl.load(offset_ptr + rn[:, None] * G + group, mask=mask, other=0.0)
                w += o.to(tl.float32)
        return w

    @triton.jit
    def _gemv_kernel(x_ptr, planes_ptr, alpha_ptr, offset_ptr, part_ptr, rows, N, K, KB, G, gs, stride_x, k_split,
                     BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, TILE_GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row = tl.program_id(2)
        k_begin = split * k_split
        k_end = tl.minimum(k_begin + k_split, K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_x + rk, mask=rk < k_end, other=0.0).to(tl.float32)
            w = _decode_tile(planes_ptr, alpha_ptr, offset_ptr, rn, k0, N, K, KB, G, gs,
                             BITS, HAS_OFFSET, TILE_GROUP, BLOCK_N, BLOCK_K)
            acc += w * x[None, :]
        tl.store(part_ptr + (split * rows + row) * N + rn, tl.sum(acc, axis=1).to(part_ptr.dtype.element_ty),
                 mask=rn < N)

    @triton.jit
    def _gemm_kernel(x_ptr, planes_ptr, alpha_ptr, offset_ptr, part_ptr, M, N, K, KB, G, gs, stride_x, k_split,
                     BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, TILE_GROUP: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        k_begin = split * k_split
        k_end = tl.minimum(k_begin + k_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :],
                        mask=(rm < M)[:, None] & (rk < k_end)[None, :], other=0.0)
            w = _decode_tile(planes_ptr, alpha_ptr, offset_ptr, rn, k0, N, K, KB, G, gs,
                             BITS, HAS_OFFSET, TILE_GROUP, BLOCK_N, BLOCK_K)
            if IEEE:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        out_row = (split * M + rm).to(tl.int64)  # a 152k-wide output of 16k rows passes int32's range
        tl.store(part_ptr + out_row[:, None] * N + rn[None, :], acc.to(part_ptr.dtype.element_ty),
                 mask=mask)


    @triton.jit
    def _dequantize_kernel(planes_ptr, alpha_ptr, offset_ptr, out_ptr, N, K, KB, G, gs,
                           BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, TILE_GROUP: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        w = _decode_tile(planes_ptr, alpha_ptr, offset_ptr, rn, k0, N, K, KB, G, gs,
                         BITS, HAS_OFFSET, TILE_GROUP, BLOCK_N, BLOCK_K)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        # int64 rows: an lm_head of 152k x 16k weights is past int32's range
        tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

def _tile_k(groups: int, group_size: int, largest: int) -> tuple[int, bool]:
    """BLOCK_K (at most `largest`) and whether every K tile lies inside one group (scales loaded once per tile)."""
    if groups == 1:
        return largest, True
    block = largest
    while block >= 16:
        if group_size % block == 0:
            return block, True
        block //= 2
    return 32, False


@functools.cache
def _sm_count(index: int) -> int:
    """The GPU's SM count, asked once per device (each matmul call needs it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep every SM busy: four per SM on a GPU; a small number in the interpreter,
    so that the tests' small layers still take the split-K path."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _split_k(k_tiles: int, programs: int, wanted: int) -> int:
    """Tiles of K per split: enough splits to give `wanted` programs, never an empty split."""
    splits = max(1, min(k_tiles, triton.cdiv(wanted, programs)))
    return triton.cdiv(k_tiles, splits)


def _packed_arguments(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None, in_features: int,
                      group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int]:
    """The kernels' view of a packed weight: contiguous planes and alpha, an offset pointer
    (alpha's where there is none: never read without HAS_OFFSET), whether there is an offset,
    and the group's width in columns (the whole row for one group)."""
    planes, alpha = planes.contiguous(), alpha.contiguous()
    has_offset = offset is not None
    offset = offset.contiguous() if has_offset else alpha
    return planes, alpha, offset, has_offset, in_features if alpha.shape[1] == 1 else group_size


def bcq_matmul_triton(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
                      in_features: int, group_size: int, k_tiles_per_split: int | None = None) -> torch.Tensor:
    """x (rows, in) @ W^T for packed W, by the GEMV kernel for few rows and the GEMM otherwise.

    `k_tiles_per_split` fixes how many BLOCK_K tiles of the input one program sums (the
    default fills the GPU, see `_split_k`); the result is the same up to float rounding.
    """
    if not usable(x):
        raise ValueError("the triton backend needs triton and a CUDA input (or TRITON_INTERPRET=1 on CPU)")
    if k_tiles_per_split is not None and k_tiles_per_split < 1:
        raise ValueError(f"k_tiles_per_split must be at least 1, got {k_tiles_per_split}")
    rows = x.shape[0]
    bits, out_features, row_bytes = planes.shape
    if rows == 0 or out_features == 0 or in_features == 0:  # nothing to launch
        return x.new_zeros(rows, out_features)
    x = x.contiguous()
    planes, alpha, offset, has_offset, gs = _packed_arguments(planes, alpha, offset, in_features, group_size)
    groups = alpha.shape[1]
    gemv = rows <= GEMV_MAX_ROWS
    block_k, tile_group = _tile_k(groups, gs, GEMV_BLOCK_K if gemv else GEMM_BLOCK_K)
    k_tiles = triton.cdiv(in_features, block_k)
    if gemv:
        block_m, block_n = 1, GEMV_BLOCK_N
    else:
        block_m, block_n = (32 if rows <= 64 else 64), GEMM_BLOCK_N
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
    per_split = k_tiles_per_split or _split_k(k_tiles, tiles, _programs_wanted(x.device))
    splits = triton.cdiv(k_tiles, per_split)
    k_split = per_split * block_k
    # One split writes the result itself; several write float32 partial sums, added afterwards.
    part = torch.empty(splits, rows, out_features, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    common = dict(BITS=bits, HAS_OFFSET=has_offset, TILE_GROUP=tile_group, BLOCK_N=block_n, BLOCK_K=block_k)
    # Triton launches on the current CUDA device, not the tensors': make it theirs (cuda:1, ...).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if gemv:
            grid = (triton.cdiv(out_features, block_n), splits, rows)
            _gemv_kernel[grid](x, planes, alpha, offset, part, rows, out_features, in_features, row_bytes, groups, gs,
                               x.stride(0), k_split, num_warps=GEMV_WARPS, **common)
        else:
            grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n), splits)
            _gemm_kernel[grid](x, planes, alpha, offset, part, rows, out_features, in_features, row_bytes, groups, gs,
                               x.stride(0), k_split, IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
                               num_warps=GEMM_WARPS, num_stages=GEMM_STAGES, **common)
    summed = part[0] if splits == 1 else part.sum(dim=0)
    return summed.to(x.dtype)


def dequantize_triton(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None, in_features: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (out, in) weight, decoded on the GPU in one pass.

    The same float32 sums in the same order as `BCQTensor.dequantize` (the tests check
    equality), which on a GPU runs a dozen full-size torch ops per plane. This is what the
    reference backend and the dense caches of evaluation spend their time on there.
    """
    if not usable(planes):
        raise ValueError("dequantize_triton needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    planes, alpha, offset, has_offset, gs = _packed_arguments(planes, alpha, offset, in_features, group_size)
    bits, out_features, row_bytes = planes.shape
    groups = alpha.shape[1]
    block_k, tile_group = _tile_k(groups, gs, DEQUANT_BLOCK_K)
    out = torch.empty(out_features, in_features, dtype=dtype, device=planes.device)
    grid = (triton.cdiv(out_features, DEQUANT_BLOCK_N), triton.cdiv(in_features, block_k))
    with torch.cuda.device(planes.device) if planes.is_cuda else contextlib.nullcontext():
        _dequantize_kernel[grid](planes, alpha, offset, out, out_features, in_features, row_bytes, groups, gs,
                                 BITS=bits, HAS_OFFSET=has_offset, TILE_GROUP=tile_group,
                                 BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=block_k)
    return out
