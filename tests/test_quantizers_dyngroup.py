"""Tests for the dynamic-grouping binary quantizer (unibcq.quantizers.dyngroup)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from unibcq.errors import UnibcqError
from unibcq.quantizers.dyngroup import (
    PrefixSums,
    dyngroup_quantize,
    normalized_lambda,
    run_cost,
    segment_dp,
    segment_greedy,
    segment_windowed,
    segmentation_objective,
)

from dyngroup_reference import bits_per_weight

ALGORITHMS = ("windowed", "greedy", "dp")
GRANULARITIES = ("matrix", "row", ("block", 3))


def _objective(values: np.ndarray, bounds, lam: float) -> float:
    """J computed the slow, obvious way: per-run population variance."""
    return sum(
        (j - i) * float(np.var(values[i:j])) + lam / (j - i) for i, j in zip(bounds[:-1], bounds[1:])
    )


def _brute_force(values: np.ndarray, max_groups: int, lam: float, cuts=None) -> float:
    """Minimum of J over every segmentation with at most max_groups runs."""
    n = values.size
    inner = sorted({c for c in (range(1, n) if cuts is None else cuts) if 0 < c < n})
    best = math.inf
    for k in range(min(max_groups, n)):
        for chosen in itertools.combinations(inner, k):
            best = min(best, _objective(values, (0, *chosen, n), lam))
    return best


def _naive_greedy(values: np.ndarray, max_groups: int, lam: float, rule: str = "objective") -> list[int]:
    """The greedy merge without a heap: rescan all adjacent pairs before every merge.

    rule="objective" ranks a pair by the change of J, "paper" by the merged run's cost."""
    runs = [[v] for v in values]

    def cost(run):
        return len(run) * float(np.var(run)) + lam / len(run)

    while len(runs) > 1:
        if rule == "paper":
            keys = [cost(a + b) for a, b in zip(runs[:-1], runs[1:])]
        else:
            keys = [cost(a + b) - cost(a) - cost(b) for a, b in zip(runs[:-1], runs[1:])]
        i = int(np.argmin(keys))
        if len(runs) <= max_groups and (rule == "paper" or keys[i] >= 0):
            break
        runs[i : i + 2] = [runs[i] + runs[i + 1]]
    return [0, *itertools.accumulate(len(r) for r in runs)]


def _sorted_abs(n: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).abs()
    if ties:
        x = torch.round(x * 3) / 3
    return x.sort().values


# --------------------------------------------------------------------------- run costs


def test_run_cost_matches_direct_variance():
    x = _sorted_abs(50, 0)
    prefix = PrefixSums.of(x)
    i = torch.tensor([0, 3, 10, 49])
    j = torch.tensor([50, 4, 30, 50])
    got = run_cost(prefix, i, j, 0.5)
    want = [(b - a) * float(x[a:b].var(unbiased=False)) + 0.5 / (b - a) for a, b in zip(i.tolist(), j.tolist())]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert float(run_cost(prefix, 2, 7, 0.0)) == pytest.approx(5 * float(x[2:7].var(unbiased=False)))
    with pytest.raises(UnibcqError):
        run_cost(prefix, 4, 4, 0.0)


# --------------------------------------------------------------------------- exact DP


@pytest.mark.parametrize("ties", [False, True])
def test_dp_equals_brute_force(ties):
    rng = np.random.default_rng(1 if ties else 0)
    for trial in range(60):
        n = int(rng.integers(1, 11))
        x = _sorted_abs(n, 100 + trial, ties=ties)
        for max_groups in (1, 2, 3, 5, 12):
            for lam in (0.0, 0.01, 0.3, 5.0):
                bounds = segment_dp(x, max_groups, lam)
                assert bounds.dtype == torch.int64
                assert bounds[0] == 0 and bounds[-1] == n and (bounds.diff() > 0).all()
                assert bounds.numel() - 1 <= max_groups
                got = segmentation_objective(x, bounds, lam)
                assert got == pytest.approx(_brute_force(x.numpy(), max_groups, lam), rel=1e-9, abs=1e-12)


