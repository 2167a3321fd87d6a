"""The one packed binary-coding (BCQ) weight format that every method writes.

A weight W (out x in) is split, row by row, into groups of `group_size` consecutive input
columns (`-1`: the whole row). When the group size does not divide the row, the last group
of every row is shorter, as GPTQ's column-index grouping does; a group never spans two rows.
Each group g is stored as

    W[g] ~= sum_i alpha[g, i] * b_i[g] + offset[g],   b_i in {-1, +1}

with
    planes : uint8 (bits, out, ceil(in / 8)), bit k of byte j is column 8j + k, 1 means +1
    alpha  : float16 (out, groups, bits)
    offset : float16 (out, groups), or None for offset-free BCQ

Uniform quantization is an exact special case, stored up to fp16 rounding of the offset
(see `unibcq.quantizers.uniform`), so RTN,
GPTQ and FlexRound results live in the same tensors and are served by the same kernels.
Bits per weight are computed from the bytes actually stored, padding included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unibcq.errors import UnibcqError

STORAGE_DTYPE = torch.float16
MIN_BITS, MAX_BITS = 1, 8  # bit-planes a BCQ tensor holds; every bit-width check reads these


def validate_group_size(group_size: int) -> None:
    """Reject group sizes that cannot describe a grouping (0 and anything below -1)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise UnibcqError(f"group size must be an integer, got {group_size!r}")
    if group_size == 0 or group_size < -1:
        raise UnibcqError(
            f"invalid group size {group_size}: use a positive number of input columns "
            "(e.g. 128) or -1 for one group per output row"
        )


def effective_group_size(in_features: int, group_size: int) -> int:
    """Columns per (full) group: the whole row for -1 or a group wider than the row."""
    validate_group_size(group_size)
    if group_size == -1 or group_size >= in_features:
        return max(in_features, 1)
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; the last one is shorter when group_size does not divide the row."""
    gs = effective_group_size(in_features, group_size)
    return -(-in_features // gs) if in_features else 0


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Group id of every input column (int64, shape (in_features,))."""
    gs = effective_group_size(in_features, group_size)
    return torch.arange(in_features, device=device) // gs


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (..., in) into uint8 (..., ceil(in / 8)), 8 columns per byte."""
    in_features = signs.shape[-1]
    pad = (-in_features) % 8
    if pad:
        signs = torch.nn.functional.pad(signs, (0, pad), value=False)
    bits = signs.reshape(*signs.shape[:-1], -1, 8).to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.uint8, device=signs.device))
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_signs`: uint8 (..., ceil(in / 8)) -> bool (..., in)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :in_features].bool()


class StoredSize:
    """Honest size of a packed weight, from the tensors it really stores (padding included).

    Subclasses provide `tensors()` and `numel`.
    """

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        """Every stored bit (codes, scales, offsets, indices) per quantized weight."""
        return 8.0 * self.nbytes / max(self.numel, 1)


@dataclass
class BCQTensor(StoredSize):
    """One quantized weight matrix in the packed BCQ format (see the module docstring)."""

    planes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    shape: tuple[int, int]
    group_size: int

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        validate_group_size(self.group_size)
        out_features, in_features = self.shape
        bits = self.bits
        groups = num_groups(in_features, self.group_size)
        if not MIN_BITS <= bits <= MAX_BITS:
            raise UnibcqError(f"BCQ tensors hold {MIN_BITS}..{MAX_BITS} bit-planes, got {bits}")
        expected = {
            "planes": (self.planes, (bits, out_features, -(-in_features // 8)), torch.uint8),
            "alpha": (self.alpha, (out_features, groups, bits), STORAGE_DTYPE),
        }
        if self.offset is not None:
            expected["offset"] = (self.offset, (out_features, groups), STORAGE_DTYPE)
        for name, (tensor, want_shape, want_dtype) in expected.items():
            if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
                raise UnibcqError(
                    f"BCQ {name} has shape {tuple(tensor.shape)} / {tensor.dtype}, expected "
                    f"{want_shape} / {want_dtype} for a {self.shape} weight with {bits} bits "
                    f"and group size {self.group_size}"
                )

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def from_codes(
        cls,
        signs: torch.Tensor,
        alpha: torch.Tensor,
        offset: torch.Tensor | None,
        group_size: int,
    ) -> "BCQTensor":
        """Build from unpacked codes: signs bool (bits, out, in), True meaning +1."""
        if signs.dim() != 3:
            raise UnibcqError(f"signs must be (bits, out, in), got shape {tuple(signs.shape)}")
        if signs.dtype != torch.bool:  # a +-1 tensor's .bool() is all True: every sign would be +1
            raise UnibcqError(f"signs must be a bool tensor (True = +1), got {signs.dtype}")
        return cls(
            planes=pack_signs(signs),
            alpha=alpha.to(STORAGE_DTYPE).contiguous(),
            offset=None if offset is None else offset.to(STORAGE_DTYPE).contiguous(),
            shape=(signs.shape[1], signs.shape[2]),
            group_size=group_size,
        )

    def check_values(self) -> None:
        """Reject stored scales no quantizer writes (NaN/inf: a corrupt file or an fp16 overflow)."""
        for name, tensor in (("alpha", self.alpha), ("offset", self.offset)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise UnibcqError(f"BCQ {name} holds NaN/inf values")

    def signs(self) -> torch.Tensor:
        """Bit-planes as +-1 float32, shape (bits, out, in)."""
        return unpack_signs(self.planes, self.shape[1]).float() * 2 - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight (out, in). Accumulates in float32, one bit-plane at a time."""
        out_features, in_features = self.shape
        cols = group_index(in_features, self.group_size, self.alpha.device)
        signs = unpack_signs(self.planes, in_features)
        alpha = self.alpha.float()
        weight = torch.zeros(out_features, in_features, dtype=torch.float32, device=self.planes.device)
        for i in range(self.bits):
            scale = alpha[:, :, i].index_select(1, cols)
            weight += torch.where(signs[i], scale, -scale)
        if self.offset is not None:
            weight += self.offset.float().index_select(1, cols)
        return weight.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors, keyed by their suffix in a checkpoint."""
        out = {"bcq_planes": self.planes, "bcq_alpha": self.alpha}
        if self.offset is not None:
            out["bcq_offset"] = self.offset
        return out

