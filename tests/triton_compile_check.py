"""Compile every Triton kernel variant for a Hopper GPU (sm_90) on a machine without one.

The kernel tests run in Triton's interpreter on CPU, which checks what the kernels compute
but not that Triton's compiler accepts them: a kernel can pass every interpreter test and
still fail to build for the GPU, and `auto` sends few-row CUDA matmuls to it. This script
runs the compiler down to PTX and ptxas's cubin for the variants `bcq_matmul_triton`
launches. It must run in a process without TRITON_INTERPRET (under it `triton.jit` makes
interpreter objects, not compilable ones); the test calls it that way.
"""

from __future__ import annotations

import os

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from unibcq.kernels import triton_bcq  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
ARG_TYPES = {"planes_ptr": "*u8", "alpha_ptr": "*fp16", "offset_ptr": "*fp16", "part_ptr": "*fp32"}


def compile_variant(kernel: triton.JITFunction, x_dtype: str, **constexprs: object) -> None:
    """Compile one specialisation; integer arguments are i32 as at launch."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "x_ptr":
            signature[name] = f"*{x_dtype}"
        else:
            signature[name] = ARG_TYPES.get(name, "i32")
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=HOPPER)


def main() -> None:
    gemv = [(1, False, True, 64, "fp32"), (2, True, False, 32, "fp16"), (3, True, True, 64, "fp32"),
            (4, True, True, 16, "bf16")]
    for bits, has_offset, tile_group, block_k, x_dtype in gemv:
        compile_variant(triton_bcq._gemv_kernel, x_dtype, BITS=bits, HAS_OFFSET=has_offset, TILE_GROUP=tile_group,
                        BLOCK_N=64, BLOCK_K=block_k)
    gemm = [(3, True, True, 64, "fp32", True, 32), (2, False, False, 32, "fp16", False, 32),
            (4, True, True, 64, "bf16", False, 64)]
    for bits, has_offset, tile_group, block_k, x_dtype, ieee, block_m in gemm:
        compile_variant(triton_bcq._gemm_kernel, x_dtype, BITS=bits, HAS_OFFSET=has_offset, TILE_GROUP=tile_group,
                        IEEE=ieee, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k)
    print(f"compiled {len(gemv)} GEMV and {len(gemm)} GEMM variants for sm_90")


if __name__ == "__main__":
    main()