def test_dp_with_atoms_is_exact_over_atom_boundaries():
    x = _sorted_abs(10, 7, ties=True)
    for atoms in ([3, 6, 8], [5], [0, 10, 2, 2, 9]):
        for max_groups, lam in ((2, 0.0), (3, 0.2), (4, 2.0)):
            bounds = segment_dp(x, max_groups, lam, atoms=torch.tensor(atoms))
            assert set(bounds.tolist()) <= set(atoms) | {0, 10}
            got = segmentation_objective(x, bounds, lam)
            assert got == pytest.approx(_brute_force(x.numpy(), max_groups, lam, cuts=atoms), rel=1e-9, abs=1e-12)


def test_dp_large_lambda_uses_fewer_groups():
    x = _sorted_abs(40, 3)
    assert segment_dp(x, 8, 1e6).tolist() == [0, 40]
    assert segment_dp(x, 8, 0.0).numel() - 1 == 8


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("rule", ["objective", "paper"])
def test_greedy_matches_naive_reference(rule):
    rng = np.random.default_rng(2)
    for trial in range(40):
        n = int(rng.integers(1, 30))
        x = _sorted_abs(n, 200 + trial)
        max_groups = int(rng.integers(1, 8))
        lam = float(rng.choice([0.0, 0.05, 1.0, 10.0]))
        assert segment_greedy(x, max_groups, lam, rule).tolist() == _naive_greedy(x.numpy(), max_groups, lam, rule)


def test_paper_rule_stops_at_exactly_max_groups():
    """A large lambda makes every merge lower J: the objective rule goes on to one run, the
    authors' rule stops at max_groups; windows of one weight are the greedy merge."""
    x = _sorted_abs(60, 9)
    assert segment_greedy(x, 5, 1e3, "objective").tolist() == [0, 60]
    paper = segment_greedy(x, 5, 1e3, "paper")
    assert paper.numel() - 1 == 5
    assert torch.equal(segment_windowed(x, 5, 1e3, 1, "paper"), paper)
    with pytest.raises(UnibcqError, match="merge rule"):
        segment_greedy(x, 5, 0.0, "fastest")



@pytest.mark.parametrize("algorithm", ["greedy", "windowed", "dp"])
def test_constant_magnitude_rows_get_one_group(algorithm):
    """A zero (pruned) row or a +-c row has variance 0, so its normalised lambda is 0 and every
    merge leaves J unchanged: the merges must still go ahead, since extra groups there only
    cost scales and index bits (the DP keeps the fewer groups on ties too)."""
    torch.manual_seed(0)
    w = torch.randn(3, 4096)
    w[1] = 0.0
    w[2] = torch.where(torch.rand(4096) < 0.5, -0.3, 0.3)
    result = dyngroup_quantize(w, algorithm=algorithm, granularity="row")
    assert result.num_groups[1:].tolist() == [1, 1]
    assert result.num_groups[0] > 1
    assert torch.equal(result.dequantize()[1:], w[1:])

def test_greedy_and_windowed_never_beat_dp():
    for trial in range(20):
        x = _sorted_abs(60 + 7 * trial, 300 + trial, ties=trial % 2 == 1)
        for max_groups, lam in ((1, 0.0), (3, 0.0), (4, 0.1), (8, 1.0), (16, 0.01)):
            best = segmentation_objective(x, segment_dp(x, max_groups, lam), lam)
            for bounds in (
                segment_greedy(x, max_groups, lam),
                segment_windowed(x, max_groups, lam, 4),
                segment_windowed(x, max_groups, lam, 9),
            ):
                assert bounds.numel() - 1 <= max_groups
                assert segmentation_objective(x, bounds, lam) >= best - 1e-9 * max(1.0, abs(best))


def test_greedy_is_close_to_dp_on_normal_weights():
    # Bottom-up merging is a heuristic: on |N(0,1)| samples it lands 5-25 % above the exact
    # optimum (measured over seeds and group budgets), so this guards against regressions
    # rather than promising "a few percent".
    ratios = []
    for seed in range(3):
        x = _sorted_abs(2000, seed)
        for max_groups in (4, 8, 16):
            lam = normalized_lambda(0.75, x.numel(), float(x.var(unbiased=False)), max_groups)
            dp = segmentation_objective(x, segment_dp(x, max_groups, lam), lam)
            greedy = segmentation_objective(x, segment_greedy(x, max_groups, lam), lam)
            ratios.append(greedy / dp)
    assert min(ratios) >= 1.0 - 1e-12
    assert max(ratios) < 1.3
    assert float(np.mean(ratios)) < 1.2


