"""Deployment modules."""

from unibcq.nn.qlinear import BCQLinear, dense_weights

__all__ = ["BCQLinear", "dense_weights"]
