"""`unibcq.compute_dtype`: dtype names, and half-precision products as float32 GEMMs on CPUs
whose torch has no fast GEMM in that dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_recorder import LinearDtypes
from unibcq import compute_dtype
from unibcq.compute_dtype import _Float32Linear, half_linear_in_float32
from unibcq.errors import UnibcqError


@pytest.fixture
def avx2(monkeypatch):
    monkeypatch.setattr(compute_dtype, "native_half_gemm", lambda dtype: False)


def test_dtype_names():
    assert compute_dtype.compute_dtype("bfloat16", "--dtype") is torch.bfloat16
    with pytest.raises(UnibcqError, match="--dtype must be one of float32, bfloat16, float16"):
        compute_dtype.compute_dtype("fp8", "--dtype")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_large_half_product_is_a_float32_gemm_rounded_once(dtype, bias):
    gen = torch.Generator().manual_seed(0)
    rows = compute_dtype.FLOAT32_GEMM_MIN_ROWS
    x = torch.randn(2, rows // 2, 64, generator=gen).to(dtype)
    w = torch.randn(48, 64, generator=gen).to(dtype)
    b = torch.randn(48, generator=gen).to(dtype) if bias else None
    with LinearDtypes() as seen, _Float32Linear():
        got = F.linear(x, w, b)
        as_keywords = F.linear(input=x, weight=w, bias=b)
        few_rows = F.linear(x[:1, : rows - 1], w, bias=b)
    assert seen.dtypes == [torch.float32, torch.float32, dtype]  # a decode-sized product stays torch's
    wide = F.linear(x.float(), w.float(), b.float() if bias else None).to(dtype)
    assert got.dtype == dtype and torch.equal(got, wide) and torch.equal(as_keywords, wide)


def test_mixed_dtypes_are_left_to_torch_which_refuses_them():
    x, w = torch.randn(64, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with _Float32Linear(), pytest.raises(RuntimeError):
        F.linear(x, w, torch.zeros(4))


@pytest.mark.parametrize("rows, widened", [(16, True), (1, False)])
def test_the_mode_covers_the_model_calls_on_enough_tokens(tiny_llama, avx2, monkeypatch, rows, widened):
    monkeypatch.setattr(compute_dtype, "FLOAT32_GEMM_MIN_ROWS", 8)
    model = tiny_llama().to(torch.bfloat16)
    entered, enter = [], _Float32Linear.__enter__
    monkeypatch.setattr(_Float32Linear, "__enter__", lambda self: entered.append(self) or enter(self))
    with torch.no_grad(), LinearDtypes() as seen, half_linear_in_float32(model, torch.bfloat16):
        model(torch.randint(0, 64, (1, rows)))
    assert seen.dtypes and set(seen.dtypes) == {torch.float32 if widened else torch.bfloat16}
    assert bool(entered) is widened  # a decode step runs without the mode's per-call cost


def test_the_mode_is_gone_after_a_failed_call_and_after_the_block(tiny_llama, avx2, monkeypatch):
    monkeypatch.setattr(compute_dtype, "FLOAT32_GEMM_MIN_ROWS", 8)
    model = tiny_llama().to(torch.bfloat16)
    x, w = torch.randn(64, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.no_grad(), LinearDtypes() as seen:
        with half_linear_in_float32(model, torch.bfloat16):
            with pytest.raises(Exception):
                model(torch.full((1, 16), 10**6))  # past the vocabulary: fails inside the forward
            F.linear(x, w)
        F.linear(x, w)
    assert seen.dtypes == [torch.bfloat16, torch.bfloat16]
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_other_machines_and_float32_keep_torchs_products(tiny_llama, monkeypatch, native, dtype):
    monkeypatch.setattr(compute_dtype, "native_half_gemm", lambda dtype: native)
    model = tiny_llama().to(dtype)
    with torch.no_grad(), LinearDtypes() as seen, half_linear_in_float32(model, dtype):
        model(torch.randint(0, 64, (2, 40)))
    assert seen.dtypes and set(seen.dtypes) == {dtype}


def test_each_half_dtype_asks_torchs_own_onednn_check(tiny_llama, monkeypatch):
    """A Zen 4 (AVX-512 without AVX512-FP16): oneDNN takes bfloat16, not float16."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    model = tiny_llama()
    assert not compute_dtype.slow_half_matmul(model, torch.bfloat16)
    assert compute_dtype.slow_half_matmul(model, torch.float16)
    assert not compute_dtype.slow_half_matmul(model, torch.float32)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the user turned oneDNN off: torch's loop
    assert compute_dtype.slow_half_matmul(model, torch.bfloat16)


@pytest.mark.parametrize("capability, native", [("AVX512", True), ("AVX2", False)])
def test_a_torch_without_the_onednn_checks_goes_by_avx512(monkeypatch, capability, native):
    monkeypatch.setitem(compute_dtype._ONEDNN_HALF_CHECKS, torch.float16, "_no_such_check")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert compute_dtype.native_half_gemm(torch.float16) is native


def test_a_bfloat16_kl_reference_is_scored_with_float32_gemms(tiny_llama, avx2):
    from unibcq.eval.perplexity import evaluate_windows

    model, reference = tiny_llama(), tiny_llama(seed=1).to(torch.bfloat16)
    ids = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0))
    with LinearDtypes() as seen:
        stats = evaluate_windows(model, ids, seq_len=40, ref_model=reference, show_progress=False)
    assert stats.kl is not None and seen.dtypes and torch.bfloat16 not in seen.dtypes  # the reference widened
    with torch.no_grad(), LinearDtypes() as after:
        reference(ids[:40][None])  # outside evaluate_windows, torch's product again
    assert set(after.dtypes) == {torch.bfloat16}
