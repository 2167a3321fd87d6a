"""Model loading and per-architecture discovery of decoder blocks and linear layers."""

from unibcq.models.architectures import (
    ARCHITECTURES,
    architecture_of,
    block_linears,
    decoder_blocks,
    quantizable_linears,
    set_module,
)
from unibcq.models.loading import load_model, load_tokenizer, resolve_model

__all__ = [
    "ARCHITECTURES",
    "architecture_of",
    "block_linears",
    "decoder_blocks",
    "load_model",
    "load_tokenizer",
    "quantizable_linears",
    "resolve_model",
    "set_module",
]
