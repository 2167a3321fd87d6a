"""Model-level quantization procedures and their registry."""

from unibcq.methods.per_matrix import LayerRecord, quantize_model
from unibcq.methods.registry import METHODS, check_method

__all__ = ["LayerRecord", "METHODS", "check_method", "quantize_model"]