def test_windowed_with_window_one_is_greedy():
    for seed in range(5):
        x = _sorted_abs(300, 400 + seed, ties=seed % 2 == 1)
        for max_groups, lam in ((4, 0.0), (10, 0.5)):
            assert torch.equal(segment_windowed(x, max_groups, lam, 1), segment_greedy(x, max_groups, lam))


def test_windowed_boundaries_fall_on_window_edges():
    x = _sorted_abs(1000, 5)
    bounds = segment_windowed(x, 6, 0.0, 64)
    assert bounds.numel() == 7
    assert all(b % 64 == 0 for b in bounds[:-1].tolist()) and bounds[-1] == 1000


@pytest.mark.parametrize("n", [0, 1, 2])
def test_segmenters_handle_tiny_inputs(n):
    x = _sorted_abs(n, 6)
    for bounds in (segment_dp(x, 4, 0.1), segment_greedy(x, 4, 0.1), segment_windowed(x, 4, 0.1, 3)):
        assert bounds[0] == 0 and bounds[-1] == n
    assert segment_dp(x, 4, 0.0).tolist() == list(range(n + 1))  # no penalty: singletons are exact


# --------------------------------------------------------------------------- dyngroup_quantize


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_objective_recomputed_from_dequantize(algorithm, granularity):
    w = _weight(6, 10, 11)
    res = dyngroup_quantize(w, max_groups=4, lam=0.75, algorithm=algorithm, window=4, granularity=granularity)
    deq = res.dequantize()
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert torch.equal(res.signs, w >= 0)
    assert torch.equal(deq.sign(), torch.where(w >= 0, 1.0, -1.0))
    seg = res.segment_index()
    sse = float(((w.double() - deq.double()) ** 2).sum())
    penalty = 0.0
    for s in range(res.num_groups.numel()):
        sizes = torch.bincount(res.group_index[seg == s], minlength=int(res.num_groups[s]))
        assert torch.equal(sizes, res.group_sizes[s, : sizes.numel()])
        assert (sizes > 0).all() and sizes.numel() == res.num_groups[s] <= 4
        penalty += float(res.lam_effective[s]) * float((1.0 / sizes.double()).sum())
    assert res.objective == pytest.approx(sse + penalty, rel=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_dequantize_error_is_sum_of_group_variances(granularity):
    w = _weight(5, 9, 12)
    res = dyngroup_quantize(w, max_groups=3, algorithm="dp", granularity=granularity)
    seg = res.segment_index()
    expected = 0.0
    for s in range(res.num_groups.numel()):
        for g in range(int(res.num_groups[s])):
            mags = w[(seg == s) & (res.group_index == g)].abs().double()
            expected += mags.numel() * float(mags.var(unbiased=False))
            assert float(res.scales[s, g]) == pytest.approx(float(mags.mean()), rel=1e-6)
    err = float(((w.double() - res.dequantize().double()) ** 2).sum())
    assert err == pytest.approx(expected, rel=1e-5)


def test_groups_are_magnitude_runs_even_when_ties_are_split():
    # Integer-valued weights: windows of 7 cut through blocks of equal magnitudes, and the
    # groups must still be whole windows (neighbours of equal means merged, since with lam = 0
    # that merge costs nothing) with the assignment following the sorted magnitudes.
    w = torch.randint(-3, 4, (8, 9), generator=torch.Generator().manual_seed(13)).float()
    res = dyngroup_quantize(w, max_groups=100, lam=0.0, algorithm="windowed", window=7, normalize_lambda=False)
    sizes = res.group_sizes[0, : int(res.num_groups[0])].tolist()
    assert sum(sizes) == 72 and all(size % 7 == 0 for size in sizes[:-1])
    means = res.scales[0, : int(res.num_groups[0])].tolist()
    assert all(a < b for a, b in zip(means, means[1:]))
    mags = w.abs()
    for g in range(int(res.num_groups[0]) - 1):
        assert mags[res.group_index == g].max() <= mags[res.group_index == g + 1].min()


def test_group_index_matches_sorted_segmentation():
    w = _weight(7, 8, 14)
    x = w.abs().flatten().sort().values
    res = dyngroup_quantize(w, max_groups=5, lam=0.3, algorithm="dp", normalize_lambda=False)
    bounds = segment_dp(x, 5, 0.3)
    assert res.group_sizes[0].tolist() == bounds.diff().tolist()
    assert res.objective == pytest.approx(segmentation_objective(x, bounds, 0.3), rel=1e-9)


def test_normalised_lambda_is_scale_invariant():
    w = _weight(6, 7, 15)
    a = dyngroup_quantize(w, max_groups=4, lam=0.75, algorithm="dp")
    b = dyngroup_quantize(4.0 * w, max_groups=4, lam=0.75, algorithm="dp")
    assert torch.equal(a.group_index, b.group_index)
    assert b.objective == pytest.approx(16.0 * a.objective, rel=1e-9)
    var = float(w.abs().double().var(unbiased=False))
    assert float(a.lam_effective[0]) == pytest.approx(normalized_lambda(0.75, 42, var, 4), rel=1e-6)
    assert normalized_lambda(0.75, 42, var, 4) == pytest.approx(0.75 * var * 42**2 / 4**4)


def test_raw_lambda_is_used_as_given():
    res = dyngroup_quantize(_weight(3, 4, 16), max_groups=2, lam=0.25, normalize_lambda=False)
    assert res.lam_effective.tolist() == [0.25]


def test_dp_atom_size_restricts_cuts():
    w = _weight(10, 10, 17)
    res = dyngroup_quantize(w, max_groups=4, lam=0.0, algorithm="dp", dp_atom_size=8)
    sizes = res.group_sizes[0].tolist()
    assert all(c % 8 == 0 for c in itertools.accumulate(sizes[:-1]))
    exact = dyngroup_quantize(w, max_groups=4, lam=0.0, algorithm="dp")
    assert res.objective >= exact.objective - 1e-12


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (4, 0), (1, 1), (2, 2)])
def test_empty_and_tiny_matrices(algorithm, granularity, shape):
    w = _weight(*shape, 18)
    res = dyngroup_quantize(w, max_groups=8, algorithm=algorithm, window=1, granularity=granularity)
    assert res.signs.shape == res.group_index.shape == res.dequantize().shape == shape
    assert res.scales.shape[0] == res.num_groups.numel() == res.group_sizes.shape[0]
    assert int(res.group_sizes.sum()) == w.numel() and res.objective >= 0.0
    # N <= max_groups and no penalty: every weight can keep its own scale
    exact = dyngroup_quantize(w, max_groups=8, lam=0.0, algorithm=algorithm, window=1, granularity=granularity)
    assert torch.equal(exact.dequantize(), w) and exact.objective == 0.0


