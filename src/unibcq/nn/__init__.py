"""Deployment modules."""

from unibcq.nn.qlinear import BCQLinear

__all__ = ["BCQLinear"]
