"""Reference BCQ linear: dequantize the packed weight, then a dense matmul.

Always available and the ground truth every faster backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unibcq.formats.bcq import BCQTensor


def bcq_linear_reference(x: torch.Tensor, weight: BCQTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W dequantized from `weight` in x's dtype."""
    return F.linear(x, weight.dequantize(x.dtype), bias)
