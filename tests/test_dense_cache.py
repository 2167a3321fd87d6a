"""`dense_weights`: packed layers dequantized once for evaluation, within a memory budget."""

from __future__ import annotations

import math

import pytest
import torch

import unibcq
import unibcq.nn.qlinear as qlinear
from unibcq.checkpoint import quantized_layers
from unibcq.eval import evaluate_windows
from unibcq.eval.tasks import parameters_as
from unibcq.memory import available_memory_bytes, cgroup_room, model_memory_bytes
from unibcq.nn import dense_weights


@pytest.fixture
def quantized(tiny_llama):
    model = tiny_llama()
    unibcq.quantize(model, unibcq.QuantConfig("rtn", bits=3, group_size=32), show_progress=False)
    return model


def _cached(model) -> list[str]:
    return [name for name, layer in quantized_layers(model).items() if layer.dense_cache is not None]


def test_budget_caches_only_the_layers_that_fit(quantized):
    layers = list(quantized_layers(quantized).values())
    budget = sum(4 * m.in_features * m.out_features for m in layers[:3])
    before = model_memory_bytes(quantized)
    with dense_weights(quantized, budget_bytes=budget):
        assert len(_cached(quantized)) == 3
        assert model_memory_bytes(quantized) - before == budget
    assert _cached(quantized) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["rtn", "dyngroup"])
@pytest.mark.parametrize("rows", [2, 11])
def test_results_do_not_depend_on_how_many_layers_fit(tiny_qwen2, dtype, method, rows):
    """Layers left out of the cache dequantize on each call into the same matmul (Qwen2's
    biases included, and few rows, where the packed kernels would take another path)."""
    model = tiny_qwen2()
    config = unibcq.QuantConfig(method, bits=1 if method == "dyngroup" else 3,
                                group_size=-1 if method == "dyngroup" else 32, max_groups=4)
    unibcq.quantize(model, config, show_progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(3))
    logits = []
    for budget in (None, 0):
        with torch.no_grad(), dense_weights(model, dtype, budget_bytes=budget), parameters_as(model, dtype):
            assert len(_cached(model)) == (0 if budget == 0 else len(quantized_layers(model)))
            logits.append(model(ids).logits)
    assert logits[0].dtype == dtype and torch.equal(logits[0], logits[1])


def test_perplexity_without_room_for_the_cache(quantized, monkeypatch):
    """The default budget is a share of the memory available; with none, evaluation still runs."""
    ids = torch.randint(0, quantized.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    full = evaluate_windows(quantized, ids, seq_len=32, show_progress=False)
    monkeypatch.setattr(qlinear, "DENSE_CACHE_SHARE", 0.0)
    none = evaluate_windows(quantized, ids, seq_len=32, show_progress=False)
    assert none.ppl == full.ppl


def test_available_memory_is_measured_on_this_machine():
    available = available_memory_bytes(torch.device("cpu"))
    assert available is None or available > 0


@pytest.mark.parametrize("files,room", [
    ({"memory.max": "1000\n", "memory.current": "300\n"}, 700),
    ({"memory.max": "max\n", "memory.current": "300\n"}, None),
    ({"memory/memory.limit_in_bytes": "1000", "memory/memory.usage_in_bytes": "1200"}, 0),
    ({"memory/memory.limit_in_bytes": str(2**63 - 4096), "memory/memory.usage_in_bytes": "5"}, None),
    ({}, None),
])
def test_a_containers_memory_limit_bounds_what_is_available(tmp_path, files, room):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_room(tmp_path) == room


def test_memory_cap_counts_the_whole_process_unless_told_to_start_now():
    from unibcq.memory import MemoryCap, MemoryCapExceeded, peak_resident_bytes, reset_peak_resident, \
        resident_memory_bytes

    if not reset_peak_resident() or peak_resident_bytes() is None:
        pytest.skip("this kernel does not let a process restart its peak resident size")
    spike = torch.ones(64 * 2**20)  # 256 MiB, touched, then freed
    del spike
    limit = resident_memory_bytes() + 128 * 2**20
    assert peak_resident_bytes() > limit
    with pytest.raises(MemoryCapExceeded, match="past the --max-memory budget"):
        MemoryCap(limit).check("a test")
    MemoryCap(limit, from_now=True).check("a test")


@pytest.mark.parametrize("budget", [None, 0])
def test_dense_paths_add_the_bias_in_the_input_dtype(budget):
    """Cached or dequantized per call, a layer gives what its kernel path gives: a float32 bias
    added to a bfloat16 input's output in bfloat16; a bias-free layer has no parameter at all."""
    from unibcq.formats.bcq import BCQTensor
    from unibcq.nn.qlinear import BCQLinear

    gen = torch.Generator().manual_seed(0)
    weight = BCQTensor.from_codes(torch.rand(3, 4, 16, generator=gen) > 0.5, torch.rand(4, 1, 3, generator=gen),
                                  torch.randn(4, 1, generator=gen), -1)
    x = torch.randn(2, 16, generator=gen).to(torch.bfloat16)
    for bias in (torch.randn(4, generator=gen), None):
        layer = BCQLinear.from_tensor(weight, bias)
        expected = layer(x)
        with dense_weights(layer, budget_bytes=budget):
            got = layer(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_a_perplexity_past_float_range_is_inf_not_an_overflow_error(quantized):
    """A broken model's mean NLL past ~709.8 gives ppl inf (the CLI's JSON writes null) instead
    of an OverflowError after the whole evaluation ran, in the progress text too."""
    from unibcq.eval.perplexity import perplexity_of

    assert perplexity_of(2.0) == pytest.approx(math.exp(2.0)) and perplexity_of(710.0) == math.inf
    assert math.isnan(perplexity_of(math.nan))  # a NaN model's failure is not hidden as inf
    with torch.no_grad():
        quantized.lm_head.weight.mul_(1e6)
    ids = torch.randint(0, quantized.config.vocab_size, (100,), generator=torch.Generator().manual_seed(1))
    stats = evaluate_windows(quantized, ids, seq_len=32, ref_model=quantized, show_progress=True)
    assert stats.nll > 710 and stats.ppl == math.inf and stats.ref_ppl == math.inf
