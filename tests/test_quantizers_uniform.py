"""Round-to-nearest uniform quantization and its exact storage as BCQ."""

from __future__ import annotations

import math

import pytest
import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor, group_index
from unibcq.quantizers import quantize_rtn
from unibcq.quantizers.uniform import (
    dequantize_grid,
    lp_error,
    minmax_params,
    quantize_to_grid,
    search_clipping,
    uniform_to_bcq,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def stored_scale(t: BCQTensor) -> torch.Tensor:
    """Per-group step s, read back from the stored alphas (alpha_0 = s / 2)."""
    return 2 * t.alpha[:, :, 0].float()


def per_column(t: BCQTensor, per_group: torch.Tensor) -> torch.Tensor:
    """Expand an (out, groups) tensor to (out, in)."""
    return per_group.index_select(1, group_index(t.shape[1], t.group_size))


# --------------------------------------------------------------------------- exact BCQ form


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_as_bcq_is_exact(bits):
    gen = torch.Generator().manual_seed(bits)
    rows, width = 24, 37
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (rows, width), generator=gen).float()
    scale = 2.0 ** torch.randint(-6, 3, (rows,), generator=gen).float()
    zero = torch.randint(0, maxq + 1, (rows,), generator=gen).float()
    codes = uniform_to_bcq(q, scale, zero, bits)
    assert codes.signs.shape == (rows, width, bits) and codes.signs.dtype == torch.bool
    assert codes.alpha.shape == (rows, bits) and codes.offset.shape == (rows,)
    t = BCQTensor.from_codes(codes.signs.permute(2, 0, 1), codes.alpha[:, None, :], codes.offset[:, None], -1)
    expected = scale[:, None] * (q - zero[:, None])
    assert torch.equal(t.dequantize(), expected)
    # alpha_j = s * 2^(j-1): non-negative, doubling.
    assert (t.alpha >= 0).all()
    assert torch.equal(t.alpha[..., 1:].float(), 2 * t.alpha[..., :-1].float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_stored_uniform_grid_is_off_only_by_the_fp16_rounding_of_the_offset(bits):
    """With scales that are not powers of two the fp16 offset s * (c - z) is rounded: the
    stored grid may shift by at most half an fp16 ulp of the offset, never more."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 128, generator=gen) * 0.02
    scale, zero = minmax_params(x, bits, symmetric=False)
    q = quantize_to_grid(x, scale, zero, bits)
    codes = uniform_to_bcq(q, scale, zero, bits)
    t = BCQTensor.from_codes(codes.signs.permute(2, 0, 1), codes.alpha[:, None, :], codes.offset[:, None], -1)
    shift = (t.dequantize() - scale[:, None] * (q - zero[:, None])).abs().amax(1)
    assert (shift <= codes.offset.abs() * 2.0**-11 + 1e-12).all()


def test_uniform_as_bcq_with_grouping_is_exact():
    """Same check through several groups per row and a tail group."""
    bits, out_features, in_features, gs = 3, 6, 21, 8
    gen = torch.Generator().manual_seed(7)
    groups = 3
    q = torch.randint(0, 8, (out_features, in_features), generator=gen).float()
    scale = 2.0 ** torch.randint(-4, 2, (out_features, groups), generator=gen).float()
    zero = torch.randint(0, 8, (out_features, groups), generator=gen).float()
    signs, alpha, offset = [], [], []
    for g in range(groups):
        cols = slice(g * gs, min((g + 1) * gs, in_features))
        c = uniform_to_bcq(q[:, cols], scale[:, g], zero[:, g], bits)
        signs.append(c.signs)
        alpha.append(c.alpha)
        offset.append(c.offset)
    t = BCQTensor.from_codes(
        torch.cat(signs, 1).permute(2, 0, 1), torch.stack(alpha, 1), torch.stack(offset, 1), gs
    )
    idx = group_index(in_features, gs)
    expected = scale[:, idx] * (q - zero[:, idx])
    assert torch.equal(t.dequantize(), expected)


# --------------------------------------------------------------------------- RTN error bounds


def _check_half_step(w, t, bits, symmetric):
    w_hat = t.dequantize()
    s = per_column(t, stored_scale(t))
    # fp16 storage: the offset is rounded (<= 2^-11 relative to |offset| <= s 2^(n-1)) and the
    # step s is rounded, which moves the grid's far end by up to (2^n - 1) s 2^-11.
    fp16_slack = s * 2.0 ** (bits - 10)
    tol = s / 2 + fp16_slack + 1e-7
    # Non-clipped: the value lies within half a step of the grid's range. The min-max grid
    # covers every value, so nothing is clipped beyond fp16 rounding.
    offset = per_column(t, t.offset.float())
    alpha_sum = per_column(t, t.alpha.float().sum(-1))
    lo, hi = offset - alpha_sum, offset + alpha_sum
    inside = (w >= lo - s / 2 - fp16_slack) & (w <= hi + s / 2 + fp16_slack)
    assert inside.all()
    err = (w - w_hat).abs()
    assert (err[inside] <= tol[inside]).all(), (err - tol)[inside].max()
    # Every reconstructed value is a grid level: (w_hat - lo) / s is an integer in 0..2^n-1.
    k = (w_hat - lo) / s
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert k.round().min() >= 0 and k.round().max() <= 2**bits - 1


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_at_most_half_step(bits, group_size, symmetric):
    w = randn(16, 72, seed=bits) * 0.1 + 0.02
    t = quantize_rtn(w, bits, group_size, symmetric=symmetric)
    assert t.bits == bits and t.shape == (16, 72) and t.group_size == group_size
    _check_half_step(w, t, bits, symmetric)


def test_rtn_matches_manual_grid():
    """RTN stored as BCQ equals s * (clamp(round(w/s + z)) - z) computed directly."""
    bits, gs = 3, 16
    w = randn(4, 48, seed=3)
    t = quantize_rtn(w, bits, gs)
    x = w.reshape(-1, gs)
    scale, zero = minmax_params(x, bits, symmetric=False)
    expected = dequantize_grid(quantize_to_grid(x, scale, zero, bits), scale, zero).reshape(4, 48)
    # Only the fp16 offset separates the two.
    torch.testing.assert_close(t.dequantize(), expected, rtol=0, atol=float(scale.max()) * 2.0**-8)


def test_symmetric_vs_asymmetric():
    bits = 3
    w = randn(8, 64, seed=1)
    sym = quantize_rtn(w, bits, 32, symmetric=True)
    asym = quantize_rtn(w, bits, 32, symmetric=False)
    # Symmetric: zero point 2^(n-1), so offset = s * ((2^n - 1) / 2 - 2^(n-1)) = -s / 2.
    assert torch.equal(sym.offset.float(), -sym.alpha[:, :, 0].float())
    # Symmetric step covers max|w| on both sides: s = 2 max|w| / (2^n - 1).
    x = w.reshape(-1, 32)
    s_expected = (2 * x.abs().max(1).values / (2**bits - 1)).half().float().reshape(8, 2)
    assert torch.equal(stored_scale(sym), s_expected)
    # On one-sided data the asymmetric grid is much better than the symmetric one.
    pos = w.abs() + 1.0
    e_sym = (quantize_rtn(pos, bits, 32, symmetric=True).dequantize() - pos).norm()
    e_asym = (quantize_rtn(pos, bits, 32, symmetric=False).dequantize() - pos).norm()
    assert e_asym < 0.75 * e_sym
    assert not torch.equal(sym.dequantize(), asym.dequantize())


# --------------------------------------------------------------------------- clipping search


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_worse_per_group(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    # Heavy tails so clipping helps in many groups.
    x = torch.randn(64, 32, generator=gen) ** 3
    p = 2.4
    s0, z0 = minmax_params(x, bits, symmetric)
    e0 = lp_error(x, dequantize_grid(quantize_to_grid(x, s0, z0, bits), s0, z0), p)
    s1, z1 = search_clipping(x, bits, symmetric, p)
    e1 = lp_error(x, dequantize_grid(quantize_to_grid(x, s1, z1, bits), s1, z1), p)
    assert (e1 <= e0).all()
    assert (e1 < e0 * 0.99).any()  # the search actually finds something on heavy tails


@pytest.mark.parametrize("group_size", [32, -1])
def test_clip_search_stored_weights_never_worse(group_size):
    bits, p = 3, 2.4
    w = randn(12, 72, seed=5) ** 3
    plain = quantize_rtn(w, bits, group_size, clip_search=False)
    clipped = quantize_rtn(w, bits, group_size, clip_search=True, p=p)
    idx = group_index(72, group_size)
    groups = int(idx.max()) + 1

    def group_err(t):
        e = (w - t.dequantize()).abs().pow(p)
        return torch.stack([e[:, idx == g].sum(1) for g in range(groups)], 1)

    e_plain, e_clip = group_err(plain), group_err(clipped)
    # Slack for the fp16 offset, which the search does not see.
    assert (e_clip <= e_plain * (1 + 1e-3) + 1e-6).all()
    assert e_clip.sum() < e_plain.sum()


# --------------------------------------------------------------------------- degenerate rows


@pytest.mark.parametrize(
    "bits,clip_search", [(b, False) for b in range(1, 9)] + [(1, True), (4, True), (8, True)]
)
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_and_zero_rows(bits, group_size, symmetric, clip_search):
    w = randn(6, 40, seed=2)
    w[0] = 0.0
    w[1] = 0.3
    w[2] = -2.0
    w[3, :32] = 0.0  # one zero group, one random tail
    w[4] = 1e-6
    t = quantize_rtn(w, bits, group_size, symmetric=symmetric, clip_search=clip_search)
    w_hat = t.dequantize()
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[0], torch.zeros(40))
    if group_size == 32:
        assert torch.equal(w_hat[3, :32], torch.zeros(32))
    # Constant rows are reproduced to within half a step (+ fp16 offset rounding).
    s = per_column(t, stored_scale(t))
    tol = s * (0.5 + 2.0 ** (bits - 11)) + 1e-6
    for r in (1, 2, 4):
        assert ((w_hat[r] - w[r]).abs() <= tol[r]).all(), (r, w_hat[r], w[r])


def test_constant_row_exact_when_representable():
    """A constant positive row at 4 bits is the top grid level: reproduced to fp16 precision."""
    w = torch.full((2, 16), 0.75)
    w_hat = quantize_rtn(w, 4, -1).dequantize()
    torch.testing.assert_close(w_hat, w, rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, "3", None, True, 16])
def test_bits_validation(bits):
    with pytest.raises(UnibcqError) as info:
        quantize_rtn(randn(4, 16), bits, 8)
    assert "bits" in str(info.value)


@pytest.mark.parametrize("group_size", [0, -2, -64])
def test_group_size_validation(group_size):
    with pytest.raises(UnibcqError) as info:
        quantize_rtn(randn(4, 16), 3, group_size)
    assert "group size" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_rejected(bad):
    w = randn(4, 16)
    w[2, 5] = bad
    with pytest.raises(UnibcqError) as info:
        quantize_rtn(w, 3, 8)
    assert "NaN" in str(info.value) or "inf" in str(info.value)


@pytest.mark.parametrize("shape", [(16,), (2, 3, 4), (0, 8), (4, 0)])
def test_bad_shapes_rejected(shape):
    with pytest.raises(UnibcqError):
        quantize_rtn(torch.zeros(shape), 3, 8)


def test_other_float_dtypes_accepted():
    w = randn(4, 40)
    ref = quantize_rtn(w, 3, 16).dequantize()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        got = quantize_rtn(w.to(dtype), 3, 16).dequantize()
        assert torch.isfinite(got).all()
        assert (got - w).abs().max() <= (ref - w).abs().max() * 1.5 + 0.05
    assert math.isfinite(quantize_rtn(w, 3, 16).bits_per_weight)
