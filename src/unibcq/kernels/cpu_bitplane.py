"""CPU kernels for packed BCQ weights, compiled with numba: a bit-plane GEMV and a dequantize.

With signs s = 2 * bit - 1, one row's output is

    y[r] = sum_g [ (offset[r, g] - sum_b alpha[r, g, b]) * X_g + 2 * sum_b alpha[r, g, b] * P_{r,g,b} ]

where X_g is the sum of x over group g and P_{r,g,b} the sum of x over the columns whose bit
in plane b is set. The GEMV computes P straight from the packed bytes: two bytes of a plane
are a 16-bit mask, and one masked vector add (`vaddps zmm{k}` on AVX-512) adds the 16 matching
inputs into a per-plane accumulator. It reads bits/8 bytes per weight, never materialises
the dense matrix, and keeps the per-plane sums in vector registers until the end of each
group, where they are scaled by alpha; one horizontal sum per row ends it.

Why not LUT-GEMM's tables: a table lookup is one dependent scalar load per packed byte, so
on a CPU the earlier table kernel ran at ~1.6 ns per byte and lost to fp32 BLAS (2.9x
slower at 4096x4096, 3 bits); the masked add handles 16 columns per instruction and is
~6x faster (docs/BENCHMARKS.md). numba's loop vectoriser turned the natural Python loops
into gathers, so the inner loop is written as LLVM IR (`_masked_plane_sums`): vector
accumulators for every (plane, input row) pair, specialised for 1..MAX_BITS planes and up
to BATCH_BLOCK input rows that share each mask load. On CPUs without AVX-512 LLVM lowers the
same IR to compares and blends, and a 16-lane accumulator takes two of AVX2's sixteen 256-bit
registers instead of one of AVX-512's thirty-two, so fewer (plane, row) accumulators fit
before they spill: `rows_per_pass` shares each mask load between fewer input rows there, and
`gemv_max_rows` hands fewer rows to the GEMV (both measured, docs/BENCHMARKS.md).

Groups must start on byte boundaries (group size a multiple of 8, or per-channel); other
layouts go to the reference path. The fp16 scales are converted to float32 once per weight
and cached (weakly keyed by the stored tensor, invalidated when it is modified in place):
converting them on every call cost more than the GEMV itself. The cache adds 2 bytes per
stored scale, e.g. 0.75 bits per weight at 3 bits, group 128.
"""

from __future__ import annotations

import functools
import threading
import weakref

import numpy as np
import torch

from unibcq.formats.bcq import MAX_BITS, effective_group_size

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a declared dependency; keep the reference path usable
    numba = None

AVAILABLE = numba is not None
if AVAILABLE:
    # numba's own thread pool, not OpenMP: the OpenMP layer shares libgomp with torch and
    # resets torch's intra-op thread count on its first parallel call.
    numba.config.THREADING_LAYER = "workqueue"

BATCH_BLOCK = 4  # most input rows that share one pass over a weight row's packed bytes (see rows_per_pass)
LANES = 16  # columns per masked add: two packed bytes
PAD_COLUMNS = 8  # the last single-byte step reads a full LANES-wide vector of x
PARALLEL_MIN_BYTES = 1 << 19  # packed bytes x input rows below which the GEMV runs on one thread


# (plane, input row) accumulator pairs one pass keeps in registers without AVX-512. On a Zen 3
# (AVX2) 2-bit planes ran fastest two rows a pass and 3- and 4-bit planes one row a pass, at
# 4096x4096 and SmolLM2's MLP shapes (2026-12-07, docs/BENCHMARKS.md).
NARROW_ACCUMULATORS = 4
# Input rows up to which the GEMV beat the reference path (dequantize + BLAS) at 4096x4096 and
# SmolLM2's shapes: 4 at every width with AVX-512 (Zen 4, 2026-11-26). Without it (Zen 3, AVX2,
# 2026-12-07): 3 rows at 2 bits, 2 at 3 bits, 1 at 4 bits (4-bit planes lost at 2 rows on
# SmolLM2's shapes); 1 bit is given 2-bit's bound and 5-8 bits 4-bit's, unmeasured.
NARROW_GEMV_MAX_ROWS = {1: 3, 2: 3, 3: 2}
GEMV_MAX_ROWS_WIDE = 4