def test_row_granularity_has_one_segment_per_row():
    w = _weight(5, 40, 19)
    res = dyngroup_quantize(w, max_groups=3, granularity="row", window=4)
    assert res.scales.shape == (5, 3) and res.num_groups.tolist() == [3] * 5
    assert res.group_sizes.sum(dim=1).tolist() == [40] * 5
    blocks = dyngroup_quantize(w, max_groups=3, granularity=("block", 16), window=4)
    assert blocks.group_sizes.sum(dim=1).tolist() == [80, 80, 40]


def test_weight_dtypes_and_input_untouched():
    w = _weight(4, 6, 20)
    before = w.clone()
    r32 = dyngroup_quantize(w, max_groups=3, algorithm="dp")
    r16 = dyngroup_quantize(w.to(torch.bfloat16), max_groups=3, algorithm="dp")
    r64 = dyngroup_quantize(w.double(), max_groups=3, algorithm="dp")
    assert torch.equal(w, before)
    assert r16.dequantize().dtype == r64.dequantize().dtype == torch.float32
    assert torch.equal(r32.group_index, r64.group_index)


# --------------------------------------------------------------------------- bits


def test_bits_per_weight_matrix_example():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 10.0, -10.0]])
    res = dyngroup_quantize(w, max_groups=2, lam=0.01, algorithm="dp", normalize_lambda=False)
    assert res.group_sizes.tolist() == [[6, 2]]
    bits = bits_per_weight(res)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # 0.811278...
    assert bits["paper"] == pytest.approx(1 + 16 * 2 / 8)  # 5
    assert bits["fixed"] == pytest.approx(1 + 1 + 16 * 2 / 8)  # 6
    assert bits["entropy"] == pytest.approx(1 + h + 16 * 2 / 8)  # 5.811278


