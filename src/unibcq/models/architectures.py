"""Where the decoder blocks and their linear layers live, per architecture.

An architecture is a few lines of data: the attribute path of the block list and the
block's linear layers in execution order, the order in which they are quantized and reported.
GPTQ's default does not depend on that order: every layer's Hessian comes from one pass over
the block before any of its layers is quantized (the reference implementation's default);
`--true-sequential` groups the layers by their shared input instead (`methods.sequential`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unibcq.errors import UnibcqError, UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    blocks: str
    linears: tuple[str, ...]


LLAMA_LIKE = Architecture(
    blocks="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
)

# model_type (config.json) -> layout. SmolLM / SmolLM2 are `llama`.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
}


def architecture_of(model: nn.Module) -> Architecture:
    """The layout of `model`, or a clear error naming the supported model types."""
    return architecture_for(getattr(model, "config", None))


def architecture_for(config: object) -> Architecture:
    """The layout a model with this (transformers) config has, or a clear error naming the
    supported model types: asked of the config alone, before weights or data are read."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; unibcq supports "
            f"{', '.join(sorted(ARCHITECTURES))} (the Llama family: Llama, Mistral, Qwen2/3, SmolLM)"
        )
    return ARCHITECTURES[model_type]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks in order."""
    arch = architecture_of(model)
    return list(model.get_submodule(arch.blocks))


def block_linears(model: nn.Module, index: int) -> dict[str, nn.Module]:
    """Full name -> module of block `index`'s linear layers, in execution order."""
    arch = architecture_of(model)
    block = decoder_blocks(model)[index]
    return {f"{arch.blocks}.{index}.{name}": block.get_submodule(name) for name in arch.linears}


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Every decoder linear layer (full name -> module), block by block; lm_head if asked."""
    layers: dict[str, nn.Module] = {}
    for i in range(len(decoder_blocks(model))):
        layers.update(block_linears(model, i))
    if include_lm_head:
        layers["lm_head"] = model.get_output_embeddings()
    return layers


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# RoPE scalings that stretch a trained context at run time (Qwen2.5's YaRN recipe keeps
# max_position_embeddings at the trained length and sets these instead).
STRETCHING_ROPE = ("yarn", "dynamic", "longrope")


def context_window(config: object) -> int | None:
    """The positions a model is meant to run on, from its config; None when it names none.

    With a stretching RoPE scaling whose original length is max_position_embeddings, that
    length times the scaling factor.
    """
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            break
    else:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) in STRETCHING_ROPE:
        factor, original = rope.get("factor"), rope.get("original_max_position_embeddings", value)
        if isinstance(factor, (int, float)) and factor > 1 and original == value:
            return int(value * factor)
    return value


def check_window_fits(model: nn.Module, seq_len: int, purpose: str,
                      setting: str = "--seq-len; QuantConfig.calib_seq_len from Python") -> None:
    """Refuse windows longer than the model's context: positions past it were never trained, so a
    perplexity or a calibration over them measures extrapolation, not the model."""
    window = context_window(getattr(model, "config", None))
    if window is not None and seq_len > window:
        raise UnibcqError(f"{purpose} of {seq_len} tokens exceed the model's context window of {window} positions; "
                          f"use {window} or fewer ({setting})")
