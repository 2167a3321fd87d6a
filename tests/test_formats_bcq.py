"""The packed BCQ format: sign packing, validation, dequantization, size accounting."""

from __future__ import annotations

import math

import pytest
import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import (
    BCQTensor,
    effective_group_size,
    group_index,
    num_groups,
    pack_signs,
    unpack_signs,
    validate_group_size,
)
from unibcq.quantizers import quantize_bcq, quantize_rtn


def random_bcq(out_features, in_features, bits, group_size, offset=True, seed=0) -> BCQTensor:
    """A BCQTensor with random signs, fp16 alphas of mixed sign-free magnitude and offsets."""
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(in_features, group_size)
    signs = torch.rand(bits, out_features, in_features, generator=gen) < 0.5
    alpha = torch.rand(out_features, groups, bits, generator=gen) * 2 + 0.01
    off = torch.randn(out_features, groups, generator=gen) if offset else None
    return BCQTensor.from_codes(signs, alpha, off, group_size)


def naive_dequantize(t: BCQTensor) -> torch.Tensor:
    """Python-loop reference: W[r, c] = sum_i alpha[r, g, i] * b_i[r, c] + offset[r, g]."""
    out_features, in_features = t.shape
    gs = in_features if t.group_size == -1 or t.group_size >= in_features else t.group_size
    signs = unpack_signs(t.planes, in_features).tolist()
    alpha = t.alpha.double().tolist()
    offset = None if t.offset is None else t.offset.double().tolist()
    w = torch.zeros(out_features, in_features, dtype=torch.float64)
    for r in range(out_features):
        for c in range(in_features):
            g = c // gs
            value = 0.0
            for i in range(t.bits):
                value += alpha[r][g][i] * (1.0 if signs[i][r][c] else -1.0)
            if offset is not None:
                value += offset[r][g]
            w[r, c] = value
    return w


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (13,), (3, 5, 1), (2, 4, 17), (3, 6, 75), (1, 2, 64)])
def test_pack_unpack_round_trip(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    signs = torch.rand(shape, generator=gen) < 0.5
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] / 8))
    assert torch.equal(unpack_signs(packed, shape[-1]), signs)


def test_pack_bit_order_is_column_8j_plus_k():
    signs = torch.zeros(1, 19, dtype=torch.bool)
    signs[0, 0] = True  # byte 0, bit 0
    signs[0, 9] = True  # byte 1, bit 1
    signs[0, 15] = True  # byte 1, bit 7
    signs[0, 18] = True  # byte 2, bit 2
    assert pack_signs(signs).tolist() == [[1, 2 | 128, 4]]


def test_pack_padding_bits_are_zero():
    signs = torch.ones(2, 11, dtype=torch.bool)
    packed = pack_signs(signs)
    assert packed[:, 0].tolist() == [255, 255]
    assert packed[:, 1].tolist() == [0b111, 0b111]


def test_all_true_and_all_false_round_trip():
    for value in (True, False):
        signs = torch.full((3, 4, 21), value)
        assert torch.equal(unpack_signs(pack_signs(signs), 21), signs)


# --------------------------------------------------------------------------- validation


def test_valid_tensor_properties():
    t = random_bcq(5, 75, 3, 32)
    assert t.shape == (5, 75)
    assert t.bits == 3
    assert t.numel == 375
    assert t.planes.shape == (3, 5, 10)
    assert t.alpha.shape == (5, 3, 3) and t.alpha.dtype == torch.float16
    assert t.offset.shape == (5, 3) and t.offset.dtype == torch.float16
    assert set(t.tensors()) == {"bcq_planes", "bcq_alpha", "bcq_offset"}
    assert set(random_bcq(5, 75, 3, 32, offset=False).tensors()) == {"bcq_planes", "bcq_alpha"}
    s = t.signs()
    assert s.shape == (3, 5, 75) and set(s.unique().tolist()) <= {-1.0, 1.0}


def _parts(out_features=4, in_features=20, bits=2, group_size=8):
    groups = num_groups(in_features, group_size)
    return dict(
        planes=torch.zeros(bits, out_features, math.ceil(in_features / 8), dtype=torch.uint8),
        alpha=torch.ones(out_features, groups, bits, dtype=torch.float16),
        offset=torch.zeros(out_features, groups, dtype=torch.float16),
        shape=(out_features, in_features),
        group_size=group_size,
    )


