"""Method name -> per-matrix quantizer. A new method is one entry here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor
from unibcq.quantizers import quantize_bcq, quantize_rtn

if TYPE_CHECKING:
    from unibcq.config import QuantConfig

MatrixQuantizer = Callable[[torch.Tensor, "QuantConfig"], BCQTensor]


def _bcq(algorithm: str) -> MatrixQuantizer:
    return lambda w, c: quantize_bcq(w, c.bits, c.group_size, algorithm, c.offset, c.iters, c.init)


METHODS: dict[str, MatrixQuantizer] = {
    "rtn": lambda w, c: quantize_rtn(w, c.bits, c.group_size, c.symmetric, c.clip_search),
    "bcq-greedy": _bcq("greedy"),
    "bcq-refined": _bcq("refined"),
    "bcq-alternating": _bcq("alternating"),
}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UnibcqError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