def test_bits_per_weight_row_example():
    # Row 0 splits into sizes (3, 1), row 1 is one group: G = 3, N = 8; index bits are
    # 1 bit for row 0's four weights and 0 for row 1's.
    w = torch.tensor([[1.0, 1.0, -1.0, 5.0], [2.0, -2.0, 2.0, 2.0]])
    res = dyngroup_quantize(w, max_groups=2, lam=0.01, algorithm="dp", granularity="row", normalize_lambda=False)
    assert res.num_groups.tolist() == [2, 1]
    bits = bits_per_weight(res)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert bits["paper"] == pytest.approx(1 + 16 * 3 / 8)  # 7
    assert bits["fixed"] == pytest.approx(1 + 0.5 + 16 * 3 / 8)  # 7.5
    assert bits["entropy"] == pytest.approx(1 + h / 2 + 16 * 3 / 8)  # 7.405639


def test_bits_per_weight_rejects_empty():
    with pytest.raises(UnibcqError):
        bits_per_weight(dyngroup_quantize(torch.zeros(0, 3)))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_groups": 0}, "max_groups"),
        ({"window": 0}, "window"),
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"algorithm": "kmeans"}, "algorithm"),
        ({"granularity": "column"}, "granularity"),
        ({"granularity": ("block", 0)}, "block"),
        ({"granularity": ("block",)}, "granularity"),
        ({"dp_atom_size": 0}, "dp_atom_size"),
    ],
)
def test_quantize_rejects_bad_parameters(kwargs, match):
    with pytest.raises(UnibcqError, match=match):
        dyngroup_quantize(_weight(2, 3, 21), **kwargs)


@pytest.mark.parametrize(
    "weight",
    [torch.randn(3), torch.randn(2, 2, 2), torch.tensor([[1.0, float("nan")]]), torch.tensor([[float("inf")]])],
)
def test_quantize_rejects_bad_weights(weight):
    with pytest.raises(UnibcqError, match="weight"):
        dyngroup_quantize(weight)


def test_segmenters_reject_bad_input():
    x = _sorted_abs(5, 22)
    with pytest.raises(UnibcqError, match="ascending"):
        segment_dp(x.flip(0), 2, 0.0)
    with pytest.raises(UnibcqError, match="1-D"):
        segment_greedy(x.reshape(1, 5), 2, 0.0)
    with pytest.raises(UnibcqError, match="max_groups"):
        segment_windowed(x, 0, 0.0, 2)
    with pytest.raises(UnibcqError, match="window"):
        segment_windowed(x, 2, 0.0, 0)
    with pytest.raises(UnibcqError, match="lam"):
        segment_greedy(x, 2, -1.0)
    with pytest.raises(UnibcqError, match="atoms"):
        segment_dp(x, 2, 0.0, atoms=torch.tensor([7]))


# --------------------------------------------------------------------------- refinement


@pytest.mark.parametrize("algorithm,window", [("windowed", 64), ("greedy", 1)])
def test_refinement_never_worse_and_close_to_dp(algorithm, window):
    w = torch.randn(40, 50, generator=torch.Generator().manual_seed(3))
    plain = dyngroup_quantize(w, max_groups=16, algorithm=algorithm, window=window)
    refined = dyngroup_quantize(w, max_groups=16, algorithm=algorithm, window=window, refine_sweeps=50)
    exact = dyngroup_quantize(w, max_groups=16, algorithm="dp")
    assert exact.objective <= refined.objective + 1e-9 <= plain.objective + 2e-9
    assert refined.objective <= 1.02 * exact.objective
    assert int(refined.num_groups.sum()) == int(plain.num_groups.sum())


def test_refinement_coarse_to_fine_path():
    from unibcq.quantizers.dyngroup import _refine_np, _windowed_np

    x = np.sort(np.abs(np.random.default_rng(0).standard_normal(5000)))
    bounds = _windowed_np(x, 8, 0.0, 100)
    coarse = _refine_np(x, bounds, 0.0, 10, fine_limit=1000)
    full = _refine_np(x, bounds, 0.0, 10)
    cost = lambda b: segmentation_objective(torch.from_numpy(x), torch.from_numpy(b), 0.0)  # noqa: E731
    assert cost(coarse) <= cost(bounds) and cost(full) <= cost(bounds)
    assert cost(coarse) <= 1.01 * cost(full)
