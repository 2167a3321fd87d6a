"""Binary-coding quantization of a group matrix: greedy, refined greedy, alternating.

All functions take X (R, g), R independent groups of g values, and return `GroupCodes`.
Each group is approximated as sum_i alpha_i b_i (+ offset), b_i in {-1, +1}^g.

- greedy (Guo et al. 2017): b_i = sign(residual), alpha_i = mean |residual|; codes kept.
  With an offset (the default; the format stores one per group either way) the residual
  starts from the group minus its mean, the offset; without (`offset=False`, `--no-offset`)
  it is Guo et al.'s greedy exactly.
- refined: greedy codes kept, alpha (and offset) refit by least squares.
- alternating (Xu et al. 2018): repeat { least-squares alpha | nearest-level codes }.
  The nearest of the 2^n levels is found by sorting the levels of each group and a batched
  binary search, so memory is O(R 2^n + R g), never O(R g 2^n).
"""

from __future__ import annotations

import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import STORAGE_DTYPE, BCQTensor
from unibcq.quantizers.grouping import GroupCodes, quantize_by_groups
from unibcq.quantizers.uniform import check_bits, minmax_params, quantize_to_grid, uniform_to_bcq

# Relative ridge added to the normal equations: keeps the solve defined when two bit-planes
# coincide in a group (then any split of their alphas is optimal).
RIDGE = 1e-7

# Up to this many levels (4 bits), nearest-level search counts midpoints with plain compares.
MIDPOINT_SCAN_LEVELS = 16


def sign_patterns(bits: int, device: torch.device | None = None) -> torch.Tensor:
    """All 2^n sign vectors as float (2^n, n): row k holds bit i of k as +-1."""
    k = torch.arange(2**bits, device=device)
    return (((k[:, None] >> torch.arange(bits, device=device)) & 1) * 2 - 1).float()


def greedy_codes(x: torch.Tensor, bits: int, offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Greedy residual binarisation. Returns (B +-1 (R, g, n), alpha (R, n), offset (R,) | None)."""
    o = x.mean(dim=1) if offset else None
    residual = x - o[:, None] if offset else x.clone()
    planes, alphas = [], []
    for _ in range(bits):
        b = torch.where(residual >= 0, 1.0, -1.0)
        a = residual.abs().mean(dim=1)
        residual = residual - a[:, None] * b
        planes.append(b)
        alphas.append(a)
    return torch.stack(planes, dim=-1), torch.stack(alphas, dim=-1), o


def least_squares_scales(
    x: torch.Tensor, b: torch.Tensor, offset: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """argmin ||x - B alpha - o||^2 per group for +-1 codes B (R, g, n)."""
    return least_squares_from_index(x, codes_to_index(b), b.shape[-1], offset)


def codes_to_index(b: torch.Tensor) -> torch.Tensor:
    """+-1 (or bool) codes (R, g, n) -> index (R, g) of their row in `sign_patterns`."""
    weights = 2 ** torch.arange(b.shape[-1], device=b.device)
    return ((b > 0).long() * weights).sum(-1)


def least_squares_from_index(
    x: torch.Tensor, index: torch.Tensor, bits: int, offset: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares scales (and offset) for codes given as level indices (R, g).

    Every value with level k has the same design row p_k (the sign pattern, plus a 1 for the
    offset), so the normal equations need only each group's count and sum of values per
    level: G = sum_k count_k p_k p_k^T and r = sum_k sum_k(x) p_k. This never builds the
    (R, g, n) design matrix; the small solve runs batched in float64.
    """
    levels = 2**bits
    design = sign_patterns(bits, x.device).double()
    if offset:
        design = torch.cat([design, torch.ones_like(design[:, :1])], dim=1)
    counts = torch.zeros(x.shape[0], levels, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(x, dtype=torch.float64))
    sums = torch.zeros_like(counts).scatter_add_(1, index, x.double())
    width = design.shape[1]
    outer = (design[:, :, None] * design[:, None, :]).reshape(levels, width * width)
    gram = (counts @ outer).reshape(-1, width, width)
    rhs = (sums @ design).unsqueeze(-1)
    eye = torch.eye(width, dtype=gram.dtype, device=gram.device)
    trace = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1.0)
    sol = torch.linalg.solve(gram + RIDGE * trace[:, None, None] * eye, rhs).squeeze(-1).float()
    return sol[:, :bits], (sol[:, bits] if offset else None)


