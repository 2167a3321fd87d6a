"""Grouped-binary format (dynamic grouping): packing, dequantization, honest bit counts."""

from __future__ import annotations


import pytest
import torch

import unibcq
from unibcq.errors import UnibcqError
from unibcq.formats.grouped_binary import GroupedBinaryTensor, index_bits_for, parse_granularity, segment_of
from unibcq.quantizers.dyngroup import dyngroup_quantize

from dyngroup_reference import bits_per_weight


def _random_parts(rows: int, cols: int, groups: int, granularity: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.rand(rows, cols, generator=gen) > 0.5
    index = torch.randint(0, groups, (rows, cols), generator=gen)
    segments = int(segment_of(granularity, (rows, cols)).max()) + 1
    scales = torch.rand(segments, groups, generator=gen).half()
    return signs, index, scales


@pytest.mark.parametrize("granularity", ["matrix", "row", "block:5"])
@pytest.mark.parametrize("groups", [1, 2, 3, 32])
def test_pack_round_trip_and_dequantize(granularity, groups):
    signs, index, scales = _random_parts(7, 13, groups, granularity)
    packed = GroupedBinaryTensor.from_parts(signs, index, scales, granularity)
    assert packed.index.shape[0] == index_bits_for(groups)
    assert torch.equal(packed.group_index(), index)
    seg = segment_of(granularity, (7, 13))
    expected = torch.empty(7, 13)
    for r in range(7):
        for c in range(13):
            value = float(scales[seg[r, c], index[r, c]])
            expected[r, c] = value if signs[r, c] else -value
    assert torch.equal(packed.dequantize(), expected)


def test_stored_bits_match_the_fixed_count():
    signs, index, scales = _random_parts(64, 128, 32, "matrix")
    packed = GroupedBinaryTensor.from_parts(signs, index, scales, "matrix")
    n = 64 * 128
    assert packed.bits_per_weight == pytest.approx(1 + 5 + 16 * 32 / n)
    acc = packed.accounting()
    assert acc["bits_per_weight_paper"] == pytest.approx(1 + 16 * 32 / n)
    assert acc["bits_per_weight_fixed"] == pytest.approx(packed.bits_per_weight)
    assert acc["bits_per_weight_paper"] < acc["bits_per_weight_entropy"] <= acc["bits_per_weight_fixed"] + 1e-9


def test_accounting_agrees_with_the_quantizer():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    result = dyngroup_quantize(w, max_groups=16, window=8)
    packed = GroupedBinaryTensor.from_parts(result.signs, result.group_index, result.scales, "matrix")
    ours = packed.accounting()
    theirs = bits_per_weight(result)
    for key in ("paper", "fixed", "entropy"):
        assert ours[f"bits_per_weight_{key}"] == pytest.approx(theirs[key])
    assert torch.allclose(packed.dequantize(), result.dequantize(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad", ["", "rows", "block", "block:0", "block:-3", "block:x"])
def test_bad_granularity(bad):
    with pytest.raises(UnibcqError, match="granularity"):
        parse_granularity(bad)


def test_shape_validation():
    signs, index, scales = _random_parts(4, 16, 4, "row")
    packed = GroupedBinaryTensor.from_parts(signs, index, scales, "row")
    with pytest.raises(UnibcqError, match="gb_scales"):
        GroupedBinaryTensor(packed.signs, packed.index, packed.scales[:2], (4, 16), "row")


@pytest.mark.parametrize("algorithm", ["windowed", "greedy", "dp"])
@pytest.mark.parametrize("granularity", ["matrix", "row", "block:32"])
def test_dyngroup_model_round_trip(tiny_llama, tmp_path, input_ids, algorithm, granularity):
    model = tiny_llama()
    config = unibcq.QuantConfig("dyngroup", bits=1, max_groups=8, algorithm=algorithm, window=16,
                                granularity=granularity)
    records = unibcq.quantize(model, config, show_progress=False)
    assert all(0 < r.rel_error < 1 for r in records)
    with torch.no_grad():
        expected = model(input_ids).logits
    unibcq.save(model, tmp_path / "ck", config, source_model="tiny")
    loaded = unibcq.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
    info = unibcq.checkpoint_info(tmp_path / "ck").to_dict()
    assert info["bits_per_weight_paper"] < info["bits_per_weight_entropy"] <= info["bits_per_weight_fixed"] + 1e-9
    assert info["bits_per_weight"] >= info["bits_per_weight_fixed"] - 1e-9


def test_dyngroup_more_groups_less_error(tiny_llama):
    errors = []
    for groups in (2, 8, 32):
        model = tiny_llama()
        records = unibcq.quantize(model, unibcq.QuantConfig("dyngroup", bits=1, max_groups=groups, window=4),
                                  show_progress=False)
        errors.append(sum(r.rel_error for r in records))
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("changes,needle", [
    ({"bits": 2}, "1-bit"), ({"max_groups": 0}, "max_groups"), ({"max_groups": 300}, "max_groups"),
    ({"lam": -1.0}, "lambda"), ({"window": 0}, "window"), ({"algorithm": "annealing"}, "algorithm"),
    ({"granularity": "column"}, "granularity"),
])
def test_dyngroup_config_validation(changes, needle):
    config = unibcq.QuantConfig("dyngroup", bits=1)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(UnibcqError, match=needle):
        config.validate()


@pytest.mark.parametrize("method,extra", [("rtn", {}), ("dyngroup", {"bits": 1, "window": 8})])
def test_parallel_workers_match_serial(tiny_llama, method, extra):
    serial, parallel = tiny_llama(), tiny_llama()
    config = unibcq.QuantConfig(method, **({"bits": 3, "group_size": 32} | extra))
    unibcq.quantize(serial, config, show_progress=False)
    unibcq.quantize(parallel, config, show_progress=False, workers=2)
    a, b = serial.state_dict(), parallel.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dyngroup_all_zero_layer_is_a_clear_error(tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    with pytest.raises(UnibcqError, match="model.layers.0.mlp.up_proj.*all zeros"):
        unibcq.quantize(model, unibcq.QuantConfig("dyngroup", bits=1), show_progress=False)


def test_dyngroup_nan_is_a_clear_error(tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(UnibcqError, match="q_proj.*NaN"):
        unibcq.quantize(model, unibcq.QuantConfig("dyngroup", bits=1), show_progress=False)
