"""Deployment modules holding packed weights."""

from unibcq.nn.qlinear import PACKED_MODULES, BCQLinear, GroupedBinaryLinear, PackedLinear, dense_weights, packed_module

__all__ = ["PACKED_MODULES", "BCQLinear", "GroupedBinaryLinear", "PackedLinear", "dense_weights", "packed_module"]
