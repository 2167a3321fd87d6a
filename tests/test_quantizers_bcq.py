"""Binary-coding quantization: greedy, refined greedy and alternating."""

from __future__ import annotations

import itertools

import pytest
import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor, group_index, num_groups
from unibcq.quantizers import quantize_bcq, quantize_rtn
from unibcq.quantizers.bcq import (
    alternate,
    bcq_greedy_groups,
    bcq_refined_groups,
    greedy_codes,
    least_squares_scales,
    nearest_codes,
    reconstruct,
    sign_patterns,
)

ALGORITHMS = ("greedy", "refined", "alternating")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_error(w: torch.Tensor, t: BCQTensor) -> float:
    return float((t.dequantize() - w).norm() / w.norm())


# --------------------------------------------------------------------------- error ordering


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_alternating_le_refined_le_greedy(bits, offset, group_size):
    w = randn(24, 72, seed=10 * bits + group_size % 7)
    errs = {a: rel_error(w, quantize_bcq(w, bits, group_size, a, offset=offset)) for a in ALGORITHMS}
    slack = 1 + 1e-4
    assert errs["refined"] <= errs["greedy"] * slack, errs
    assert errs["alternating"] <= errs["refined"] * slack, errs
    # Sanity: every error is a real, sub-100% error.
    assert all(0 <= e < 1 for e in errs.values()), errs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_error_decreases_with_bits(algorithm):
    w = randn(16, 64, seed=3)
    errs = [rel_error(w, quantize_bcq(w, b, 32, algorithm, iters=5)) for b in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


# --------------------------------------------------------------------------- 1-bit closed form


@pytest.mark.parametrize("group_size", [32, -1, 16])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_bit_without_offset_is_closed_form(algorithm, group_size):
    """1 bit, no offset: the optimum is alpha = mean|w| per group, b = sign(w)."""
    w = randn(10, 72, seed=4)  # 72 = 2 * 32 + 8: a tail group per row at gs 32
    t = quantize_bcq(w, 1, group_size, algorithm, offset=False)
    assert t.offset is None and t.bits == 1
    idx = group_index(72, group_size)
    groups = num_groups(72, group_size)
    mean_abs = torch.stack([w[:, idx == g].abs().mean(1) for g in range(groups)], 1)
    # Greedy stores the closed form's alpha (rounded to fp16); LS solvers agree to ~ridge precision.
    atol = 0 if algorithm == "greedy" else 1e-3
    torch.testing.assert_close(t.alpha[:, :, 0].float(), mean_abs.half().float(), rtol=1e-3, atol=atol)
    if algorithm == "greedy":
        assert torch.equal(t.alpha[:, :, 0], mean_abs.half())
    signs = t.signs()[0]
    assert torch.equal(signs, torch.where(w > 0, 1.0, -1.0))
    expected = torch.sign(w) * mean_abs.half().float().index_select(1, idx)
    torch.testing.assert_close(t.dequantize(), expected, rtol=1e-3, atol=1e-4)


def test_one_bit_greedy_is_optimal_against_alternatives():
    """No other 1-bit offset-free scale does better than the closed form."""
    w = randn(4, 40, seed=8)
    err = (quantize_bcq(w, 1, -1, "greedy", offset=False).dequantize() - w).pow(2).sum(1)
    base = w.abs().mean(1, keepdim=True)
    for factor in (0.9, 0.97, 1.03, 1.1):
        other = (torch.sign(w) * base * factor - w).pow(2).sum(1)
        assert (err <= other + 1e-6).all()


# --------------------------------------------------------------------------- exact recovery


def exactly_representable(bits: int, rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sum_i alpha_i b_i + o with random +-1 planes and super-increasing fp16-exact alphas.

    alpha_i = sum_{j<i} alpha_j + (1 + d_i) e, d_i in {1/16, 1/8}, e a power of two per row,
    so the 2^n levels are distinct and nearly (not exactly) uniformly spaced. The offset puts
    the lowest level at 0. All values are exact in fp16 and float32.
    """
    gen = torch.Generator().manual_seed(seed)
    signs = torch.rand(bits, rows, width, generator=gen) < 0.5
    e = 2.0 ** torch.randint(-4, 1, (rows, 1), generator=gen).float()
    alphas: list[torch.Tensor] = []
    for _ in range(bits):
        d = torch.tensor([0.0625, 0.125])[torch.randint(0, 2, (rows, 1), generator=gen)]
        alphas.append(sum(alphas, torch.zeros(rows, 1)) + (1 + d) * e)
    alpha = torch.stack(alphas, -1)
    offset = alpha.sum(-1)
    t = BCQTensor.from_codes(signs, alpha, offset, -1)
    assert torch.equal(t.alpha.float(), alpha) and torch.equal(t.offset.float(), offset)
    return t.dequantize(), alpha


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alternating_recovers_exactly_representable_matrix(bits, seed):
    w, _ = exactly_representable(bits, 8, 256, seed * 10 + bits)
    t = quantize_bcq(w, bits, -1, "alternating")
    assert (t.dequantize() - w).abs().max() <= 1e-5 * w.abs().max()
    assert rel_error(w, t) < 1e-6


def test_exact_recovery_through_groups():
    """Four exactly representable 256-wide groups per row, quantized with group_size 256."""
    w, _ = exactly_representable(3, 16, 256, 42)
    w = w.reshape(4, 1024)  # each row = 4 independent exactly-representable groups of 256
    t = quantize_bcq(w, 3, 256, "alternating")
    assert rel_error(w, t) < 1e-6


# --------------------------------------------------------------------------- nearest codes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("with_offset", [True, False])
def test_nearest_codes_matches_exhaustive_search(bits, with_offset):
    gen = torch.Generator().manual_seed(bits * 2 + with_offset)
    rows, width = 12, 50
    x = torch.randn(rows, width, generator=gen) * 2
    alpha = torch.randn(rows, bits, generator=gen)  # any sign, any order
    alpha[0] = alpha[0].abs()
    offset = torch.randn(rows, generator=gen) if with_offset else None
    # Include exact levels and the midpoints between levels (ties) among the inputs.
    patterns = sign_patterns(bits)
    levels = alpha @ patterns.T + (offset[:, None] if offset is not None else 0)
    x[:, 0] = levels[:, 0]
    x[:, 1] = levels.max(1).values + 5  # beyond the top level
    x[:, 2] = levels.min(1).values - 5  # below the bottom level
    sorted_levels = levels.sort(1).values
    x[:, 3] = (sorted_levels[:, 0] + sorted_levels[:, 1]) / 2  # a tie between two levels
    b = nearest_codes(x, alpha, offset)
    assert b.shape == (rows, width, bits)
    assert set(b.unique().tolist()) <= {-1.0, 1.0}
    got = (x - reconstruct(b, alpha, offset)).abs()
    best = (x[:, :, None] - levels[:, None, :]).abs().min(-1).values
    torch.testing.assert_close(got, best, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
@pytest.mark.parametrize("with_offset", [True, False])
def test_least_squares_scales_match_a_dense_solve(bits, with_offset):
    x = randn(20, 33, seed=bits) * 3
    b = torch.where(randn(20, 33, bits, seed=bits + 10) > 0, 1.0, -1.0)
    alpha, offset = least_squares_scales(x, b, with_offset)
    design = b.double()
    if with_offset:
        design = torch.cat([design, torch.ones_like(design[..., :1])], dim=-1)
    expected = torch.linalg.lstsq(design, x.double().unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(alpha.double(), expected[:, :bits], rtol=1e-4, atol=1e-5)
    if with_offset:
        torch.testing.assert_close(offset.double(), expected[:, bits], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("with_offset", [True, False])
def test_alternate_equals_running_every_group_every_round(bits, with_offset):
    """Dropping converged groups from the working set must not change any group's result."""
    x = randn(300, 64, seed=bits)
    start = greedy_codes(x, bits, with_offset)[0]
    (b, alpha, offset), err = alternate(x, start, with_offset, iters=12)
    ref_b = start
    ref_alpha, ref_offset = least_squares_scales(x, ref_b, with_offset)
    ref_err = (x - reconstruct(ref_b, ref_alpha, ref_offset)).pow(2).sum(1)
    for _ in range(12):
        cand_b = nearest_codes(x, ref_alpha, ref_offset)
        ref_alpha, ref_offset = least_squares_scales(x, cand_b, with_offset)
        ref_err = torch.minimum(ref_err, (x - reconstruct(cand_b, ref_alpha, ref_offset)).pow(2).sum(1))
    torch.testing.assert_close(err, ref_err, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((x - reconstruct(b, alpha, offset)).pow(2).sum(1), err, rtol=1e-4, atol=1e-4)


def test_sign_patterns_enumerate_all_vectors():
    for bits in range(1, 6):
        p = sign_patterns(bits)
        assert p.shape == (2**bits, bits)
        assert len({tuple(r) for r in p.tolist()}) == 2**bits
        assert set(itertools.chain.from_iterable(p.tolist())) == {-1.0, 1.0}


# --------------------------------------------------------------------------- alternating options


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("offset", [True, False])
def test_alternating_inits(bits, offset):
    w = randn(16, 72, seed=bits)
    plain = quantize_bcq(w, bits, 32, "alternating", offset=offset, init="greedy")
    both = quantize_bcq(w, bits, 32, "alternating", offset=offset)  # default greedy+uniform
    explicit = quantize_bcq(w, bits, 32, "alternating", offset=offset, init="greedy+uniform")
    for t in (plain, both):
        assert isinstance(t, BCQTensor) and t.bits == bits and t.shape == (16, 72)
        assert torch.isfinite(t.dequantize()).all()
        assert (t.offset is not None) == offset
    assert torch.equal(both.dequantize(), explicit.dequantize())
    # The default keeps each group's better run, so it is never (meaningfully) worse.
    assert rel_error(w, both) <= rel_error(w, plain) * (1 + 1e-4)
    greedy = quantize_bcq(w, bits, 32, "greedy", offset=offset)
    assert rel_error(w, plain) <= rel_error(w, greedy) * (1 + 1e-4)


def test_alternating_zero_iterations_is_refined_plus_one_code_pick():
    w = randn(8, 64, seed=9)
    t0 = quantize_bcq(w, 3, 32, "alternating", iters=0, init="greedy")
    refined = quantize_bcq(w, 3, 32, "refined")
    assert torch.equal(t0.alpha, refined.alpha)  # the pick changes codes, not the refit scales
    assert rel_error(w, t0) < rel_error(w, refined)


@pytest.mark.parametrize("offset", [True, False])
def test_greedy_and_refined_keep_greedys_residual_sign_codes(offset):
    """Guo et al.'s codes: plane i is the sign of the residual the planes before it left,
    never re-picked as the nearest level (that would be a step of alternating)."""
    x = randn(12, 32, seed=3)
    expected, _, _ = greedy_codes(x, 3, offset)
    assert torch.equal(bcq_greedy_groups(x, 3, offset).signs, expected > 0)
    refined = bcq_refined_groups(x, 3, offset)
    alpha, _ = least_squares_scales(x, expected, offset)
    flip = (alpha < 0)[:, None, :]
    assert torch.equal(refined.signs, (expected > 0) ^ flip)


def test_unknown_init_and_algorithm_rejected():
    w = randn(4, 16)
    with pytest.raises(UnibcqError, match="init"):
        quantize_bcq(w, 2, 8, "alternating", init="uniform")
    with pytest.raises(UnibcqError, match="algorithm"):
        quantize_bcq(w, 2, 8, "gptq")


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_bcq_bits_validation(bits):
    with pytest.raises(UnibcqError):
        quantize_bcq(randn(4, 16), bits, 8)


@pytest.mark.parametrize("group_size", [0, -2])
def test_bcq_group_size_validation(group_size):
    with pytest.raises(UnibcqError):
        quantize_bcq(randn(4, 16), 2, group_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bcq_non_finite_rejected(bad):
    w = randn(4, 16)
    w[0, 0] = bad
    with pytest.raises(UnibcqError):
        quantize_bcq(w, 2, 8)


# --------------------------------------------------------------------------- stored form


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_alpha_stored_non_negative(algorithm, offset, bits):
    w = randn(12, 72, seed=bits) - 0.3  # skewed so fits produce negative raw scales
    t = quantize_bcq(w, bits, 32, algorithm, offset=offset, iters=5)
    assert t.alpha.dtype == torch.float16
    assert (t.alpha >= 0).all()
    assert t.planes.shape == (bits, 12, 9)
    assert t.alpha.shape == (12, 3, bits)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_and_constant_rows(algorithm):
    w = randn(4, 40, seed=1)
    w[0] = 0.0
    w[1] = 0.7
    w[2, 32:] = -1.5
    for offset in (True, False):
        t = quantize_bcq(w, 3, 32, algorithm, offset=offset, iters=5)
        w_hat = t.dequantize()
        assert torch.isfinite(w_hat).all()
        assert torch.equal(w_hat[0], torch.zeros(40))
        torch.testing.assert_close(w_hat[1], w[1], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(w_hat[2, 32:], w[2, 32:], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- versus RTN


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
def test_alternating_never_worse_than_rtn(bits, group_size):
    """The default init includes the min-max uniform grid, so alternating <= RTN."""
    for seed in range(2):
        w = randn(16, 72, seed=100 + seed) * (1 + randn(16, 1, seed=seed).abs())
        rtn = rel_error(w, quantize_rtn(w, bits, group_size))
        alt = rel_error(w, quantize_bcq(w, bits, group_size, "alternating", offset=True))
        assert alt <= rtn * (1 + 1e-4), (alt, rtn)


def test_alternating_never_worse_than_rtn_per_group():
    bits, gs = 4, 32
    w = randn(32, 64, seed=11)
    rtn = quantize_rtn(w, bits, gs).dequantize()
    alt = quantize_bcq(w, bits, gs, "alternating").dequantize()
    e_rtn = (rtn - w).pow(2).reshape(32, 2, 32).sum(-1)
    e_alt = (alt - w).pow(2).reshape(32, 2, 32).sum(-1)
    # Per group, up to fp16 rounding of the stored scales.
    assert (e_alt <= e_rtn * (1 + 1e-3) + 1e-9).all()
