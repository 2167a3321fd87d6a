"""Builders for the tiny random-init models the tests use (importable by name from tests)."""

from __future__ import annotations

import torch

TINY_HIDDEN = 72
TINY_INTERMEDIATE = 136
TINY_VOCAB = 256
TINY_LAYERS = 2


def _tiny_config_kwargs(tie_word_embeddings: bool, **overrides) -> dict:
    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    kwargs.update(overrides)
    return kwargs


def _build(config, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # from_config(dtype=...) (not .to(dtype)) mirrors from_pretrained: config.dtype is set and
    # the rotary inv_freq buffer stays float32.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Re-seed every parameter explicitly so the weights do not depend on HF's init scheme.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.dim() == 1:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()
