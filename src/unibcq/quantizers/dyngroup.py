"""Binary quantization with dynamic (unstructured) grouping, after Zheng et al. 2025.

"Binary Quantization For LLMs Through Dynamic Grouping" stores every weight as
``sign(w) * alpha_g`` where ``alpha_g`` is the mean magnitude of the weight's group ``g``,
and lets the groups be arbitrary subsets of the matrix (or of a row / column block). The
squared error of a group is then ``|g| * Var(|w_g|)``, and the paper adds a term that
discourages tiny groups (each group costs a 16-bit scale), so a segmentation is scored by

    J = sum_g |g| * Var(|w_g|)  +  lam * sum_g 1 / |g|.

Both terms only depend on the magnitudes in each group, and groups that are not contiguous
runs of the sorted magnitudes can be improved by swapping elements between them (which
keeps the sizes, hence the penalty, fixed), so the optimum is a segmentation of the
*sorted* magnitudes into contiguous runs. With prefix
sums of x and x^2 (float64) the cost of any run is O(1), which gives three solvers:

* `segment_dp`: exact optimum with at most G runs (divide-and-conquer DP, O(G N log N)).
* `segment_greedy`: bottom-up merging of adjacent runs, starting from singletons.
* `segment_windowed`: the same merge starting from windows of consecutive magnitudes, fast
  enough for full LLM layers (a 4096 x 4096 matrix in 2-3 s on one core).

The merges rank adjacent pairs by one of two rules (`merge_rule`):
* "paper": the authors' rule, the cost of the merged group |g| Var + lam / |g|, merging
  until exactly max_groups runs remain.
* "objective": the increase of J the merge causes (the merged cost less the two runs'
  costs), then merging below max_groups while that does not raise J. This is the greedy step
  on J itself; the paper's rank ignores what the two runs cost apart, so from singletons
  with lam > 0 it keeps merging cheap small runs and leaves far worse segmentations.

`dyngroup_quantize` applies one of them to a whole matrix, to each row, or to each column
block, and returns signs, per-weight group indices and per-group scales. Exact zeros are
grouped like any other weight (stored as +alpha of the smallest group); the authors' code
leaves them out and keeps them 0, which sign-times-scale storage cannot express without
another bit per weight (it matters only for pruned layers).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Literal, TypeVar, Union

import numpy as np
import torch

from unibcq.errors import UnibcqError
from unibcq.finite import refuse_nonfinite

Algorithm = Literal["windowed", "greedy", "dp"]
MergeRule = Literal["paper", "objective"]
MERGE_RULES = ("paper", "objective")
Granularity = Union[Literal["matrix", "row"], tuple[Literal["block"], int]]

_ALGORITHMS = ("windowed", "greedy", "dp")
ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor, float)


# --------------------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_max_groups(max_groups: int) -> None:
    if not _is_int(max_groups) or max_groups < 1:
        raise UnibcqError(f"max_groups must be an integer >= 1, got {max_groups!r}")


def _check_lam(lam: float) -> None:
    if (not isinstance(lam, (int, float, np.integer, np.floating)) or isinstance(lam, (bool, np.bool_))
            or not math.isfinite(lam) or lam < 0):
        raise UnibcqError(f"lam must be a finite number >= 0, got {lam!r}")


def _check_window(window: int, name: str = "window") -> None:
    if not _is_int(window) or window < 1:
        raise UnibcqError(f"{name} must be an integer >= 1, got {window!r}")


def _check_rule(rule: str) -> None:
    if not isinstance(rule, str) or rule not in MERGE_RULES:
        raise UnibcqError(f"merge rule must be one of {MERGE_RULES}, got {rule!r}")


def _sorted_mags_array(sorted_mags: torch.Tensor) -> np.ndarray:
    """Check that the input is a finite, ascending 1-D tensor and return it as float64."""
    if not isinstance(sorted_mags, torch.Tensor) or sorted_mags.dim() != 1:
        raise UnibcqError("sorted_mags must be a 1-D torch tensor of ascending magnitudes")
    x = sorted_mags.detach().cpu().to(torch.float64).numpy()
    if not np.isfinite(x).all():
        raise UnibcqError("sorted_mags contains NaN or inf")
    if x.size > 1 and not (x[1:] >= x[:-1]).all():
        raise UnibcqError("sorted_mags must be sorted ascending (sort |w| before segmenting)")
    return x


# --------------------------------------------------------------------------- run costs


@dataclass(frozen=True)
class PrefixSums:
    """Prefix sums of ``x - shift`` and ``(x - shift)^2`` over sorted magnitudes x.

    ``first[i]`` / ``second[i]`` sum the first i values, so a half-open run [i, j) has
    ``SSE = (second[j] - second[i]) - (first[j] - first[i])^2 / (j - i)`` in O(1).
    Subtracting the mean (``shift``) first does not change any run's SSE but keeps the
    sums small, which limits the cancellation in that difference on million-element runs.
    """

    first: torch.Tensor
    second: torch.Tensor
    shift: float

    @classmethod
    def of(cls, sorted_mags: torch.Tensor) -> PrefixSums:
        """Build the float64 prefix sums of a 1-D ascending tensor."""
        return cls._of_array(_sorted_mags_array(sorted_mags))

    @classmethod
    def _of_array(cls, x: np.ndarray) -> PrefixSums:
        shift = float(x.mean()) if x.size else 0.0
        centred = x.astype(np.float64) - shift
        first = np.zeros(x.size + 1)
        second = np.zeros(x.size + 1)
        np.cumsum(centred, out=first[1:])
        np.cumsum(centred * centred, out=second[1:])
        return cls(torch.from_numpy(first), torch.from_numpy(second), shift)


def _cost_from_sums(n: ArrayLike, d1: ArrayLike, d2: ArrayLike, lam: float) -> ArrayLike:
    """Run cost from its size n, sum d1 and sum of squares d2 (of shifted values)."""
    return d2 - d1 * d1 / n + lam / n


def _cost_np(
    c1: np.ndarray, c2: np.ndarray, cn: np.ndarray, a: np.ndarray, b: np.ndarray, lam: float
) -> np.ndarray:
    """Cost of runs between cut indices a < b given gathered prefix sums and positions cn."""
    return _cost_from_sums(cn[b] - cn[a], c1[b] - c1[a], c2[b] - c2[a], lam)


def run_cost(
    prefix: PrefixSums, i: int | torch.Tensor, j: int | torch.Tensor, lam: float
) -> torch.Tensor:
    """Cost ``|g| Var(|w_g|) + lam / |g|`` of the run [i, j) (broadcast over tensor i, j).

    Requires i < j: an empty run has no scale and no defined cost.
    """
    i_t = torch.as_tensor(i, dtype=torch.int64)
    j_t = torch.as_tensor(j, dtype=torch.int64)
    n_max = prefix.first.numel() - 1
    if not bool(((0 <= i_t) & (i_t < j_t) & (j_t <= n_max)).all()):
        raise UnibcqError(f"runs need 0 <= i < j <= {n_max}")
    return _cost_from_sums(
        (j_t - i_t).to(torch.float64),
        prefix.first[j_t] - prefix.first[i_t],
        prefix.second[j_t] - prefix.second[i_t],
        lam,
    )


def _run_stats(x: np.ndarray, boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sizes, means and SSEs of the runs of sorted x, computed in two passes (accurate)."""
    sizes = np.diff(boundaries)
    if sizes.size == 0:
        empty = np.zeros(0)
        return sizes, empty, empty
    starts = boundaries[:-1]
    means = np.add.reduceat(x, starts, dtype=np.float64) / sizes
    dev = x - np.repeat(means, sizes)
    sse = np.add.reduceat(dev * dev, starts)
    return sizes, means, sse