@functools.cache
def has_avx512() -> bool:
    """Whether the kernels are compiled with AVX-512, whose mask registers make the masked add one
    instruction: the target features numba's JIT compiles for, i.e. NUMBA_CPU_FEATURES where
    set, else the host's (less AVX when NUMBA_ENABLE_AVX=0)."""
    if not AVAILABLE:
        return False
    from numba.core.codegen import get_host_cpu_features

    features = numba.config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    return "+avx512f" in features.split(",")


def rows_per_pass(bits: int) -> int:
    """Input rows that share one pass over a weight row's packed bytes (1..BATCH_BLOCK)."""
    if has_avx512():
        return BATCH_BLOCK
    return max(1, min(BATCH_BLOCK, NARROW_ACCUMULATORS // bits))


def gemv_max_rows(bits: int | None = None) -> int:
    """Most input rows for which `auto` takes the GEMV over the reference path on this CPU, for
    `bits` planes (None: a width not known, which gets the bound that holds for every width)."""
    if has_avx512():
        return GEMV_MAX_ROWS_WIDE
    return NARROW_GEMV_MAX_ROWS.get(bits, 1) if bits is not None else 1


def supports(in_features: int, group_size: int) -> bool:
    """Whether the GEMV handles this layout (groups aligned to packed bytes)."""
    return AVAILABLE and (group_size == -1 or group_size >= in_features or group_size % 8 == 0)


if AVAILABLE:
    _F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    _VEC = ir.VectorType(_F32, LANES)
    _MASK = ir.VectorType(ir.IntType(1), LANES)
    _ZERO = ir.Constant(_VEC, [0.0] * LANES)

    def _const(value: int) -> "ir.Constant":
        return ir.Constant(_I64, value)

    def _broadcast(builder: "ir.IRBuilder", scalar: "ir.Value") -> "ir.Value":
        lane0 = builder.insert_element(ir.Constant(_VEC, ir.Undefined), scalar, ir.Constant(_I32, 0))
        return builder.shuffle_vector(lane0, ir.Constant(_VEC, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))

    def _horizontal_sum(builder: "ir.IRBuilder", vector: "ir.Value") -> "ir.Value":
        lanes = [builder.extract_element(vector, ir.Constant(_I32, j)) for j in range(LANES)]
        while len(lanes) > 1:
            lanes = [builder.fadd(lanes[2 * j], lanes[2 * j + 1]) for j in range(len(lanes) // 2)]
        return lanes[0]

    def _emit_chunk_loop(builder: "ir.IRBuilder", x_rows: list, plane_rows: list, k0, k1, tag: str) -> list:
        """Emit the loop over packed bytes [k0, k1) of one group; returns sums[row][plane] vectors.

        Two bytes (16 columns) per masked add. With one or two accumulators a second set of
        them hides the add latency; with more, a second set was measured to be slower (3 bits:
        1.70 instead of 1.50 ms at 4096x4096 on the Zen 4 test machine). Leftover single bytes are zero-extended to 16-bit masks, which
        is why x carries PAD_COLUMNS zero columns past the last byte.
        """
        fn = builder.function
        n_rows, n_planes = len(x_rows), len(plane_rows)
        sets = 2 if n_rows * n_planes <= 2 else 1
        step_bytes = 2 * sets
        pre = builder.block
        head, body = fn.append_basic_block(f"head{tag}"), fn.append_basic_block(f"body{tag}")
        tail_head, tail_body = fn.append_basic_block(f"thead{tag}"), fn.append_basic_block(f"tbody{tag}")
        done = fn.append_basic_block(f"done{tag}")

        def step(k, accs: list, wide: bool) -> list:
            masks = []
            for plane in plane_rows:
                ptr = builder.gep(plane, [k], source_etype=_I8)
                bits = builder.load(ptr, typ=_I16, align=1) if wide else builder.zext(builder.load(ptr, typ=_I8), _I16)
                masks.append(builder.bitcast(bits, _MASK))
            out = []
            for row, acc_row in zip(x_rows, accs):
                xv = builder.load(builder.gep(row, [builder.mul(k, _const(8))], source_etype=_F32), typ=_VEC, align=4)
                out.append([builder.select(m, builder.fadd(a, xv), a) for m, a in zip(masks, acc_row)])
            return out

        def phis(incoming_block, incoming: list | None) -> list:
            made = [[builder.phi(_VEC) for _ in range(n_planes)] for _ in range(n_rows)]
            for i, row in enumerate(made):
                for j, phi in enumerate(row):
                    phi.add_incoming(_ZERO if incoming is None else incoming[i][j], incoming_block)
            return made

        builder.branch(head)
        builder.position_at_end(head)
        k = builder.phi(_I64)
        k.add_incoming(k0, pre)
        acc_sets = [phis(pre, None) for _ in range(sets)]
        k_next = builder.add(k, _const(step_bytes))
        builder.cbranch(builder.icmp_signed("<=", k_next, k1), body, tail_head)
        builder.position_at_end(body)
        stepped = [step(builder.add(k, _const(2 * s)), acc, True) for s, acc in enumerate(acc_sets)]
        for acc, new in zip(acc_sets, stepped):
            for acc_row, new_row in zip(acc, new):
                for phi, value in zip(acc_row, new_row):
                    phi.add_incoming(value, body)
        k.add_incoming(k_next, body)
        builder.branch(head)

        builder.position_at_end(tail_head)
        kt = builder.phi(_I64)
        kt.add_incoming(k, head)
        tail = phis(head, acc_sets[0])
        builder.cbranch(builder.icmp_signed("<", kt, k1), tail_body, done)
        builder.position_at_end(tail_body)
        for acc_row, new_row in zip(tail, step(kt, tail, False)):
            for phi, value in zip(acc_row, new_row):
                phi.add_incoming(value, tail_body)
        kt.add_incoming(builder.add(kt, _const(1)), tail_body)
        builder.branch(tail_head)

        builder.position_at_end(done)
        sums = tail
        for extra in acc_sets[1:]:
            sums = [[builder.fadd(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(sums, extra)]
        return sums

    def _emit_switch(builder: "ir.IRBuilder", selector, cases: list) -> None:
        """Branch on `selector` to one block per (value, emit) case; other values do nothing."""
        fn = builder.function
        merge, default = fn.append_basic_block("merge"), fn.append_basic_block("default")
        switch = builder.switch(selector, default)
        for value, emit in cases:
            block = fn.append_basic_block(f"case{value}")
            switch.add_case(_const(value), block)
            builder.position_at_end(block)
            emit()
            builder.branch(merge)
        builder.position_at_end(default)
        builder.branch(merge)
        builder.position_at_end(merge)

    def _open_group_loop(builder: "ir.IRBuilder", tag: str, n_planes: int, plane_row0, plane_stride) -> tuple:
        """Start a loop over groups: (plane row pointers, group phi g, entry block, head, body, exit).

        The caller may add its own phis to `head` (its first instructions are phis), then
        calls `_enter_group` and, at the end of the body, `_close_group_loop`.
        """
        fn = builder.function
        pre = builder.block
        head, body, done = (fn.append_basic_block(f"{name}{tag}") for name in ("ghead", "gbody", "gdone"))
        plane_rows = [builder.gep(plane_row0, [builder.mul(_const(b), plane_stride)], source_etype=_I8)
                      for b in range(n_planes)]
        builder.branch(head)
        builder.position_at_end(head)
        g = builder.phi(_I64)
        g.add_incoming(_const(0), pre)
        return plane_rows, g, pre, head, body, done

    def _enter_group(builder: "ir.IRBuilder", g, groups, body, done, chunks_per_group, byte_limit) -> tuple:
        """Branch into the body for group g < groups: (first byte, end byte) of the group."""
        builder.cbranch(builder.icmp_signed("<", g, groups), body, done)
        builder.position_at_end(body)
        k0 = builder.mul(g, chunks_per_group)
        k1 = builder.add(k0, chunks_per_group)
        return k0, builder.select(builder.icmp_signed("<", k1, byte_limit), k1, byte_limit)

    def _group_alphas(builder: "ir.IRBuilder", alpha_row, g, n_planes: int) -> list:
        """alpha[g, 0..n_planes) of one weight row, as scalars."""
        alpha_g = builder.gep(alpha_row, [builder.mul(g, _const(n_planes))], source_etype=_F32)
        return [builder.load(builder.gep(alpha_g, [_const(b)], source_etype=_F32), typ=_F32) for b in range(n_planes)]

    def _close_group_loop(builder: "ir.IRBuilder", g, head, done) -> None:
        g.add_incoming(builder.add(g, _const(1)), builder.block)
        builder.branch(head)
        builder.position_at_end(done)

    def _emit_row(builder: "ir.IRBuilder", n_planes: int, n_rows: int, x_rows: list, out_ptrs: list,
                  plane_row0, plane_stride, chunks, groups, chunks_per_group, alpha_row) -> None:
        """Store sum_g sum_b alpha[g, b] * P[g, b] of one weight row for n_rows inputs."""
        tag = f"{n_planes}x{n_rows}"
        plane_rows, g, pre, head, body, done = _open_group_loop(builder, tag, n_planes, plane_row0, plane_stride)
        totals = [builder.phi(_VEC) for _ in range(n_rows)]
        for total in totals:
            total.add_incoming(_ZERO, pre)
        k0, k1 = _enter_group(builder, g, groups, body, done, chunks_per_group, chunks)
        sums = _emit_chunk_loop(builder, x_rows, plane_rows, k0, k1, tag)
        alphas = [_broadcast(builder, a) for a in _group_alphas(builder, alpha_row, g, n_planes)]
        new_totals = []
        for total, row_sums in zip(totals, sums):
            for a, s in zip(alphas, row_sums):
                total = builder.fadd(total, builder.fmul(a, s))
            new_totals.append(total)
        for phi, value in zip(totals, new_totals):
            phi.add_incoming(value, builder.block)
        _close_group_loop(builder, g, head, done)
        for total, ptr in zip(totals, out_ptrs):
            builder.store(_horizontal_sum(builder, total), ptr)

    @intrinsic
    def _masked_plane_sums(typingctx, x, first, count, planes, r, alpha, chunks_per_group, out):
        """out[first + j, r] = sum_g sum_b alpha[r, g, b] * P_{r,g,b}(x[first + j]) for j < count.

        x: (batch, >= 8 * chunks + PAD_COLUMNS) float32, zero-padded; planes (bits, rows,
        chunks) uint8; alpha (rows, groups, bits) float32; out (batch, rows) float32; all
        C-contiguous. `count` must be 1..BATCH_BLOCK and bits 1..MAX_BITS (not checked here).
        """
        sig = types.none(x, types.intp, types.intp, planes, types.intp, alpha, types.intp, out)

        def codegen(context, builder, signature, args):
            xa, first_, count_, pa, r_, aa, cpg_, oa = args
            arrays = [context.make_array(t)(context, builder, v)
                      for t, v in zip(signature.args, args) if isinstance(t, types.Array)]
            xs, ps, al, os_ = arrays
            _, x_cols = cgutils.unpack_tuple(builder, xs.shape, 2)
            bits, rows, chunks = cgutils.unpack_tuple(builder, ps.shape, 3)
            _, groups, _ = cgutils.unpack_tuple(builder, al.shape, 3)
            plane_row0 = builder.gep(ps.data, [builder.mul(r_, chunks)], source_etype=_I8)
            alpha_row = builder.gep(al.data, [builder.mul(builder.mul(r_, groups), bits)], source_etype=_F32)

            def emit_case(n_planes: int, n_rows: int) -> None:
                x_rows, out_ptrs = [], []
                for j in range(n_rows):
                    row = builder.add(first_, _const(j))
                    x_rows.append(builder.gep(xs.data, [builder.mul(row, x_cols)], source_etype=_F32))
                    out_ptrs.append(builder.gep(os_.data, [builder.add(builder.mul(row, rows), r_)],
                                                source_etype=_F32))
                _emit_row(builder, n_planes, n_rows, x_rows, out_ptrs, plane_row0, builder.mul(rows, chunks),
                          chunks, groups, cpg_, alpha_row)

            selector = builder.add(builder.mul(bits, _const(BATCH_BLOCK)), count_)
            _emit_switch(builder, selector, [
                (n_planes * BATCH_BLOCK + n_rows, lambda n_planes=n_planes, n_rows=n_rows: emit_case(n_planes, n_rows))
                for n_planes in range(1, MAX_BITS + 1) for n_rows in range(1, BATCH_BLOCK + 1)])
            return context.get_dummy_value()

        return sig, codegen

    def _gemv_body(x: np.ndarray, planes: np.ndarray, alpha: np.ndarray, offset: np.ndarray, group_size: int,
                   chunks_per_group: int, has_offset: bool, row_block: int) -> np.ndarray:
        """(B, in) float32 -> (B, out) float32, `row_block` input rows a pass; compiled twice,
        serial and parallel (see `bitplane_linear`)."""
        batch, in_features = x.shape
        bits, rows, chunks = planes.shape
        groups = alpha.shape[1]
        padded = np.zeros((batch, max(groups * group_size, 8 * chunks + PAD_COLUMNS)), dtype=np.float32)
        padded[:, :in_features] = x
        group_sums = np.zeros((batch, groups), dtype=np.float32)
        for b in range(batch):
            for g in range(groups):
                group_sums[b, g] = padded[b, g * group_size:(g + 1) * group_size].sum()
        out = np.empty((batch, rows), dtype=np.float32)
        for r in prange(rows):
            for first in range(0, batch, row_block):
                _masked_plane_sums(padded, first, min(row_block, batch - first), planes, r, alpha,
                                   chunks_per_group, out)
            for b in range(batch):
                acc = np.float32(2.0) * out[b, r]
                for g in range(groups):
                    weight = offset[r, g] if has_offset else np.float32(0.0)
                    for i in range(bits):
                        weight -= alpha[r, g, i]
                    acc += weight * group_sums[b, g]
                out[b, r] = acc
        return out

    _gemv_serial = njit(fastmath=True, cache=True, nogil=True)(_gemv_body)
    _gemv_parallel = njit(parallel=True, fastmath=True, cache=True, nogil=True)(_gemv_body)

    def _emit_dequantize_row(builder: "ir.IRBuilder", n_planes: int, plane_row0, plane_stride, groups,
                             chunks_per_group, full_bytes, alpha_row, offset_row, has_offset, out_row) -> None:
        """Write the whole bytes of one dense row: per column 0 +- alpha_0 +- alpha_1 ... + offset.

        The same additions in the same order as `BCQTensor.dequantize`, so the values are
        identical; 16 columns per vector step, a last odd byte of a group 8 columns wide.
        """
        fn = builder.function
        tag = f"d{n_planes}"
        half = ir.VectorType(_F32, 8)
        plane_rows, g, _, ghead, gbody, gdone = _open_group_loop(builder, tag, n_planes, plane_row0, plane_stride)
        k0, k1 = _enter_group(builder, g, groups, gbody, gdone, chunks_per_group, full_bytes)
        alphas = _group_alphas(builder, alpha_row, g, n_planes)
        offset_index = builder.select(has_offset, g, _const(0))  # without offsets the array is a 1x1 dummy
        offset = builder.load(builder.gep(offset_row, [offset_index], source_etype=_F32), typ=_F32)
        wide = [(_broadcast(builder, a), _broadcast(builder, builder.fneg(a))) for a in alphas]
        wide_offset = _broadcast(builder, offset)
        narrow_lanes = ir.Constant(ir.VectorType(_I32, 8), list(range(8)))
        narrow = [tuple(builder.shuffle_vector(v, v, narrow_lanes) for v in pair) for pair in wide]
        narrow_offset = builder.shuffle_vector(wide_offset, wide_offset, narrow_lanes)

        def emit_step(k, width: int) -> None:
            vec_type, mask_type, load_type = ((_VEC, _MASK, _I16) if width == LANES
                                              else (half, ir.VectorType(ir.IntType(1), 8), _I8))
            scales, shift = (wide, wide_offset) if width == LANES else (narrow, narrow_offset)
            value = ir.Constant(vec_type, [0.0] * width)
            for plane, (plus, minus) in zip(plane_rows, scales):
                bits = builder.load(builder.gep(plane, [k], source_etype=_I8), typ=load_type, align=1)
                value = builder.fadd(value, builder.select(builder.bitcast(bits, mask_type), plus, minus))
            value = builder.select(has_offset, builder.fadd(value, shift), value)
            target = builder.gep(out_row, [builder.mul(k, _const(8))], source_etype=_F32)
            builder.store(value, builder.bitcast(target, vec_type.as_pointer()), align=4)

        head, body, tail, tail_body, done = (fn.append_basic_block(f"{name}{tag}")
                                             for name in ("khead", "kbody", "ktail", "ktailbody", "kdone"))
        entry = builder.block
        builder.branch(head)
        builder.position_at_end(head)
        k = builder.phi(_I64)
        k.add_incoming(k0, entry)
        k_next = builder.add(k, _const(2))
        builder.cbranch(builder.icmp_signed("<=", k_next, k1), body, tail)
        builder.position_at_end(body)
        emit_step(k, LANES)
        k.add_incoming(k_next, body)
        builder.branch(head)
        builder.position_at_end(tail)
        builder.cbranch(builder.icmp_signed("<", k, k1), tail_body, done)
        builder.position_at_end(tail_body)
        emit_step(k, 8)
        builder.branch(done)
        builder.position_at_end(done)
        _close_group_loop(builder, g, ghead, gdone)

    @intrinsic
    def _dequantize_whole_bytes(typingctx, planes, r, alpha, offset, has_offset, chunks_per_group, out):
        """out[r, :8 * (in // 8)] from the packed row r (a partial last byte is left to the caller).

        planes (bits, rows, chunks) uint8, alpha (rows, groups, bits) and offset (rows, groups)
        float32 (offset ignored unless has_offset), out (rows, in) float32; all C-contiguous.
        """
        sig = types.none(planes, types.intp, alpha, offset, types.boolean, types.intp, out)

        def codegen(context, builder, signature, args):
            pa, r_, aa, oa, has_offset_, cpg_, outa = args
            ps, al, off, os_ = (context.make_array(t)(context, builder, v)
                                for t, v in zip(signature.args, args) if isinstance(t, types.Array))
            bits, rows, chunks = cgutils.unpack_tuple(builder, ps.shape, 3)
            _, groups, _ = cgutils.unpack_tuple(builder, al.shape, 3)
            _, in_features = cgutils.unpack_tuple(builder, os_.shape, 2)
            plane_row0 = builder.gep(ps.data, [builder.mul(r_, chunks)], source_etype=_I8)
            alpha_row = builder.gep(al.data, [builder.mul(builder.mul(r_, groups), bits)], source_etype=_F32)
            offset_row = builder.gep(off.data, [builder.mul(r_, groups)], source_etype=_F32)
            offset_row = builder.select(has_offset_, offset_row, off.data)
            out_row = builder.gep(os_.data, [builder.mul(r_, in_features)], source_etype=_F32)
            full_bytes = builder.sdiv(in_features, _const(8))
            _emit_switch(builder, bits, [
                (n_planes, lambda n_planes=n_planes: _emit_dequantize_row(
                    builder, n_planes, plane_row0, builder.mul(rows, chunks), groups, cpg_, full_bytes, alpha_row,
                    offset_row, has_offset_, out_row))
                for n_planes in range(1, MAX_BITS + 1)])
            return context.get_dummy_value()

        return sig, codegen

    @njit(parallel=True, cache=True, nogil=True)
    def _dequantize(planes: np.ndarray, alpha: np.ndarray, offset: np.ndarray, has_offset: bool,
                    bytes_per_group: int, out: np.ndarray) -> None:
        """Fill the dense (rows, in) float32 `out`; whole bytes through the IR kernel, a partial last byte here."""
        bits, rows, _ = planes.shape
        in_features = out.shape[1]
        last = in_features // 8
        g = min(last // bytes_per_group, alpha.shape[1] - 1)
        for r in prange(rows):
            _dequantize_whole_bytes(planes, r, alpha, offset, has_offset, bytes_per_group, out)
            for col in range(8 * last, in_features):
                value = np.float32(0.0)
                for i in range(bits):
                    value += alpha[r, g, i] if (planes[i, r, last] >> (col - 8 * last)) & 1 else -alpha[r, g, i]
                if has_offset:
                    value += offset[r, g]
                out[r, col] = value


_FLOAT32_CACHE: dict[int, tuple[weakref.ref, tuple[int, int], np.ndarray]] = {}
# numba's workqueue pool aborts the process if two threads enter parallel code at once.
_PARALLEL_LOCK = threading.Lock()


def _float32(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` as a contiguous float32 array, converted once per stored version.

    The version counter sees in-place writes (`no_grad` ops, `load_state_dict`), not writes
    through `.data`, which has its own. Tensors made under `torch.inference_mode()` have no
    counter at all, so they are converted on every call (scales are small next to the matmul).
    """
    if tensor.is_inference():
        return tensor.detach().float().contiguous().numpy()
    key = id(tensor)
    cached = _FLOAT32_CACHE.get(key)
    stamp = (tensor._version, tensor.data_ptr())  # in-place writes bump the version; `.data =` moves the data
    if cached is None or cached[0]() is not tensor or cached[1] != stamp:
        ref = weakref.ref(tensor, lambda _, key=key: _FLOAT32_CACHE.pop(key, None))
        cached = (ref, stamp, tensor.detach().float().contiguous().numpy())
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
               group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense float32 weight of a packed BCQ layer (see `BCQTensor.dequantize`), compiled.

    ~10x faster than the torch version, which materialises every bit-plane; the reference
    matmul path and dense evaluation go through it on the CPU. `out` (contiguous float32,
    (out_features, in_features)) is filled instead of a new tensor: for large layers the
    page faults of a fresh allocation cost several times the dequantize itself.
    """
    _, bytes_per_group, alpha_np, offset_np = _prepare(planes, alpha, offset, in_features, group_size,
                                                       "compiled dequantize")
    shape = (planes.shape[1], in_features)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}")
    if out.numel() == 0:
        return out
    with _PARALLEL_LOCK:
        _dequantize(planes.contiguous().numpy(), alpha_np, offset_np, offset is not None, bytes_per_group,
                    out.numpy())
    return out


def bitplane_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
                    in_features: int, group_size: int) -> torch.Tensor:
    """x (B, in) float -> (B, out) float32 through the bit-plane GEMV.

    Small products run serially: starting numba's thread pool costs ~50 us a call, more than
    a whole SmolLM2-sized layer takes on one thread.
    """
    gs, bytes_per_group, alpha_np, offset_np = _prepare(planes, alpha, offset, in_features, group_size,
                                                        "bit-plane GEMV")
    if x.shape[0] == 0 or planes.shape[1] == 0 or in_features == 0:
        return torch.zeros(x.shape[0], planes.shape[1])
    row_block = rows_per_pass(planes.shape[0])
    if not (1 <= row_block <= BATCH_BLOCK and 1 <= planes.shape[0] <= MAX_BITS):  # no IR case: out left unset
        raise ValueError(f"the GEMV handles 1..{MAX_BITS} planes and 1..{BATCH_BLOCK} rows a pass, "
                         f"got {planes.shape[0]} and {row_block}")
    args = (x.detach().to(torch.float32).contiguous().numpy(), planes.contiguous().numpy(), alpha_np, offset_np, gs,
            bytes_per_group, offset is not None, row_block)
    if numba.get_num_threads() > 1 and planes.numel() * x.shape[0] >= PARALLEL_MIN_BYTES:
        with _PARALLEL_LOCK:
            return torch.from_numpy(_gemv_parallel(*args))
    return torch.from_numpy(_gemv_serial(*args))
