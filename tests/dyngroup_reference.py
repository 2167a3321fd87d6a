"""An independent reference for dynamic grouping's bits-per-weight accounting, computed from a
solver's result (group sizes per segment) rather than from the stored group index, so the
format's `GroupedBinaryTensor.accounting` is checked against a second derivation."""

from __future__ import annotations

import math

import torch

from unibcq.errors import UnibcqError
from unibcq.quantizers.dyngroup import DynGroupResult


def bits_per_weight(result: DynGroupResult) -> dict[str, float]:
    """Storage cost per weight of a result under three accounting conventions.

    paper:   1 sign bit + 16 bits per scale: 1 + 16 G / N (the paper's figure, which
             leaves out how a weight finds its group).
    fixed:   plus a fixed-width group index of ceil(log2 G_s) bits per weight, each segment
             using its own G_s (0 bits for a single group).
    entropy: plus the entropy of the segment's group-size distribution, the average index
             cost an ideal entropy coder reaches.
    G counts the groups of all segments, N all weights. Raises UnibcqError for an empty
    weight, whose cost per weight is undefined.
    """
    n = result.signs.numel()
    if n == 0:
        raise UnibcqError("bits_per_weight is undefined for an empty weight")
    sizes = result.group_sizes.to(torch.float64)
    seg_n = sizes.sum(dim=1)  # > 0 for every segment once the weight is not empty
    base = 1.0 + 16.0 * int(result.num_groups.sum()) / n
    index_bits = torch.tensor([math.ceil(math.log2(g)) for g in result.num_groups.tolist()], dtype=torch.float64)
    p = sizes / seg_n.unsqueeze(1)
    entropy = -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(dim=1)
    return {
        "paper": base,
        "fixed": base + float((seg_n * index_bits).sum()) / n,
        "entropy": base + float((seg_n * entropy).sum()) / n,
    }