def level_values(alpha: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """All 2^n levels of each group, (R, 2^n): level k uses sign pattern k (`sign_patterns`)."""
    levels = alpha @ sign_patterns(alpha.shape[-1], alpha.device).T
    return levels + offset[:, None] if offset is not None else levels


def nearest_level_index(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index k of the level nearest to each value; x (R, g), levels (R, 2^n) -> (R, g) int64.

    Levels are sorted per group; a value's rank among them is the number of midpoints
    between neighbouring levels that it exceeds (ties go to the lower level). Up to
    `MIDPOINT_SCAN_LEVELS` levels that count is a few vectorised compares, faster than
    `torch.searchsorted`; above it a binary search does the same. Memory is O(R 2^n + R g),
    never O(R g 2^n).
    """
    sorted_levels, order = torch.sort(levels, dim=1)
    mids = (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2
    if levels.shape[1] <= MIDPOINT_SCAN_LEVELS:
        rank = torch.zeros(x.shape, dtype=torch.long, device=x.device)
        for k in range(mids.shape[1]):
            rank += x > mids[:, k : k + 1]
    else:
        rank = torch.searchsorted(mids.contiguous(), x.contiguous(), side="left")
    return order.gather(1, rank)


def nearest_codes(x: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """For every value, the sign vector (+-1 float, (R, g, n)) of the nearest level."""
    patterns = sign_patterns(alpha.shape[-1], x.device)
    return patterns[nearest_level_index(x, level_values(alpha, offset))]


def reconstruct(b: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    x_hat = (b * alpha[:, None, :]).sum(-1)
    return x_hat + offset[:, None] if offset is not None else x_hat


def canonical(b: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None) -> GroupCodes:
    """Make every alpha non-negative (flip its plane) and return stored-format codes, with
    alpha and offset rounded to fp16 as stored. The codes are kept: `finalize` re-picks them
    for the rounded scales where a method calls for it (alternating BCQ; greedy and refined
    greedy keep theirs by definition)."""
    flip = alpha < 0
    b = torch.where(flip[:, None, :], -b, b)
    alpha = alpha.abs().to(STORAGE_DTYPE).float()
    offset = None if offset is None else offset.to(STORAGE_DTYPE).float()
    return GroupCodes(signs=b > 0, alpha=alpha, offset=offset)


def finalize(x: torch.Tensor, codes: GroupCodes) -> GroupCodes:
    """Re-pick codes for the fp16-rounded scales (never worse than the pre-rounding codes)."""
    b = nearest_codes(x, codes.alpha, codes.offset)
    return GroupCodes(signs=b > 0, alpha=codes.alpha, offset=codes.offset)


def bcq_greedy_groups(x: torch.Tensor, bits: int, offset: bool = True) -> GroupCodes:
    """Greedy as Guo et al. define it, on the group less its mean when `offset`: the
    residual-sign codes are kept as found (re-picking the nearest levels would be a step of
    alternating, and a stronger baseline than greedy)."""
    b, alpha, o = greedy_codes(x, bits, offset)
    return canonical(b, alpha, o)


def bcq_refined_groups(x: torch.Tensor, bits: int, offset: bool = True) -> GroupCodes:
    """Refined greedy: greedy's codes kept, their scales (and offset) refit by least squares.
    One nearest-level pick after this is alternating with `iters=0`."""
    b, _, _ = greedy_codes(x, bits, offset)
    alpha, o = least_squares_scales(x, b, offset)
    return canonical(b, alpha, o)


def alternate(
    x: torch.Tensor, b: torch.Tensor, offset: bool, iters: int
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """`iters` rounds of (least-squares scales | nearest codes) from codes b (R, g, n).

    Each group keeps its best round, so the result is never worse than the start's
    least-squares fit. A group whose codes come back unchanged sits at a fixed point (the
    same codes give the same scales), so it leaves the working set: the result equals
    running every group for all `iters` rounds, at a fraction of the cost once most groups
    have converged. Returns ((B, alpha, offset), per-group squared error).
    """
    bits = b.shape[-1]
    index = codes_to_index(b)
    alpha, o = least_squares_from_index(x, index, bits, offset)
    levels = level_values(alpha, o)
    best_index, best_alpha, best_o = index, alpha, o
    best_err = (x - levels.gather(1, index)).pow(2).sum(1)
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(iters):
        xa = x[active]
        new_index = nearest_level_index(xa, levels)
        moved = (new_index != index).any(1)
        if not moved.all():
            active, xa, new_index = active[moved], xa[moved], new_index[moved]
        if active.numel() == 0:
            break
        index = new_index
        alpha, o = least_squares_from_index(xa, index, bits, offset)
        levels = level_values(alpha, o)
        err = (xa - levels.gather(1, index)).pow(2).sum(1)
        better = err < best_err[active]
        rows = active[better]
        best_err[rows] = err[better]
        best_index[rows] = index[better]
        best_alpha[rows] = alpha[better]
        if o is not None:
            best_o[rows] = o[better]
    return (sign_patterns(bits, x.device)[best_index], best_alpha, best_o), best_err


def bcq_alternating_groups(
    x: torch.Tensor, bits: int, offset: bool = True, iters: int = 15, init: str = "greedy+uniform"
) -> GroupCodes:
    """Alternating BCQ (Xu et al. 2018).

    From the start's codes: a least-squares fit of the scales, then `iters` rounds of
    (nearest-level codes | least-squares scales), then one last pick of codes for the
    fp16-rounded scales; so `iters=0` is refined greedy plus one code pick, and `iters=T`
    makes T + 1 scale fits and T + 1 code picks (Xu et al.'s T cycles of both, after the
    first fit). Each group keeps its best round.

    `init="greedy"` starts from greedy codes as the paper does. The default
    `"greedy+uniform"` also runs from the min-max uniform grid's codes (a valid BCQ point,
    see `unibcq.quantizers.uniform`) and keeps each group's better result: alternating from
    greedy alone can end above plain RTN at 4 bits, which this rules out.
    """
    if init not in ("greedy", "greedy+uniform"):
        raise UnibcqError(f"unknown alternating init {init!r}; use 'greedy' or 'greedy+uniform'")
    (b, alpha, o), err = alternate(x, greedy_codes(x, bits, offset)[0], offset, iters)
    if init == "greedy+uniform":
        scale, zero = minmax_params(x, bits, symmetric=not offset)
        uniform = uniform_to_bcq(quantize_to_grid(x, scale, zero, bits), scale, zero, bits)
        (ub, ualpha, uo), uerr = alternate(x, uniform.signs.float() * 2 - 1, offset, iters)
        better = uerr < err
        b = torch.where(better[:, None, None], ub, b)
        alpha = torch.where(better[:, None], ualpha, alpha)
        o = None if o is None else torch.where(better, uo, o)
    return finalize(x, canonical(b, alpha, o))


BCQ_ALGORITHMS = {
    "greedy": bcq_greedy_groups,
    "refined": bcq_refined_groups,
    "alternating": bcq_alternating_groups,
}


def quantize_bcq(
    weight: torch.Tensor,
    bits: int,
    group_size: int = 128,
    algorithm: str = "alternating",
    offset: bool = True,
    iters: int = 15,
    init: str = "greedy+uniform",
) -> BCQTensor:
    """BCQ of one weight matrix with the named algorithm, in the packed format."""
    check_bits(bits)
    if algorithm not in BCQ_ALGORITHMS:
        raise UnibcqError(f"unknown BCQ algorithm {algorithm!r}; choose one of {sorted(BCQ_ALGORITHMS)}")
    fn = BCQ_ALGORITHMS[algorithm]
    if algorithm == "alternating":
        return quantize_by_groups(weight, group_size, lambda x: fn(x, bits, offset, iters, init))
    return quantize_by_groups(weight, group_size, lambda x: fn(x, bits, offset))