@pytest.mark.parametrize(
    "change",
    [
        {"planes": torch.zeros(2, 4, 3, dtype=torch.int64)},  # wrong dtype
        {"planes": torch.zeros(2, 4, 2, dtype=torch.uint8)},  # too few bytes per row
        {"planes": torch.zeros(2, 5, 3, dtype=torch.uint8)},  # wrong rows
        {"planes": torch.zeros(0, 4, 3, dtype=torch.uint8)},  # 0 bits
        {"planes": torch.zeros(9, 4, 3, dtype=torch.uint8)},  # 9 bits
        {"alpha": torch.ones(4, 3, 2, dtype=torch.float32)},  # wrong dtype
        {"alpha": torch.ones(4, 2, 2, dtype=torch.float16)},  # tail group missing
        {"alpha": torch.ones(4, 3, 3, dtype=torch.float16)},  # bits disagree with planes
        {"alpha": torch.ones(4, 3, dtype=torch.float16)},  # wrong rank
        {"offset": torch.zeros(4, 2, dtype=torch.float16)},  # wrong groups
        {"offset": torch.zeros(4, 3, dtype=torch.float32)},  # wrong dtype
        {"offset": torch.zeros(4, 3, 1, dtype=torch.float16)},  # wrong rank
        {"shape": (4, 25)},  # in_features needing 4 bytes
        {"group_size": 0},
        {"group_size": -2},
        {"group_size": 2.5},
        {"group_size": True},
    ],
)
def test_bcq_tensor_validation_errors(change):
    parts = _parts()
    BCQTensor(**parts)  # the unchanged parts are valid
    parts.update(change)
    with pytest.raises(UnibcqError) as info:
        BCQTensor(**parts)
    assert str(info.value)


def test_offset_none_is_valid():
    parts = _parts()
    parts["offset"] = None
    t = BCQTensor(**parts)
    assert t.offset is None
    assert torch.equal(t.dequantize(), -2 * torch.ones(4, 20))


def test_from_codes_rejects_non_3d_signs():
    with pytest.raises(UnibcqError):
        BCQTensor.from_codes(torch.zeros(4, 20, dtype=torch.bool), torch.ones(4, 1, 1), None, -1)


def test_from_codes_casts_to_storage_dtype():
    signs = torch.rand(2, 3, 10) < 0.5
    t = BCQTensor.from_codes(signs, torch.rand(3, 1, 2, dtype=torch.float64), torch.rand(3, 1), -1)
    assert t.alpha.dtype == torch.float16 and t.offset.dtype == torch.float16
    assert t.planes.dtype == torch.uint8
    assert torch.equal(unpack_signs(t.planes, 10), signs)


# --------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize(
    "out_features,in_features,bits,group_size,offset",
    [
        (4, 19, 3, 8, True),  # tail group of 3 columns
        (3, 24, 2, 8, True),  # divides exactly
        (5, 21, 1, 4, False),  # 1 bit, no offset, tail of 1
        (2, 19, 4, -1, True),  # one group per row
        (3, 19, 3, 64, True),  # group wider than the row
        (2, 19, 3, 19, False),  # group exactly the row
        (3, 9, 8, 2, True),  # 8 bits, tail of 1
        (1, 1, 2, 1, True),  # a single weight
    ],
)
def test_dequantize_matches_naive_loop(out_features, in_features, bits, group_size, offset):
    t = random_bcq(out_features, in_features, bits, group_size, offset, seed=out_features * in_features + bits)
    ref = naive_dequantize(t)
    got = t.dequantize()
    assert got.dtype == torch.float32 and got.shape == (out_features, in_features)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_dequantize_dtype_argument():
    t = random_bcq(3, 19, 3, 8)
    ref = t.dequantize()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        got = t.dequantize(dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)