def segmentation_objective(sorted_mags: torch.Tensor, boundaries: torch.Tensor, lam: float) -> float:
    """Objective J of a segmentation, recomputed from scratch (two-pass SSE, float64).

    All solvers are scored with this one function so that their objectives compare exactly.
    """
    _check_lam(lam)
    x = _sorted_mags_array(sorted_mags)
    b = _check_boundaries(boundaries, x.size)
    sizes, _, sse = _run_stats(x, b)
    return float(sse.sum() + lam * (1.0 / sizes).sum()) if sizes.size else 0.0


def _check_boundaries(boundaries: torch.Tensor, n: int) -> np.ndarray:
    b = torch.as_tensor(boundaries).cpu().numpy().astype(np.int64)
    if b.ndim != 1 or b.size < 1 or b[0] != 0 or b[-1] != n or (b.size > 1 and (np.diff(b) <= 0).any()):
        raise UnibcqError(f"boundaries must be strictly ascending from 0 to {n}")
    return b


def normalized_lambda(lam: float, num_weights: int, magnitude_var: float, max_groups: int) -> float:
    """Turn a scale- and size-free lambda into the raw lambda of J.

    Returns ``lam * Var(|w|) * N^2 / max_groups^4``. Why this form:

    * Scaling the weights by c multiplies the SSE term by c^2, so the penalty must scale with
      Var(|w|) for a given lam to pick the same groups at any weight scale.
    * Repeating every weight k times multiplies the SSE of a segmentation with the same
      proportions by k but divides ``sum 1/|g|`` by k, hence the factor N^2.
    * With max_groups equal-count groups the penalty is then ``lam * N Var(|w|) / G^2``,
      the order of the SSE a G-level 1-D quantizer leaves (which falls like 1/G^2), so
      lam ~ 1 weighs the two terms equally at the group budget; the penalty for a group of
      size m is ``lam * N Var / G^2 * (N / G^2) / m``, so groups much smaller than N / G^2
      only survive if they remove a comparable share of the error (isolated outliers).

    Equivalently, J / (N Var) = relative SSE + lam / G^4 * sum_g N / |g| is minimised.
    """
    return lam * magnitude_var * float(num_weights) ** 2 / float(max_groups) ** 4


