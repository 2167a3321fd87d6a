"""A torch function mode that records the dtype of every `F.linear` input it sees."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class LinearDtypes(TorchFunctionMode):
    """Entered outside `half_linear_in_float32`, it sees the products that mode hands on: float32
    where the mode widened a product, the half dtype where torch computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            self.dtypes.append((args[0] if args else kwargs["input"]).dtype)
        return func(*args, **kwargs)