def test_dequantize_uses_each_rows_own_tail_group():
    """Every row's tail group reads that row's last alpha/offset, never the next row's."""
    out_features, in_features, gs = 3, 10, 4  # groups: cols 0-3, 4-7, 8-9
    signs = torch.ones(1, out_features, in_features, dtype=torch.bool)
    alpha = torch.tensor([[[1.0], [2.0], [3.0]], [[10.0], [20.0], [30.0]], [[100.0], [200.0], [300.0]]])
    offset = torch.tensor([[0.5, 0.25, 0.125], [5.0, 2.5, 1.25], [50.0, 25.0, 12.5]])
    t = BCQTensor.from_codes(signs, alpha, offset, gs)
    w = t.dequantize()
    for r in range(out_features):
        expected = [alpha[r, c // gs, 0] + offset[r, c // gs] for c in range(in_features)]
        assert w[r].tolist() == pytest.approx([float(e) for e in expected])


# --------------------------------------------------------------------------- grouping


@pytest.mark.parametrize(
    "in_features,group_size,expected",
    [(72, 32, 3), (64, 32, 2), (72, -1, 1), (72, 128, 1), (72, 72, 1), (1, 1, 1), (10, 3, 4), (0, 32, 0)],
)
def test_num_groups(in_features, group_size, expected):
    assert num_groups(in_features, group_size) == expected


def test_group_index():
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert group_index(5, -1).tolist() == [0] * 5
    assert group_index(5, 100).tolist() == [0] * 5
    idx = group_index(72, 32)
    assert idx.dtype == torch.int64 and idx.shape == (72,)
    assert int(idx.max()) + 1 == num_groups(72, 32)
    assert effective_group_size(72, 32) == 32
    assert effective_group_size(72, -1) == 72
    assert effective_group_size(72, 100) == 72


@pytest.mark.parametrize("bad", [0, -2, -100, 1.5, "32", None, True])
def test_invalid_group_sizes(bad):
    with pytest.raises(UnibcqError):
        validate_group_size(bad)
    with pytest.raises(UnibcqError):
        num_groups(72, bad)
    with pytest.raises(UnibcqError):
        group_index(72, bad)


# --------------------------------------------------------------------------- size accounting


def test_bits_per_weight_hand_formula():
    out_features, in_features, bits, gs = 5, 75, 3, 32
    t = random_bcq(out_features, in_features, bits, gs)
    groups = 3
    expected = bits * math.ceil(in_features / 8) * 8 / in_features + 16 * (bits + 1) * groups / in_features
    assert t.bits_per_weight == pytest.approx(expected, rel=1e-12)
    assert t.bits_per_weight == pytest.approx(5.76, rel=1e-12)
    assert t.nbytes == 3 * 5 * 10 + 2 * 5 * 3 * 3 + 2 * 5 * 3
    # Without offset: bits * (padded bytes) + 16 * bits per group.
    t0 = random_bcq(out_features, in_features, bits, gs, offset=False)
    expected0 = bits * math.ceil(in_features / 8) * 8 / in_features + 16 * bits * groups / in_features
    assert t0.bits_per_weight == pytest.approx(expected0, rel=1e-12)


@pytest.mark.parametrize("bits,gs,in_features", [(2, 128, 4096), (4, -1, 64), (1, 8, 8), (8, 64, 100)])
def test_bits_per_weight_general(bits, gs, in_features):
    t = random_bcq(2, in_features, bits, gs)
    groups = num_groups(in_features, gs)
    expected = bits * math.ceil(in_features / 8) * 8 / in_features + 16 * (bits + 1) * groups / in_features
    assert t.bits_per_weight == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- groups stay in rows


def _row_scaled_matrix(out_features=7, in_features=72, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([10.0**k for k in range(-3, 4)])[:out_features]
    return torch.randn(out_features, in_features, generator=gen) * scales[:, None]


@pytest.mark.parametrize("group_size", [32, 40, -1])
@pytest.mark.parametrize(
    "quantize",
    [
        lambda w, gs: quantize_rtn(w, 3, gs),
        lambda w, gs: quantize_bcq(w, 3, gs, "greedy"),
        lambda w, gs: quantize_bcq(w, 3, gs, "alternating", iters=3),
    ],
    ids=["rtn", "bcq-greedy", "bcq-alternating"],
)
def test_groups_never_span_rows(quantize, group_size):
    """Rows with scales 1e-3 .. 1e3: each row is reconstructed with its own scales."""
    w = _row_scaled_matrix()
    w_hat = quantize(w, group_size).dequantize()
    row_err = (w_hat - w).norm(dim=1) / w.norm(dim=1)
    assert (row_err < 0.35).all(), row_err
    # Quantizing the matrix equals quantizing each row on its own.
    for r in range(w.shape[0]):
        alone = quantize(w[r : r + 1], group_size).dequantize()
        torch.testing.assert_close(w_hat[r : r + 1], alone, rtol=1e-3, atol=0)


def test_signs_of_plus_and_minus_one_are_refused_not_read_as_all_plus():
    signs = torch.tensor([[[1.0, -1.0] * 4]])
    with pytest.raises(UnibcqError, match="signs must be a bool tensor"):
        BCQTensor.from_codes(signs, torch.ones(1, 1, 1), None, 8)