# --------------------------------------------------------------------------- exact DP


def segment_dp(
    sorted_mags: torch.Tensor,
    max_groups: int,
    lam: float,
    atoms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact minimum of J over segmentations into at most `max_groups` contiguous runs.

    F_k(b) = min_{a<b} F_{k-1}(a) + C(a, b) with C the run cost. C is Monge
    (C(a,c) + C(b,d) <= C(a,d) + C(b,c) for a <= b < c <= d): the within-run SSE of sorted
    data is Monge (the classic 1-D k-means property), and lam / (j - i) is a convex function
    f of the run length, for which f(x+u) + f(x+v) <= f(x) + f(x+u+v) (x = c - b > 0,
    u = b - a, v = d - c) is exactly convexity. A sum of Monge costs is Monge, so the
    leftmost optimal split point is monotone in b and each layer is solved by divide and
    conquer: O(N log N) per layer, O(G N log N) in total, vectorised over all subproblems
    of one recursion depth. F_k(N) is convex in k (Aggarwal-Schieber-Tokuyama), so layers
    stop as soon as one more run no longer lowers it. Memory: one int32 argmin row per
    layer plus 80 bytes of scratch per cut, about 3.4 GB for 16.7M cuts and K = 32.

    atoms: optional cut positions (any order; 0 and N are always allowed). The DP then
    runs over those cuts only, which is exact among segmentations whose boundaries are
    atoms (a sub-matrix of a Monge matrix is Monge); with windows of w elements it is w
    times faster, which is what makes million-weight matrices tractable. Default: every
    position, i.e. the exact optimum.

    Returns the int64 run boundaries [0, b_1, ..., N] (run g is [b_g, b_{g+1})).
    """
    _check_max_groups(max_groups)
    _check_lam(lam)
    x = _sorted_mags_array(sorted_mags)
    prefix = PrefixSums._of_array(x)
    if atoms is None:
        cuts = np.arange(x.size + 1)
    else:
        a = torch.as_tensor(atoms).cpu().numpy()
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or ((a < 0) | (a > x.size)).any():
            raise UnibcqError(f"atoms must be a 1-D integer tensor of positions in [0, {x.size}]")
        cuts = np.unique(np.concatenate([[0, x.size], a.astype(np.int64)]))
    return torch.from_numpy(_dp_np(prefix, cuts, max_groups, lam))


def _dp_np(prefix: PrefixSums, cuts: np.ndarray, max_groups: int, lam: float) -> np.ndarray:
    m = cuts.size - 1  # number of atoms
    if m <= 0:
        return cuts.astype(np.int64)
    c1 = prefix.first.numpy()[cuts]
    c2 = prefix.second.numpy()[cuts]
    cn = cuts.astype(np.float64)
    k_max = min(max_groups, m)
    idx_dtype = np.int32 if m < np.iinfo(np.int32).max else np.int64
    buf = np.empty((5, 2 * m + 2)) if k_max > 2 else np.empty((5, 0))

    ends = np.arange(1, m + 1)
    f = np.full(m + 1, np.inf)
    f[1:] = _cost_np(c1, c2, cn, np.zeros_like(ends), ends, lam)
    best = f[m]  # F_k(m) of the last layer kept; strictly decreases with k
    argmins: list[np.ndarray] = []  # argmins[k-2] = optimal previous cut for layer k
    for k in range(2, k_max + 1):
        if k == k_max:  # only F_k(m) is needed from the last layer
            prev = np.arange(k - 1, m)
            vals = f[prev] + _cost_np(c1, c2, cn, prev, np.full_like(prev, m), lam)
            j = int(np.argmin(vals))
            f_new = np.full(m + 1, np.inf)
            f_new[m] = vals[j]
            arg = np.zeros(m + 1, dtype=idx_dtype)
            arg[m] = prev[j]
        else:
            f_new, arg = _dc_layer(f, k, m, c1, c2, cn, lam, idx_dtype, buf)
        if not f_new[m] < best:
            break  # convex in k: no later layer can do better
        best = f_new[m]
        argmins.append(arg)
        f = f_new

    cut_idx = [m]
    for arg in reversed(argmins):
        cut_idx.append(int(arg[cut_idx[-1]]))
    cut_idx.append(0)
    return cuts[np.array(cut_idx[::-1], dtype=np.int64)].astype(np.int64)


def _take(values: np.ndarray, index: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.take(values, index, out=out, mode="clip")


def _dc_layer(
    f_prev: np.ndarray,
    k: int,
    m: int,
    c1: np.ndarray,
    c2: np.ndarray,
    cn: np.ndarray,
    lam: float,
    idx_dtype: type,
    buf: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One DP layer by divide and conquer, all subproblems of a recursion depth at once.

    A subproblem (lo, hi, olo, ohi) asks for F_k(b), b in [lo, hi], knowing the optimal
    previous cut lies in [olo, ohi]; its middle b is solved by a scan and splits the rest.
    The scans of one depth cover at most m + (#subproblems) <= 2m + 1 candidates; they are
    evaluated with np.take into the preallocated `buf` (5 rows of 2m + 2), about twice as
    fast as fancy indexing into fresh arrays.
    """
    f_new = np.full(m + 1, np.inf)
    arg = np.zeros(m + 1, dtype=idx_dtype)
    lo = np.array([k])
    hi = np.array([m])
    olo = np.array([k - 1])
    ohi = np.array([m - 1])
    while lo.size:
        mid = (lo + hi) >> 1
        length = np.minimum(ohi, mid - 1) - olo + 1  # >= 1 since olo < lo <= mid
        starts = np.cumsum(length) - length
        total = int(starts[-1] + length[-1])
        seg = np.repeat(np.arange(lo.size), length)  # subproblem of each candidate
        a = np.arange(total)
        a -= np.take(starts - olo, seg)  # candidate previous cut
        size, d1, d2, vals, tmp = (row[:total] for row in buf)
        # indices are always in range; mode="clip" lets np.take write `out` unbuffered
        np.subtract(_take(cn[mid], seg, size), _take(cn, a, tmp), out=size)
        np.subtract(_take(c1[mid], seg, d1), _take(c1, a, tmp), out=d1)
        np.subtract(_take(c2[mid], seg, d2), _take(c2, a, tmp), out=d2)
        # vals = F_{k-1}(a) + d2 - d1^2 / size + lam / size, the run cost of _cost_from_sums
        np.add(_take(f_prev, a, vals), d2, out=vals)
        d1 *= d1
        d1 /= size
        vals -= d1
        vals += np.divide(lam, size, out=d1)
        mins = np.minimum.reduceat(vals, starts)
        hit = np.flatnonzero(vals == np.take(mins, seg))
        hit_seg = seg[hit]
        best = a[hit[np.r_[True, hit_seg[1:] != hit_seg[:-1]]]]  # leftmost argmin per subproblem
        f_new[mid] = mins
        arg[mid] = best
        left = lo < mid
        right = mid < hi
        lo, hi, olo, ohi = (
            np.concatenate([lo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, hi[right]]),
            np.concatenate([olo[left], best[right]]),
            np.concatenate([best[left], ohi[right]]),
        )
    return f_new, arg


# --------------------------------------------------------------------------- greedy merging


def _merge_delta(n_a: ArrayLike, s_a: ArrayLike, n_b: ArrayLike, s_b: ArrayLike, lam: float) -> ArrayLike:
    """Increase of J when adjacent runs A and B (sizes n, sums s) are merged."""
    n_ab = n_a + n_b
    dm = s_a / n_a - s_b / n_b
    return n_a * n_b / n_ab * dm * dm + lam * (1.0 / n_ab - 1.0 / n_a - 1.0 / n_b)


def _merged_cost(n_a: ArrayLike, s_a: ArrayLike, q_a: ArrayLike, n_b: ArrayLike, s_b: ArrayLike, q_b: ArrayLike,
                 lam: float) -> ArrayLike:
    """The paper's merge priority: cost |g| Var + lam / |g| of the run A + B (sums of x and x^2)."""
    n, s = n_a + n_b, s_a + s_b
    return np.maximum(q_a + q_b - s * s / n, 0.0) + lam / n


def _greedy_merge(counts: np.ndarray, sums: np.ndarray, squares: np.ndarray, max_groups: int, lam: float,
                  rule: MergeRule = "objective") -> np.ndarray:
    """Merge adjacent runs bottom-up; return the sizes of the surviving runs.

    With rule="objective" each step merges the adjacent pair with the smallest increase of J,
    ``dJ = nA nB / (nA + nB) (muA - muB)^2 + lam (1/(nA+nB) - 1/nA - 1/nB)``, which only
    needs sizes and sums. Merging continues until at most `max_groups` runs remain and then
    only while a merge does not raise J (dJ <= 0): J is minimised over *at most* max_groups
    runs, and the extra merges only ever help. A merge that leaves J unchanged (equal means
    with lam = 0, as in an all-zero or constant-magnitude segment, whose normalised lam is 0)
    still goes ahead: it costs no error and saves a scale and index bits, as the exact DP,
    which keeps the fewer groups on ties, would. With rule="paper" the pair whose merged run
    costs least goes first (`_merged_cost`, which needs the sums of squares too) and merging
    stops at exactly max_groups runs, as in the authors' code.

    The heap holds (dJ, left run, version) per adjacent pair; ``pair_version[i]`` counts
    the changes of the pair starting at run i (i or its right neighbour merged, or i died),
    so an entry is current iff its version matches and stale entries are skipped on pop
    (lazy deletion). R runs cost O(R log R) heap operations; the loop is plain Python,
    about 10 us per merge on a heap of a million entries (cache misses dominate), so
    starting from windows instead of singletons is what makes large matrices fast.
    """
    r = counts.size
    if r <= 1:
        return counts.astype(np.int64)
    n = counts.astype(np.float64)
    paper = rule == "paper"
    if paper:
        key0 = _merged_cost(n[:-1], sums[:-1], squares[:-1], n[1:], sums[1:], squares[1:], lam)
    else:
        key0 = _merge_delta(n[:-1], sums[:-1], n[1:], sums[1:], lam)
    heap = list(zip(key0.tolist(), range(r - 1), [0] * (r - 1)))
    heapq.heapify(heap)

    size = counts.astype(np.int64).tolist()
    total = sums.tolist()
    square = squares.tolist()

    def key(a: int, b: int) -> float:
        if paper:
            return _merged_cost(size[a], total[a], square[a], size[b], total[b], square[b], lam)
        return _merge_delta(size[a], total[a], size[b], total[b], lam)

    pair_version = [0] * r
    prv = list(range(-1, r - 1))
    nxt = list(range(1, r + 1))
    nxt[-1] = -1
    runs = r
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        d, left, ver = pop(heap)
        if pair_version[left] != ver:
            continue
        if runs <= max_groups and (paper or d > 0.0):
            break
        right = nxt[left]
        after = nxt[right]
        size[left] += size[right]
        total[left] += total[right]
        square[left] += square[right]
        pair_version[left] += 1
        pair_version[right] += 1
        nxt[left] = after
        if after >= 0:
            prv[after] = left
        runs -= 1
        before = prv[left]
        if before >= 0:
            pair_version[before] += 1
            push(heap, (key(before, left), before, pair_version[before]))
        if after >= 0:
            push(heap, (key(left, after), left, pair_version[left]))

    kept = []
    run = 0  # the first run always survives: merges keep the left run's id
    while run >= 0:
        kept.append(size[run])
        run = nxt[run]
    return np.array(kept, dtype=np.int64)


def _to_boundaries(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _greedy_np(x: np.ndarray, max_groups: int, lam: float, rule: MergeRule = "objective") -> np.ndarray:
    x64 = x.astype(np.float64)
    return _to_boundaries(_greedy_merge(np.ones(x.size, dtype=np.int64), x64, x64 * x64, max_groups, lam, rule))


def _windowed_np(x: np.ndarray, max_groups: int, lam: float, window: int, rule: MergeRule = "objective") -> np.ndarray:
    starts = np.arange(0, x.size, window)
    counts = np.diff(np.append(starts, x.size))
    x64 = x.astype(np.float64)
    sums = np.add.reduceat(x64, starts) if x.size else np.zeros(0)
    squares = np.add.reduceat(x64 * x64, starts) if x.size else np.zeros(0)
    return _to_boundaries(_greedy_merge(counts, sums, squares, max_groups, lam, rule))


def _refine_pass(
    x_size: int, c1: np.ndarray, c2: np.ndarray, b: np.ndarray, lam: float, sweeps: int, stride: int, radius: int | None
) -> np.ndarray:
    """Up to `sweeps` sweeps over alternate boundaries; candidates are multiples of `stride`
    within `radius` of the current position (None: anywhere between the neighbours)."""
    cn = np.arange(x_size + 1, dtype=np.float64)
    for _ in range(sweeps):
        moved = False
        for parity in (1, 2):
            ks = np.arange(parity, b.size - 1, 2)
            if ks.size == 0:
                continue
            left, right = b[ks - 1], b[ks + 1]
            lo, hi = left + 1, right - 1
            if radius is not None:
                lo, hi = np.maximum(lo, b[ks] - radius), np.minimum(hi, b[ks] + radius)
            first_t = -(-lo // stride) * stride
            lengths = np.maximum((hi - first_t) // stride + 1, 0)
            keep = lengths > 0
            ks, left, right, first_t, lengths = ks[keep], left[keep], right[keep], first_t[keep], lengths[keep]
            if ks.size == 0:
                continue
            starts = np.cumsum(lengths) - lengths
            seg = np.repeat(np.arange(ks.size), lengths)
            t = first_t[seg] + stride * (np.arange(int(lengths.sum())) - starts[seg])
            cost = _cost_np(c1, c2, cn, left[seg], t, lam) + _cost_np(c1, c2, cn, t, right[seg], lam)
            current = _cost_np(c1, c2, cn, left, b[ks], lam) + _cost_np(c1, c2, cn, b[ks], right, lam)
            best = np.minimum.reduceat(cost, starts)
            first = np.flatnonzero(cost <= best[seg])
            first = first[np.unique(seg[first], return_index=True)[1]]
            improve = best < current - 1e-12 * np.abs(current)
            if improve.any():
                b[ks[improve]] = t[first][improve]
                moved = True
        if not moved:
            break
    return b


def _refine_np(x: np.ndarray, bounds: np.ndarray, lam: float, sweeps: int, fine_limit: int = 2**20) -> np.ndarray:
    """Move run boundaries to their best positions, neighbours fixed, for up to `sweeps` sweeps.

    Each pass re-places every other interior boundary at the position between its
    neighbours that minimises the two runs' cost (all candidates scored at once from the
    prefix sums), so a pass never increases J and keeps the number of runs; sweeps stop
    when nothing moves. This is the 1-D analogue of a Lloyd / k-means refinement and closes
    most of the gap between the greedy merges and the exact DP. Above `fine_limit` weights
    the sweeps run coarse-to-fine: first on every `stride`-th position (about 2^18
    candidates), then at full resolution within one stride of each boundary.
    """
    if bounds.size <= 2 or sweeps < 1:
        return bounds
    prefix = PrefixSums._of_array(x)
    c1, c2 = prefix.first.numpy(), prefix.second.numpy()
    b = bounds.astype(np.int64).copy()
    if x.size <= fine_limit:
        return _refine_pass(x.size, c1, c2, b, lam, sweeps, 1, None)
    stride = -(-x.size // 2**18)
    b = _refine_pass(x.size, c1, c2, b, lam, sweeps, stride, None)
    return _refine_pass(x.size, c1, c2, b, lam, sweeps, 1, stride)


def segment_greedy(sorted_mags: torch.Tensor, max_groups: int, lam: float,
                   rule: MergeRule = "objective") -> torch.Tensor:
    """Greedy bottom-up merging from singletons, ranking pairs by `rule` (module docstring).

    O(N log N) heap operations, but in pure Python: about 10 us per weight (~10 s per
    million weights, ~3 s for 576 x 576), too slow and memory hungry (Python objects per
    weight) for whole 4096 x 4096 matrices; use `segment_windowed` there. Never better than
    `segment_dp` (which is exact); on |N(0,1)| samples typically 5-25 % above it.
    Returns the int64 run boundaries [0, ..., N].
    """
    _check_max_groups(max_groups)
    _check_lam(lam)
    _check_rule(rule)
    return torch.from_numpy(_greedy_np(_sorted_mags_array(sorted_mags), max_groups, lam, rule))


def segment_windowed(sorted_mags: torch.Tensor, max_groups: int, lam: float, window: int,
                     rule: MergeRule = "objective") -> torch.Tensor:
    """Windowed greedy merging: start from runs of `window` consecutive sorted magnitudes.

    The last window may be shorter. This cuts the number of heap items by `window`
    (16.7M weights / 256 = 65k runs), which is what makes the merge take well under a
    second on a 4096 x 4096 matrix; the price is that boundaries can only fall on window
    edges. window=1 is exactly `segment_greedy`. Returns int64 boundaries [0, ..., N].
    """
    _check_max_groups(max_groups)
    _check_lam(lam)
    _check_window(window)
    _check_rule(rule)
    return torch.from_numpy(_windowed_np(_sorted_mags_array(sorted_mags), max_groups, lam, window, rule))


# --------------------------------------------------------------------------- matrices


@dataclass(frozen=True)
class DynGroupResult:
    """A dynamically grouped binary quantization of a 2-D weight.

    The weight is cut into segments (the whole matrix, each row, or each column block, see
    `granularity`); each segment has its own groups, numbered 0..G_s-1 by ascending scale.

    signs: bool, shape of the weight, True where w >= 0 (+1).
    group_index: int64, shape of the weight, the weight's group within its segment.
    scales: float32 (num_segments, max_s G_s), per-group mean |w|, zero-padded.
    group_sizes: int64 (num_segments, max_s G_s), weights per group, zero-padded.
    num_groups: int64 (num_segments,), G_s.
    objective: J summed over segments, with each segment's raw lambda.
    lam_effective: float64 (num_segments,), the raw lambda used in each segment (differs
        from the requested lam when it was normalised, see `normalized_lambda`).
    granularity: "matrix", "row" or ("block", ncols).
    """

    signs: torch.Tensor
    group_index: torch.Tensor
    scales: torch.Tensor
    group_sizes: torch.Tensor
    num_groups: torch.Tensor
    objective: float
    lam_effective: torch.Tensor
    granularity: Granularity

    def segment_index(self) -> torch.Tensor:
        """int64 tensor, shape of the weight: the segment each weight belongs to."""
        rows, cols = self.signs.shape
        if self.granularity == "matrix":
            return torch.zeros(rows, cols, dtype=torch.int64)
        if self.granularity == "row":
            return torch.arange(rows).unsqueeze(1).expand(rows, cols)
        return (torch.arange(cols) // self.granularity[1]).unsqueeze(0).expand(rows, cols)

    def dequantize(self) -> torch.Tensor:
        """float32 weight ``sign * scales[segment, group]``."""
        flat = self.segment_index() * self.scales.shape[1] + self.group_index
        magnitude = self.scales.reshape(-1)[flat]
        return torch.where(self.signs, magnitude, -magnitude)


def _parse_granularity(granularity: Granularity) -> Granularity:
    if granularity in ("matrix", "row"):
        return granularity
    if (
        isinstance(granularity, tuple)
        and len(granularity) == 2
        and granularity[0] == "block"
        and isinstance(granularity[1], int)
        and not isinstance(granularity[1], bool)
    ):
        _check_window(granularity[1], "block width")
        return ("block", granularity[1])
    raise UnibcqError(f"granularity must be 'matrix', 'row' or ('block', ncols), got {granularity!r}")


def _segments(granularity: Granularity, rows: int, cols: int) -> list[tuple[slice, slice]]:
    if granularity == "matrix":
        return [(slice(None), slice(None))]
    if granularity == "row":
        return [(slice(r, r + 1), slice(None)) for r in range(rows)]
    width = granularity[1]
    return [(slice(None), slice(c, c + width)) for c in range(0, cols, width)]


def _assign_groups(mags: np.ndarray, x: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Group of every magnitude in original order, matching the runs of sorted x exactly.

    A threshold lookup suffices except where a boundary splits a block of equal values
    (common for bf16 weights): those elements get the run labels of their sorted positions
    in original order, i.e. what a stable argsort would give, without paying for argsort.
    """
    cuts = boundaries[1:-1]
    if cuts.size == 0:
        return np.zeros(mags.shape, dtype=np.int64)
    group = np.searchsorted(x[cuts], mags, side="right")
    for value in np.unique(x[cuts][x[cuts - 1] == x[cuts]]):
        lo = np.searchsorted(x, value, side="left")
        hi = np.searchsorted(x, value, side="right")
        group[mags == value] = np.searchsorted(cuts, np.arange(lo, hi), side="right")
    return group


def dyngroup_quantize(
    weight: torch.Tensor,
    max_groups: int = 32,
    lam: float = 0.75,
    algorithm: Algorithm = "windowed",
    window: int = 256,
    granularity: Granularity = "matrix",
    normalize_lambda: bool = True,
    dp_atom_size: int = 1,
    refine_sweeps: int = 0,
    merge_rule: MergeRule = "objective",
) -> DynGroupResult:
    """Binary-quantize a 2-D weight with at most `max_groups` dynamic groups per segment.

    algorithm: "windowed" (default; 2-3 s for a 4096 x 4096 matrix), "greedy" (from
        singletons; about 10 us per weight) or "dp" (exact; O(G N log N), about 12 s for
        576 x 1536, see `segment_dp`).
    window: initial run length of the windowed algorithm; a segment with fewer than
        max_groups windows keeps at most one group per window.
    granularity: "matrix" (one segment), "row" (each row its own groups) or ("block", n)
        (column blocks W[:, j:j+n] spanning all rows, the last one possibly narrower).
    normalize_lambda: interpret lam as the scale- and size-free lambda of
        `normalized_lambda`, computed per segment; False uses lam as the raw lambda of J.
    dp_atom_size: the DP only cuts every this many sorted magnitudes (1 = exact); use e.g.
        64 to make "dp" practical on matrices with millions of weights.
    refine_sweeps: after greedy / windowed, up to this many boundary-refinement sweeps
        (`_refine_np`); 0 keeps the merge's result. Not applied to "dp".
    merge_rule: how greedy / windowed rank adjacent pairs, "paper" or "objective" (module
        docstring); the authors' setting is merge_rule="paper", normalize_lambda=False.

    The weight may live on any device and have any floating dtype; the work happens on the
    CPU in float32 (float64 inputs stay float64) and the result is on the CPU.
    """
    _check_max_groups(max_groups)
    _check_lam(lam)
    _check_window(window)
    _check_window(dp_atom_size, "dp_atom_size")
    _check_rule(merge_rule)
    if not _is_int(refine_sweeps) or refine_sweeps < 0:
        raise UnibcqError(f"refine_sweeps must be an integer >= 0, got {refine_sweeps!r}")
    if not isinstance(algorithm, str) or algorithm not in _ALGORITHMS:
        raise UnibcqError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    granularity = _parse_granularity(granularity)
    w = _checked_weight(weight)
    w_np = w.numpy()
    mags = np.abs(w_np)
    rows, cols = w_np.shape
    group_index = np.zeros((rows, cols), dtype=np.int64)
    seg_sizes: list[np.ndarray] = []
    seg_means: list[np.ndarray] = []
    lam_eff: list[float] = []
    objective = 0.0
    for rs, cs in _segments(granularity, rows, cols):
        block = mags[rs, cs]
        flat = block.ravel()
        x = np.sort(flat)
        raw_lam = lam
        if normalize_lambda and x.size:
            raw_lam = normalized_lambda(lam, x.size, float(x.var(dtype=np.float64)), max_groups)
        bounds = _segment_bounds(x, algorithm, max_groups, raw_lam, window, dp_atom_size, refine_sweeps, merge_rule)
        sizes, means, sse = _run_stats(x, bounds)
        group_index[rs, cs] = _assign_groups(flat, x, bounds).reshape(block.shape)
        seg_sizes.append(sizes)
        seg_means.append(means)
        lam_eff.append(raw_lam)
        objective += float(sse.sum() + raw_lam * (1.0 / sizes).sum())

    num_groups = np.array([s.size for s in seg_sizes], dtype=np.int64)
    return DynGroupResult(
        signs=w >= 0,
        group_index=torch.from_numpy(group_index),
        scales=torch.from_numpy(_padded(seg_means, np.float32)),
        group_sizes=torch.from_numpy(_padded(seg_sizes, np.int64)),
        num_groups=torch.from_numpy(num_groups),
        objective=objective,
        lam_effective=torch.tensor(lam_eff, dtype=torch.float64),
        granularity=granularity,
    )


def _checked_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a finite float32 (float64 stays float64) CPU tensor, or a clear error."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise UnibcqError(f"weight must be a 2-D torch tensor, got {shape}")
    if not weight.is_floating_point():
        raise UnibcqError(f"weight must be floating point, got {weight.dtype}")
    w = weight.detach().cpu()
    return refuse_nonfinite("weight", w if w.dtype == torch.float64 else w.to(torch.float32))


def _segment_bounds(x: np.ndarray, algorithm: Algorithm, max_groups: int, raw_lam: float, window: int,
                    dp_atom_size: int, refine_sweeps: int, merge_rule: MergeRule) -> np.ndarray:
    """Run boundaries of one segment's sorted magnitudes `x` by the chosen algorithm (see
    `dyngroup_quantize`); the merges are then refined, the exact DP needs no refinement."""
    if algorithm == "dp":
        cuts = np.unique(np.append(np.arange(0, x.size, dp_atom_size), x.size))
        return _dp_np(PrefixSums._of_array(x), cuts, max_groups, raw_lam)
    if algorithm == "windowed":
        bounds = _windowed_np(x, max_groups, raw_lam, window, merge_rule)
    else:
        bounds = _greedy_np(x, max_groups, raw_lam, merge_rule)
    return _refine_np(x, bounds, raw_lam, refine_sweeps)


def _padded(per_segment: list[np.ndarray], dtype: type) -> np.ndarray:
    """Per-segment vectors of different lengths as one zero-padded (segments, longest) array."""
    out = np.zeros((len(per_segment), max((v.size for v in per_segment), default=0)), dtype=dtype)
    for s, values in enumerate(per_segment):
        out[s, : values.size] = values
    return out

