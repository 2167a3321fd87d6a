"""The BCQ matmul op. Today: the torch reference (dequantize, then matmul)."""

from unibcq.kernels.reference import bcq_linear_reference

bcq_linear = bcq_linear_reference

__all__ = ["bcq_linear", "bcq_linear_reference"]
