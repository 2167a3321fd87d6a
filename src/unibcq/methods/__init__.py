"""Model-level quantization procedures and their registry."""

from unibcq.methods.per_matrix import LayerRecord
from unibcq.methods.quantize import quantize_model
from unibcq.methods.registry import CALIBRATED, METHODS, check_method

__all__ = ["CALIBRATED", "LayerRecord", "METHODS", "check_method", "quantize_model"]
