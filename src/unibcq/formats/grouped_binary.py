"""Packed grouped-binary format for dynamic grouping (Zheng et al. 2025).

Every weight is sign(w) * scale[segment, group]; groups are unstructured, so each weight
carries its group index. Stored tensors:

    gb_signs  : uint8 (out, ceil(in / 8)), bit k of byte j is column 8j + k, 1 means +
    gb_index  : uint8 (index_bits, out, ceil(in / 8)), fixed-length group index as bit-planes
                (index_bits = ceil(log2 G), G the largest group count of any segment; 0 planes
                when there is a single group)
    gb_scales : float16 (segments, G), zero-padded per segment

Segments: "matrix" (one), "row" (each output row), or "block:N" (column blocks of N inputs).
The file really pays 1 + index_bits + 16 * segments * G / N bits per weight (plus byte
padding); `accounting()` also reports the paper's count, which leaves the index out, and
the entropy-coded index cost, so all three can be compared side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import STORAGE_DTYPE, StoredSize, pack_signs, unpack_signs

MAX_GROUPS = 256  # groups per segment an 8-bit group index addresses


def parse_granularity(granularity: str) -> str | tuple[str, int]:
    """'matrix' | 'row' | 'block:N' -> the quantizer's form ('block', N)."""
    if isinstance(granularity, str):
        if granularity in ("matrix", "row"):
            return granularity
        kind, _, width = granularity.partition(":")
        # ASCII digits only (str.isdigit() also accepts characters such as '²' that int()
        # rejects), and few enough of them for int() to parse.
        if kind == "block" and width.isascii() and width.isdigit() and len(width) <= 18 and int(width) > 0:
            return ("block", int(width))
    shown = repr(granularity)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise UnibcqError(f"granularity must be 'matrix', 'row' or 'block:N' (N > 0), got {shown}")


def segment_of(granularity: str, shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Segment id of every weight (int64, the weight's shape)."""
    rows, cols = shape
    kind = parse_granularity(granularity)
    if kind == "matrix":
        return torch.zeros(rows, cols, dtype=torch.int64, device=device)
    if kind == "row":
        return torch.arange(rows, device=device)[:, None].expand(rows, cols)
    return (torch.arange(cols, device=device) // kind[1])[None, :].expand(rows, cols)


def num_segments(granularity: str, shape: tuple[int, int]) -> int:
    kind = parse_granularity(granularity)
    if kind == "matrix":
        return 1
    if kind == "row":
        return shape[0]
    return -(-shape[1] // kind[1])


def index_bits_for(groups: int) -> int:
    return math.ceil(math.log2(groups)) if groups > 1 else 0


@dataclass
class GroupedBinaryTensor(StoredSize):
    signs: torch.Tensor
    index: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    granularity: str

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        out_features, in_features = self.shape
        packed = -(-in_features // 8)
        segments = num_segments(self.granularity, self.shape)
        checks = {
            "gb_signs": (self.signs, (out_features, packed), torch.uint8),
            "gb_index": (self.index, (index_bits_for(self.scales.shape[-1]), out_features, packed), torch.uint8),
            "gb_scales": (self.scales, (segments, self.scales.shape[-1]), STORAGE_DTYPE),
        }
        for name, (tensor, want_shape, want_dtype) in checks.items():
            if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
                raise UnibcqError(
                    f"{name} has shape {tuple(tensor.shape)} / {tensor.dtype}, expected {want_shape} / "
                    f"{want_dtype} for a {self.shape} weight with granularity {self.granularity}"
                )

    @classmethod
    def from_parts(
        cls, signs: torch.Tensor, group_index: torch.Tensor, scales: torch.Tensor, granularity: str
    ) -> "GroupedBinaryTensor":
        """Pack bool signs (out, in), int group ids (out, in) and scales (segments, G)."""
        bits = index_bits_for(scales.shape[-1])
        planes = [pack_signs(((group_index >> k) & 1).bool()) for k in range(bits)]
        packed_cols = -(-signs.shape[1] // 8)
        index = torch.stack(planes) if planes else torch.zeros(0, signs.shape[0], packed_cols, dtype=torch.uint8)
        return cls(pack_signs(signs.bool()), index, scales.to(STORAGE_DTYPE).contiguous(),
                   tuple(signs.shape), granularity)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def group_index(self) -> torch.Tensor:
        """Group id of every weight (int64, out x in)."""
        index = torch.zeros(self.shape, dtype=torch.int64, device=self.signs.device)
        for k in range(self.index.shape[0]):
            index |= unpack_signs(self.index[k], self.shape[1]).to(torch.int64) << k
        return index

    def check_values(self) -> None:
        """Reject stored values no quantizer writes: NaN/inf scales, group indices past the scales.

        An index past a segment's scale slots would read another segment's scale, or past the
        end of the tensor (an indexing error at the first forward pass).
        """
        if not bool(torch.isfinite(self.scales).all()):
            raise UnibcqError("gb_scales holds NaN/inf values")
        if self.index.shape[0] and int(self.group_index().max()) >= self.scales.shape[1]:
            raise UnibcqError(
                f"gb_index holds group {int(self.group_index().max())}, but there are only "
                f"{self.scales.shape[1]} scale slots per segment"
            )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = segment_of(self.granularity, self.shape, self.signs.device) * self.scales.shape[1] + self.group_index()
        magnitude = self.scales.float().reshape(-1)[flat]
        positive = unpack_signs(self.signs, self.shape[1])
        return torch.where(positive, magnitude, -magnitude).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"gb_signs": self.signs, "gb_index": self.index, "gb_scales": self.scales}

    def accounting(self) -> dict[str, float]:
        """Bits per weight three ways: the paper's (no index), fixed-length and entropy index.

        Group counts and sizes are read from the stored index, so empty padding groups
        (scale slots a segment does not use) are not counted as groups. "Fixed" gives each
        segment an index of its own width, ceil(log2 G_s); the file stores one width for all
        segments (the widest's), which only `bits_per_weight`, from the stored bytes, counts.
        """
        segment = segment_of(self.granularity, self.shape, self.signs.device)
        width = self.scales.shape[1]
        sizes = torch.bincount((segment * width + self.group_index()).reshape(-1),
                               minlength=segment.max().item() * width + width).reshape(-1, width).double()
        n = self.numel
        groups = int((sizes > 0).sum())
        base = 1.0 + 16.0 * groups / n
        seg_n = sizes.sum(1)
        p = sizes / seg_n.clamp(min=1)[:, None]
        entropy = -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(1)
        fixed = torch.tensor([index_bits_for(int(g)) for g in (sizes > 0).sum(1).tolist()], dtype=torch.float64)
        return {
            "bits_per_weight_paper": base,
            "bits_per_weight_fixed": base + float((seg_n * fixed).sum()) / n,
            "bits_per_weight_entropy": base + float((seg_n * entropy).sum()) / n,
        }
