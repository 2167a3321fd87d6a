"""Compile every Triton kernel variant for a Hopper GPU (sm_90) on a machine without one, and
print each one's registers and spills as ptxas reports them.

    PYTHONPATH=src python benchmarks/triton_sm90_compile.py

The kernel tests run in Triton's interpreter on CPU, which checks what the kernels compute
but not that Triton's compiler accepts them: a kernel can pass every interpreter test and
still fail to build for the GPU, and `auto` sends few-row CUDA matmuls to it. This runs the
compiler down to PTX and cubin for the variants `bcq_matmul_triton` launches (the test suite
runs it too). Registers and spills are the one performance signal available without a GPU:
a kernel at 255 registers that spills runs few warps per SM and goes through local memory.
Must run without TRITON_INTERPRET (under it `triton.jit` makes interpreter objects).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("triton_sm90_compile.py: run without TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from unibcq.kernels import triton_bcq  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
ARG_TYPES = {"planes_ptr": "*u8", "alpha_ptr": "*fp16", "offset_ptr": "*fp16", "part_ptr": "*fp32"}
PTXAS_DIR = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_variant(kernel: triton.JITFunction, x_dtype: str, options: dict[str, int], out_ptr: str = "fp32",
                    **constexprs: object):
    """One specialisation compiled with the launch's options; integer arguments are i32 as at launch."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("x_ptr", "out_ptr"):
            signature[name] = f"*{x_dtype if name == 'x_ptr' else out_ptr}"
        else:
            signature[name] = ARG_TYPES.get(name, "i32")
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=HOPPER,
                          options=options)


def registers(ptx: str) -> tuple[str, str]:
    """(registers, spill-store bytes) from `ptxas -v`, trying each bundled ptxas (the PTX version
    decides which one accepts it); ('?', '?') when none does."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        for ptxas in sorted(PTXAS_DIR.glob("ptxas*"), reverse=True):
            done = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(source), "-o", os.devnull],
                                  capture_output=True, text=True)
            used = re.search(r"Used (\d+) registers", done.stderr)
            spill = re.search(r"(\d+) bytes spill stores", done.stderr)
            if done.returncode == 0 and used:
                return used.group(1), spill.group(1) if spill else "0"
    return "?", "?"


def main() -> None:
    rows = []
    gemv_options = {"num_warps": triton_bcq.GEMV_WARPS}
    gemv = [(1, False, True, 128, "fp32"), (2, True, False, 32, "fp16"), (3, True, True, 128, "fp32"),
            (4, True, True, 16, "bf16")]
    for bits, has_offset, tile_group, block_k, x_dtype in gemv:
        kernel = compile_variant(triton_bcq._gemv_kernel, x_dtype, gemv_options, BITS=bits, HAS_OFFSET=has_offset,
                                 TILE_GROUP=tile_group, BLOCK_N=triton_bcq.GEMV_BLOCK_N, BLOCK_K=block_k)
        rows.append(("gemv", bits, has_offset, tile_group, f"1x{triton_bcq.GEMV_BLOCK_N}x{block_k}", x_dtype,
                     *registers(kernel.asm["ptx"])))
    gemm_options = {"num_warps": triton_bcq.GEMM_WARPS, "num_stages": triton_bcq.GEMM_STAGES}
    gemm = [(3, True, True, 64, "fp32", True, 32), (2, False, False, 32, "fp16", False, 32),
            (4, True, True, 64, "bf16", False, 64)]
    for bits, has_offset, tile_group, block_k, x_dtype, ieee, block_m in gemm:
        kernel = compile_variant(triton_bcq._gemm_kernel, x_dtype, gemm_options, BITS=bits, HAS_OFFSET=has_offset,
                                 TILE_GROUP=tile_group, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=triton_bcq.GEMM_BLOCK_N,
                                 BLOCK_K=block_k)
        rows.append(("gemm", bits, has_offset, tile_group, f"{block_m}x{triton_bcq.GEMM_BLOCK_N}x{block_k}", x_dtype,
                     *registers(kernel.asm["ptx"])))
    dequantize = [(3, True, True, 64, "fp32"), (4, False, False, 32, "bf16")]
    for bits, has_offset, tile_group, block_k, out_dtype in dequantize:
        kernel = compile_variant(triton_bcq._dequantize_kernel, "fp32", {}, out_ptr=out_dtype, BITS=bits,
                                 HAS_OFFSET=has_offset, TILE_GROUP=tile_group, BLOCK_N=triton_bcq.DEQUANT_BLOCK_N,
                                 BLOCK_K=block_k)
        rows.append(("dequantize", bits, has_offset, tile_group, f"{triton_bcq.DEQUANT_BLOCK_N}x{block_k}",
                     f"-> {out_dtype}", *registers(kernel.asm["ptx"])))
    # Triton compiles integer arguments equal to 1 as constants (one output row, one group,
    # in_features <= 8, ...), where methods of run-time integers such as `.to` do not exist.
    ones = dict(N=1, K=1, KB=1, G=1, gs=1)
    compile_variant(triton_bcq._gemv_kernel, "fp32", gemv_options, rows=1, stride_x=1, k_split=1, BITS=2,
                    HAS_OFFSET=True, TILE_GROUP=True, BLOCK_N=triton_bcq.GEMV_BLOCK_N, BLOCK_K=16, **ones)
    compile_variant(triton_bcq._gemm_kernel, "bf16", gemm_options, M=1, stride_x=1, k_split=1, BITS=2,
                    HAS_OFFSET=True, TILE_GROUP=False, IEEE=False, BLOCK_M=32, BLOCK_N=triton_bcq.GEMM_BLOCK_N,
                    BLOCK_K=16, **ones)
    compile_variant(triton_bcq._dequantize_kernel, "fp32", {}, BITS=2, HAS_OFFSET=True, TILE_GROUP=True,
                    BLOCK_N=triton_bcq.DEQUANT_BLOCK_N, BLOCK_K=16, **ones)
    print(f"Triton {triton.__version__}, sm_90")
    print("| kernel | bits | offset | one group per tile | tile (MxNxK) | input | registers | spill bytes |")
    print("|---|---:|---|---|---|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print(f"compiled {len(gemv)} GEMV, {len(gemm)} GEMM and {len(dequantize)} dequantize variants for sm_90, "
          "and each kernel with its integer arguments 1")


if __name__ == "__main__":
    main()
