"""`BCQLinear`: an nn.Linear replacement that holds packed BCQ tensors.

The packed tensors are buffers (`bcq_planes`, `bcq_alpha`, optional `bcq_offset`), so a
model's `state_dict` is exactly what a checkpoint stores and `load_state_dict` restores it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unibcq.formats.bcq import STORAGE_DTYPE, BCQTensor, num_groups
from unibcq.kernels import bcq_linear


class BCQLinear(nn.Module):
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
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = num_groups(in_features, group_size)
        self.register_buffer("bcq_planes", torch.zeros(bits, out_features, -(-in_features // 8), dtype=torch.uint8))
        self.register_buffer("bcq_alpha", torch.zeros(out_features, groups, bits, dtype=STORAGE_DTYPE))
        if has_offset:
            self.register_buffer("bcq_offset", torch.zeros(out_features, groups, dtype=STORAGE_DTYPE))
        else:
            self.bcq_offset = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.dense_cache: torch.Tensor | None = None

    @classmethod
    def from_tensor(cls, weight: BCQTensor, bias: torch.Tensor | None = None) -> "BCQLinear":
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            weight.bits,
            weight.group_size,
            has_offset=weight.offset is not None,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
        )
        layer.bcq_planes = weight.planes
        layer.bcq_alpha = weight.alpha
        if weight.offset is not None:
            layer.bcq_offset = weight.offset
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    def weight_tensor(self) -> BCQTensor:
        return BCQTensor(
            planes=self.bcq_planes,
            alpha=self.bcq_alpha,
            offset=self.bcq_offset,
            shape=(self.out_features, self.in_features),
            group_size=self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_cache is not None:
            return F.linear(x, self.dense_cache.to(x.dtype), self.bias)
        return bcq_linear(x, self.weight_tensor(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, offset={self.bcq_offset is not None}, bias={self.bias is not None}"
        )


@contextmanager
def dense_weights(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """Dequantize every `BCQLinear` once for a loop of forward passes, then drop the copies.

    Evaluation runs hundreds of forward passes; with the reference kernel each one would
    dequantize every layer again. The cached weights are the same `dequantize()` result, so
    outputs are identical; only speed and (temporarily) memory change.
    """
    layers = [m for m in model.modules() if isinstance(m, BCQLinear)]
    try:
        for layer in layers:
            layer.dense_cache = layer.weight_tensor().dequantize(dtype)
        yield model
    finally:
        for layer in layers:
            layer.dense_cache = None
