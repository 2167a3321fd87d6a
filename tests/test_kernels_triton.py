"""Triton kernels against the reference, on CPU through Triton's interpreter (see conftest).

On a machine with a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_kernels import random_bcq
from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor
from unibcq.kernels import bcq_linear, bcq_linear_reference, choose_backend
from unibcq.kernels.dispatch import _triton

kernels = _triton()
pytestmark = pytest.mark.skipif(kernels is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def on_device(weight: BCQTensor) -> BCQTensor:
    offset = weight.offset.to(DEVICE) if weight.offset is not None else None
    return BCQTensor(weight.planes.to(DEVICE), weight.alpha.to(DEVICE), offset, weight.shape, weight.group_size)


# Shapes with ragged rows (72, 100 are not multiples of the tiles) and a 20-column group
# size that forces the per-element group lookup.
CASES = [(40, 72, 32), (24, 100, 20), (33, 576, 128), (64, 256, 64), (17, 96, -1)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("batch", [1, 5, 16, 40])
def test_triton_matches_reference(bits, offset, batch):
    for index, (out_features, in_features, group_size) in enumerate(CASES):
        weight = random_bcq(out_features, in_features, bits, group_size, offset, seed=index + 10 * bits)
        x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch + index))
        ref = bcq_linear_reference(x, weight)
        got = bcq_linear(x.to(DEVICE), on_device(weight), backend="triton").cpu()
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_half_precision_inputs(dtype, batch):
    if dtype == torch.bfloat16 and batch > kernels.GEMV_MAX_ROWS and DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly (numpy has no bf16); the GEMV is covered")
    weight = random_bcq(48, 128, 3, 32, True, seed=5)
    x = torch.randn(batch, 128, generator=torch.Generator().manual_seed(1))
    ref = bcq_linear_reference(x, weight)
    got = bcq_linear(x.to(dtype).to(DEVICE), on_device(weight), backend="triton").cpu()
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_leading_dims_and_bias():
    weight = random_bcq(24, 64, 2, 32, True, seed=6)
    bias = torch.randn(24)
    x = torch.randn(2, 3, 64)
    expected = bcq_linear_reference(x, weight, bias)
    got = bcq_linear(x.to(DEVICE), on_device(weight), bias.to(DEVICE), backend="triton").cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_backend_choice_for_triton(monkeypatch):
    monkeypatch.delenv("UNIBCQ_BACKEND", raising=False)
    x = torch.randn(1, 128)
    if DEVICE == "cpu":
        assert choose_backend(x, 128, 32) != "triton"  # auto never picks the interpreter
    else:
        assert choose_backend(x.cuda(), 128, 32) == "triton"
        assert choose_backend(torch.randn(64, 128, device="cuda"), 128, 32) == "reference"
    assert choose_backend(x.to(DEVICE), 128, 32, "triton") == "triton"
    with pytest.raises(UnibcqError, match="triton backend needs"):
        choose_backend(x.to(DEVICE).requires_grad_(), 128, 32, "triton")


@pytest.mark.parametrize("batch", [1, 4, 20])
@pytest.mark.parametrize("group_size", [64, 20, -1])
def test_split_k_gives_the_same_result(batch, group_size):
    # 320 inputs are 3 GEMV tiles of 128 (one group per row), 5 of 64 (group 64) or 10 of 32
    # (group 20; GEMM tiles are at most 64 wide): splits of 2 and 3 tiles leave a short last
    # split, and one tile per split is the most splits there can be.
    weight = on_device(random_bcq(70, 320, 3, group_size, True, seed=7))
    x = torch.randn(batch, 320, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref = bcq_linear_reference(x.cpu(), weight)
    for per_split in (1, 2, 3, 10):
        got = kernels.bcq_matmul_triton(x, weight.planes, weight.alpha, weight.offset, 320, group_size,
                                        k_tiles_per_split=per_split).cpu()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_split_k_fills_the_machine_without_empty_splits():
    assert kernels._split_k(k_tiles=32, programs=256, wanted=528) == 11  # 4096 x 4096, batch 1: 3 splits
    assert kernels._split_k(k_tiles=5, programs=36, wanted=528) == 1  # 576 x 576 in 16-row, 128-wide tiles
    assert kernels._split_k(k_tiles=5, programs=2, wanted=4) == 3  # 2 splits wanted: 3 + 2 tiles
    assert kernels._split_k(k_tiles=64, programs=2048, wanted=528) == 64  # prefill: enough tiles already
    weight = on_device(random_bcq(8, 64, 2, 32, True, seed=8))
    with pytest.raises(ValueError, match="k_tiles_per_split"):
        kernels.bcq_matmul_triton(torch.randn(1, 64).to(DEVICE), weight.planes, weight.alpha, weight.offset, 64, 32,
                                  k_tiles_per_split=0)


def test_kernels_compile_for_a_hopper_gpu(tmp_path):
    # Triton's own compiler and ptxas, in a process without the interpreter, with a fresh cache
    # so the kernels are really compiled (see benchmarks/triton_sm90_compile.py).
    if not (Path(kernels.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("this triton has no bundled ptxas")
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "triton_sm90_compile.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("compiled 4 GEMV, 3 GEMM and 2 dequantize variants for sm_90, and each kernel with its integer "
            "arguments 1") in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith(("| gem", "| dequantize"))]
    assert len(table) == 9


@pytest.mark.parametrize("bits", [1, 3, 4])
@pytest.mark.parametrize("offset", [True, False])
def test_dequantize_matches_the_format_exactly(bits, offset):
    for index, (out_features, in_features, group_size) in enumerate(CASES):
        weight = random_bcq(out_features, in_features, bits, group_size, offset, seed=index + 7 * bits)
        expected = weight.dequantize()
        on = on_device(weight)
        got = kernels.dequantize_triton(on.planes, on.alpha, on.offset, in_features, group_size).cpu()
        assert torch.equal(got, expected), (out_features, in_features, group_size)
        half = kernels.dequantize_triton(on.planes, on.alpha, on.offset, in_features, group_size, torch.bfloat16)
        assert half.dtype == torch.bfloat16
        if DEVICE == "cuda":
            assert torch.equal(half.cpu(), expected.to(torch.bfloat16))
        else:  # the interpreter (numpy, no bf16) truncates where the GPU rounds to nearest: one ulp apart
            torch.testing.assert_close(half.float(), expected, rtol=2**-7, atol=0)


def test_empty_inputs_give_empty_outputs():
    weight = on_device(random_bcq(20, 64, 2, 32, True, seed=9))
    got = bcq_linear(torch.randn(0, 64).to(DEVICE), weight, backend="triton")
    assert got.shape == (0, 20)
    empty = on_device(random_bcq(0, 64, 2, 32, True, seed=9))
    assert kernels.bcq_matmul_triton(torch.randn(3, 64).to(DEVICE), empty.planes, empty.alpha, empty.offset, 64,
                                     32).shape == (3, 0)


def test_auto_falls_back_to_the_reference_once_triton_fails(monkeypatch):
    # A Triton kernel that fails (a Triton or driver it was not built for) must not fail the
    # model when `auto` chose it: one warning, then the reference path for good. Forced, it raises.
    from unibcq.kernels import dispatch

    monkeypatch.delenv("UNIBCQ_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_triton_failure", None)
    monkeypatch.setattr(dispatch, "choose_backend", lambda *args, **kwargs: "triton")

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 9.4 does not support .target sm_200")

    monkeypatch.setattr(kernels, "bcq_matmul_triton", broken)
    weight = random_bcq(24, 64, 3, 32, True, seed=11)
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="Triton kernel failed.*sm_200"):
        got = dispatch.bcq_matmul(x, weight.planes, weight.alpha, weight.offset, 64, 32, "auto")
    torch.testing.assert_close(got, bcq_linear_reference(x, weight))
    assert dispatch._triton_failure.startswith("RuntimeError")
    monkeypatch.undo()
    monkeypatch.setattr(dispatch, "_triton_failure", "RuntimeError: earlier")
    if DEVICE == "cuda":
        assert choose_backend(x.cuda(), 64, 32) == "reference"
    monkeypatch.setattr(dispatch, "choose_backend", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(kernels, "bcq_matmul_triton", broken)
    with pytest.raises(RuntimeError, match="sm_200"):
        dispatch.bcq_matmul(x, weight.planes, weight.alpha, weight.offset, 64, 32, "triton")
