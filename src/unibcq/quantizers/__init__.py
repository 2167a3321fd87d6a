"""Pure per-tensor quantization algorithms: weight in, packed BCQ tensors out."""

from unibcq.quantizers.bcq import quantize_bcq
from unibcq.quantizers.uniform import quantize_rtn

__all__ = ["quantize_bcq", "quantize_rtn"]
