"""The packed matmul op and its backends (see `dispatch`)."""

from unibcq.kernels.dispatch import BACKENDS, bcq_linear, bcq_matmul, choose_backend, dequantize_weight
from unibcq.kernels.reference import bcq_linear_reference

__all__ = ["BACKENDS", "bcq_linear", "bcq_linear_reference", "bcq_matmul", "choose_backend", "dequantize_weight"]
