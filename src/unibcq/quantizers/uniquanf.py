"""UniQuanF / FlexBCQ (Park et al.): the pure per-group pieces.

A group's weights w are mapped into a uniform-quantization domain and snapped to BCQ levels:

    D = exp(d1 + d2 + d3),  s = exp(d1)
    u = w / D + z - beta - c            (c = (2^n - 1) / 2)
    k* = index of the BCQ level L_k = sum_i alpha_i b_i(k) nearest to u
    w_hat = s * (L_k* + beta + c - z)

d1 is the log UQ scale (per group), d2 element-wise and d3 per group steer the mapping only
(`D` divides, `s` multiplies back). Everything that trains lives in `unibcq.nn.fake_quant`;
this module holds the initialisation, the level search and the unification export.

Unification theorem: w_hat = sum_i (s alpha_i) b_i + s (beta + c - z), i.e. plain BCQ with
alpha' = s alpha and offset s (beta + c - z): the trained model has BCQ's size and speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unibcq.quantizers.bcq import alternate, greedy_codes, level_values, nearest_level_index, reconstruct
from unibcq.quantizers.uniform import MIN_SCALE, quantize_to_grid, uniform_to_bcq


@dataclass
class UniQuanFInit:
    """Per-group initial parameters for a group matrix (R, g)."""

    scale: torch.Tensor
    zero: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor


def clipping_grid(points: int) -> list[float]:
    """Ratios r applied to the min-max scale: i / G for i = G .. 1, the authors' grid of G points."""
    return [i / points for i in range(max(points, 1), 0, -1)] if points > 1 else [1.0]


def unified_init(
    x: torch.Tensor, bits: int, grid: list[float], iters: int = 15, p: float = 2.4, shift: bool = False
) -> UniQuanFInit:
    """Unified initialisation of every group (row of x).

    For each clipping ratio r ('min' strategy: the minimum stays put, the range shrinks):
    s = r (max - min) / (2^n - 1), z = -min / s; fit BCQ to u = x / s + z - c by greedy then
    `iters` alternating rounds (also from the uniform grid's own codes, which are a valid BCQ
    point, keeping the better per group); score mean |x - w_hat|^p. Each group keeps its best
    (s, z, alpha, beta). With `shift`, the BCQ fit has an offset, which becomes beta.
    """
    c = (2**bits - 1) / 2
    xmin, xmax = x.min(dim=1).values, x.max(dim=1).values
    s0 = ((xmax - xmin) / (2**bits - 1)).clamp(min=MIN_SCALE)
    best: UniQuanFInit | None = None
    best_err = torch.full_like(s0, float("inf"))
    for ratio in grid:
        scale = s0 * ratio
        zero = -xmin / scale
        u = x / scale[:, None] + zero[:, None] - c
        (b, alpha, beta), err = alternate(u, greedy_codes(u, bits, shift)[0], shift, iters)
        q = quantize_to_grid(u + c, torch.ones_like(scale), torch.zeros_like(scale), bits)
        uniform = uniform_to_bcq(q, torch.ones_like(scale), torch.full_like(scale, c), bits)
        (ub, ualpha, ubeta), uerr = alternate(u, uniform.signs.float() * 2 - 1, shift, iters)
        take_uniform = uerr < err
        b = torch.where(take_uniform[:, None, None], ub, b)
        alpha = torch.where(take_uniform[:, None], ualpha, alpha)
        if shift:
            beta = torch.where(take_uniform, ubeta, beta)
        else:
            beta = torch.zeros_like(scale)
        w_hat = scale[:, None] * (reconstruct(b, alpha, None) + beta[:, None] + c - zero[:, None])
        score = (x - w_hat).abs().pow(p).mean(dim=1)
        better = score < best_err
        best_err = torch.where(better, score, best_err)
        if best is None:
            best = UniQuanFInit(scale, zero, alpha, beta)
        else:
            best = UniQuanFInit(
                torch.where(better, scale, best.scale),
                torch.where(better, zero, best.zero),
                torch.where(better[:, None], alpha, best.alpha),
                torch.where(better, beta, best.beta),
            )
    assert best is not None
    return best


def global_remap(u: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """k* over all 2^n levels, for values u (R, g) and alphas (R, n)."""
    return nearest_level_index(u, level_values(alpha))


def local_remap(u: torch.Tensor, alpha: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """k* among the previous level and its two value-neighbours.

    The authors' code takes index neighbours (k - 1, k + 1), which are value neighbours only
    when alpha is super-increasing; we sort each group's levels and take the levels just
    below and above the previous one in value, which is what "local" is meant to be. Levels
    of equal value (equal or zero alphas, which unified init gives a group of two distinct
    weights) count as one: the neighbours are the nearest *other* values, else a weight could
    never step past the copies of its level.
    """
    levels = level_values(alpha)
    sorted_levels, order = torch.sort(levels, dim=1)
    rank = torch.argsort(order, dim=1)
    pos = rank.gather(1, previous)
    current = sorted_levels.gather(1, pos)
    below = torch.searchsorted(sorted_levels, current, side="left") - 1
    above = torch.searchsorted(sorted_levels, current, side="right")
    last = levels.shape[1] - 1
    candidates = torch.stack([torch.where(below < 0, pos, below), pos, torch.where(above > last, pos, above)],
                             dim=-1)
    values = sorted_levels.gather(1, candidates.reshape(len(u), -1)).reshape(candidates.shape)
    choice = (values - u.unsqueeze(-1)).abs().argmin(dim=-1, keepdim=True)
    return order.gather(1, candidates.gather(-1, choice).squeeze(-1))
