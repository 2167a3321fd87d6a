"""Reference linear for packed weights: dequantize, then a dense matmul.

Always available and the ground truth every faster backend is tested against. It serves
any packed format that implements `dequantize(dtype)` (BCQ and grouped-binary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bcq_linear_reference(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W dequantized from the packed `weight` in x's dtype."""
    return F.linear(x, weight.dequantize(x.dtype), bias)
