"""Run a per-group quantizer over a weight matrix and assemble one `BCQTensor`.

Quantizers work on a "group matrix" X of shape (R, g): R independent groups of g values.
A weight (out, in) gives one group matrix for its full groups (out * in // gs rows of gs)
and, when gs does not divide `in`, a second one for the shorter tail group of each row.
Running the same algorithm on both keeps every group inside its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from unibcq.errors import UnibcqError
from unibcq.finite import refuse_nonfinite
from unibcq.formats.bcq import STORAGE_DTYPE, BCQTensor, effective_group_size

# Largest magnitude the packed format's fp16 scales and offsets can hold.
STORAGE_MAX = torch.finfo(STORAGE_DTYPE).max


@dataclass
class GroupCodes:
    """Result of a quantizer on a group matrix (R, g).

    signs: bool (R, g, bits), True meaning +1; alpha: (R, bits); offset: (R,) or None.
    """

    signs: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None


GroupQuantizer = Callable[[torch.Tensor], GroupCodes]


def check_weight(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Validate a weight matrix and return it as contiguous float32."""
    if weight.dim() != 2:
        raise UnibcqError(f"{name} must be a 2-D matrix, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise UnibcqError(f"{name} is empty (shape {tuple(weight.shape)}); nothing to quantize")
    weight = refuse_nonfinite(name, weight.detach().float())
    peak = float(weight.abs().max())
    if peak > STORAGE_MAX:
        raise UnibcqError(
            f"{name} has values up to {peak:.3g}, beyond the fp16 range (+-{STORAGE_MAX:g}) of the packed "
            "format's scales; fix or re-export the model before quantizing"
        )
    return weight.contiguous()


def check_stored(packed: BCQTensor, weight: torch.Tensor, name: str = "weight") -> BCQTensor:
    """Reject a result whose scales overflowed fp16 (a weight range too wide for the format)."""
    try:
        packed.check_values()
    except UnibcqError as exc:
        groups = "per-row groups" if packed.group_size == -1 else f"groups of {packed.group_size}"
        raise UnibcqError(
            f"{name} spans {float(weight.min()):.3g}..{float(weight.max()):.3g}, too wide for the fp16 scales "
            f"of {packed.bits}-bit {groups} ({exc}); use more bits or smaller groups"
        ) from exc
    return packed


def group_parts(weight: torch.Tensor, group_size: int) -> list[tuple[torch.Tensor, int, int]]:
    """`weight` (out, in) as group rows: the full groups as one (out x groups, size) matrix and
    a shorter tail group, when the size does not divide the row, as another (out, tail), each
    with its groups per row and width. Fitting the tail on its own keeps padding out of every fit."""
    out_features, in_features = weight.shape
    gs = effective_group_size(in_features, group_size)
    full = in_features // gs
    parts: list[tuple[torch.Tensor, int, int]] = []
    if full:
        parts.append((weight[:, : full * gs].reshape(out_features * full, gs), full, gs))
    if in_features - full * gs:
        parts.append((weight[:, full * gs :].contiguous(), 1, in_features - full * gs))
    return parts


def quantize_by_groups(weight: torch.Tensor, group_size: int, quantizer: GroupQuantizer) -> BCQTensor:
    """Apply `quantizer` to every group of `weight` and pack the result."""
    weight = check_weight(weight)
    out_features = weight.shape[0]
    parts = group_parts(weight, group_size)
    signs, alphas, offsets = [], [], []
    for x, groups, width in parts:
        codes = quantizer(x.contiguous())
        bits = codes.alpha.shape[-1]
        signs.append(codes.signs.reshape(out_features, groups * width, bits))
        alphas.append(codes.alpha.reshape(out_features, groups, bits))
        if codes.offset is not None:
            offsets.append(codes.offset.reshape(out_features, groups))
    sign_planes = torch.cat(signs, dim=1).permute(2, 0, 1)
    offset = torch.cat(offsets, dim=1) if offsets else None
    return check_stored(BCQTensor.from_codes(sign_planes, torch.cat(alphas, dim=1), offset, group_size), weight)


def to_padded_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """View a weight (out, in) as (out, G, gs) groups plus a mask of real (non-pad) entries.

    The shorter tail group of each row is padded with its own last value, so statistics
    that ignore the mask (min / max) are unaffected; trainable per-weight parameters for the
    pad entries exist but never reach the output (see `from_padded_groups`).
    """
    out_features, in_features = weight.shape
    gs = effective_group_size(in_features, group_size)
    groups = -(-in_features // gs)
    pad = groups * gs - in_features
    mask = torch.ones(out_features, groups * gs, dtype=torch.bool, device=weight.device)
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(out_features, pad)], dim=1)
        mask[:, in_features:] = False
    return weight.reshape(out_features, groups, gs), mask.reshape(out_features, groups, gs)


def from_padded_groups(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `to_padded_groups`: (out, G, gs, ...) -> (out, in, ...)."""
    out_features, groups, gs = grouped.shape[:3]
    return grouped.reshape(out_features, groups * gs, *grouped.shape[3:])[:, :in_features]
