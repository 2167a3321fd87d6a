"""Deployment linear layers that hold packed weights: `BCQLinear` and `GroupedBinaryLinear`.

The packed tensors are buffers, so a model's `state_dict` is exactly what a checkpoint
stores and `load_state_dict` restores it. Both compute through `kernels.bcq_linear`: BCQ
weights through the packed matmul `unibcq::bcq_matmul`, grouped-binary ones by dequantizing
with the weight's own `dequantize()`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unibcq.formats.bcq import STORAGE_DTYPE, BCQTensor, num_groups
from unibcq.formats.grouped_binary import GroupedBinaryTensor, index_bits_for, num_segments
from unibcq.kernels import bcq_linear
from unibcq.kernels.dispatch import dequantize_weight
from unibcq.memory import available_memory_bytes

PackedTensor = BCQTensor | GroupedBinaryTensor


class PackedLinear(nn.Module):
    """Common part: shape, bias, the forward pass and the layout a checkpoint records."""

    format_name: str = ""
    scale_buffers: tuple[str, ...] = ()  # the fp16 scales (and offsets) of the packed format

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.dense_cache: torch.Tensor | None = None
        # Inside `dense_weights`, layers left out of the cache dequantize to this dtype on
        # every call and compute like the cached ones, so results do not depend on which fit.
        self.dense_dtype: torch.dtype | None = None

    def weight_tensor(self) -> PackedTensor:
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "PackedLinear":
        """Under `model.to(dtype)`, `.bfloat16()` or `.float()` the packed scales keep their storage
        dtype and only follow the device: cast, they would lose precision (fp16 -> bf16) and make a
        checkpoint that loading refuses. The forward pass computes in its input's dtype either way."""
        stored = {name: self._buffers[name] for name in self.scale_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in stored.items():
            if self._buffers[name].dtype != original.dtype:
                self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def layout(self) -> dict[str, Any]:
        """What the loader needs to rebuild this module."""
        return {"format": self.format_name, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias.data = bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_cache is not None:
            return F.linear(x, self.dense_cache.to(x.dtype), self._bias_as(x))
        if self.dense_dtype is not None:
            return F.linear(x, dequantize_weight(self.weight_tensor(), self.dense_dtype).to(x.dtype), self._bias_as(x))
        return bcq_linear(x, self.weight_tensor(), self.bias)

    def _bias_as(self, x: torch.Tensor) -> torch.Tensor | None:
        """The bias in the input's dtype, as the kernels add it (the output follows the input)."""
        return None if self.bias is None else self.bias.to(x.dtype)


class BCQLinear(PackedLinear):
    """A linear layer stored as packed BCQ: `bits` sign planes, one fp16 scale per plane and
    group of `group_size` input columns (-1: the whole row), and an optional fp16 offset per
    group (formats/bcq.py). Every method but dyngroup produces it; dyngroup's layers are
    `GroupedBinaryLinear`, and `PackedLinear` is the type both share."""

    format_name = "bcq"
    scale_buffers = ("bcq_alpha", "bcq_offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        has_offset: bool = True,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.bits = bits
        self.group_size = group_size
        groups = num_groups(in_features, group_size)
        self.register_buffer("bcq_planes", torch.zeros(bits, out_features, -(-in_features // 8), dtype=torch.uint8))
        self.register_buffer("bcq_alpha", torch.zeros(out_features, groups, bits, dtype=STORAGE_DTYPE))
        if has_offset:
            self.register_buffer("bcq_offset", torch.zeros(out_features, groups, dtype=STORAGE_DTYPE))
        else:
            self.bcq_offset = None

    @classmethod
    def from_tensor(cls, weight: BCQTensor, bias: torch.Tensor | None = None) -> "BCQLinear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, weight.bits, weight.group_size, weight.offset is not None,
                    bias is not None, bias.dtype if bias is not None else torch.float32)
        layer.bcq_planes = weight.planes
        layer.bcq_alpha = weight.alpha
        if weight.offset is not None:
            layer.bcq_offset = weight.offset
        layer._set_bias(bias)
        return layer

    @classmethod
    def from_layout(cls, spec: dict[str, Any], dtype: torch.dtype) -> "BCQLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                   bool(spec.get("offset", True)), bool(spec.get("bias", False)), dtype)

    def weight_tensor(self) -> BCQTensor:
        return BCQTensor(self.bcq_planes, self.bcq_alpha, self.bcq_offset,
                         (self.out_features, self.in_features), self.group_size)

    def layout(self) -> dict[str, Any]:
        return super().layout() | {"bits": self.bits, "group_size": self.group_size,
                                   "offset": self.bcq_offset is not None}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, offset={self.bcq_offset is not None}, bias={self.bias is not None}"
        )


class GroupedBinaryLinear(PackedLinear):
    """1-bit signs with per-weight dynamic group indices (see formats/grouped_binary.py)."""

    format_name = "grouped-binary"
    scale_buffers = ("gb_scales",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_groups: int,
        granularity: str,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.max_groups = max_groups
        self.granularity = granularity
        packed = -(-in_features // 8)
        segments = num_segments(granularity, (out_features, in_features))
        self.register_buffer("gb_signs", torch.zeros(out_features, packed, dtype=torch.uint8))
        self.register_buffer("gb_index", torch.zeros(index_bits_for(max_groups), out_features, packed, dtype=torch.uint8))
        self.register_buffer("gb_scales", torch.zeros(segments, max_groups, dtype=STORAGE_DTYPE))

    @classmethod
    def from_tensor(cls, weight: GroupedBinaryTensor, bias: torch.Tensor | None = None) -> "GroupedBinaryLinear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, weight.scales.shape[1], weight.granularity, bias is not None,
                    bias.dtype if bias is not None else torch.float32)
        layer.gb_signs, layer.gb_index, layer.gb_scales = weight.signs, weight.index, weight.scales
        layer._set_bias(bias)
        return layer

    @classmethod
    def from_layout(cls, spec: dict[str, Any], dtype: torch.dtype) -> "GroupedBinaryLinear":
        return cls(spec["in_features"], spec["out_features"], spec["max_groups"], spec["granularity"],
                   bool(spec.get("bias", False)), dtype)

    def weight_tensor(self) -> GroupedBinaryTensor:
        return GroupedBinaryTensor(self.gb_signs, self.gb_index, self.gb_scales,
                                   (self.out_features, self.in_features), self.granularity)

    def layout(self) -> dict[str, Any]:
        return super().layout() | {"bits": 1, "max_groups": self.max_groups, "granularity": self.granularity,
                                   **self.weight_tensor().accounting()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_groups={self.max_groups}, granularity={self.granularity}, bias={self.bias is not None}")


PACKED_MODULES: dict[str, type[PackedLinear]] = {m.format_name: m for m in (BCQLinear, GroupedBinaryLinear)}


def packed_module(weight: PackedTensor, bias: torch.Tensor | None) -> PackedLinear:
    """The deployment module for a packed weight of either format."""
    if isinstance(weight, GroupedBinaryTensor):
        return GroupedBinaryLinear.from_tensor(weight, bias)
    return BCQLinear.from_tensor(weight, bias)


# Share of the memory still available that `dense_weights` may fill by default.
DENSE_CACHE_SHARE = 0.5


@contextmanager
def dense_weights(model: nn.Module, dtype: torch.dtype = torch.float32,
                  budget_bytes: int | None = None) -> Iterator[nn.Module]:
    """Dequantize packed layers once for a loop of forward passes, then drop the copies.

    Evaluation runs hundreds of forward passes; with the reference kernel each one would
    dequantize every layer again. The cached weights are the same `dequantize()` result, so
    outputs are identical; only speed and (temporarily) memory change. Layers are cached
    while their dense copies fit in `budget_bytes` (default: half the memory still
    available where the model is); the rest dequantize on each call into the same matmul, so
    a model whose dense form outgrows memory (a 7B model is 26 GB in float32) still runs, and
    the results do not depend on how many layers fit.
    """
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if budget_bytes is None and layers:
        available = available_memory_bytes(next(layers[0].buffers()).device)  # packed layers may have no parameter
        budget_bytes = int(available * DENSE_CACHE_SHARE) if available is not None else None
    element = torch.empty((), dtype=dtype).element_size()
    used = 0
    try:
        for layer in layers:
            layer.dense_dtype = dtype
            size = layer.in_features * layer.out_features * element
            if budget_bytes is None or used + size <= budget_bytes:
                layer.dense_cache = dequantize_weight(layer.weight_tensor(), dtype)
                used += size
        yield model
    finally:
        for layer in layers:
            layer.dense_cache = None
            layer.dense_dtype = None
