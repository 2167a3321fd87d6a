"""Sequential onloading for calibrated methods: decoder blocks are read from disk when their turn comes.

GPTQ and the reconstruction methods walk the blocks in order and need only the block at
hand in full precision. `onload_model` builds the model on the meta device, reads the
small parts outside the blocks (embeddings, final norm, lm_head, rotary tables) from the
safetensors shards, and returns a `BlockOnloader` that the engines call before each block
to read that block's weights. A finished block keeps only its packed layers, so memory
holds the packed model so far, one full-precision block and the calibration activations,
instead of the whole full-precision model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from unibcq.errors import UnibcqError
from unibcq.methods.registry import HESSIAN_METHODS
from unibcq.methods.streaming import meta_skeleton, read_model_config, read_tensor, source_weight_map
from unibcq.models.architectures import architecture_of, decoder_blocks


def _materialize(module: nn.Module, prefix: str, files: dict[str, Path]) -> None:
    """Give every meta parameter and persistent buffer of `module` its stored fp32 value."""
    module.to_empty(device="cpu", recurse=True)
    for name, param in module.named_parameters(recurse=True):
        key = f"{prefix}{name}"
        if key not in files:
            raise UnibcqError(f"the model files lack {key}")
        value = read_tensor(files[key], key).float()
        if value.shape != param.shape:
            raise UnibcqError(f"{key} has shape {tuple(value.shape)}, the config implies {tuple(param.shape)}")
        param.data = value
        param.requires_grad_(False)
    for name, buffer in module.named_buffers(recurse=True):
        key = f"{prefix}{name}"
        if key in files:
            buffer.data = read_tensor(files[key], key).to(buffer.dtype)


# Python, torch and transformers before any weight is read, plus the tokenizer and the
# calibration text: 660 MiB measured for `unibcq quantize` on SmolLM2 (469 MiB after the
# imports). It was 700 MiB until a SmolLM2 GPTQ run peaked at 1148 MiB against an estimate
# of 1114 MiB (docs/BENCHMARKS.md).
BASELINE_BYTES = 768 * 2**20
# Per kind of calibrated method: (peak memory of one block's quantization in multiples of its
# fp32 weights, copies of (hidden + intermediate + heads x seq_len) floats per token of one
# window's activations held while it runs, activation streams kept between blocks).
# Reconstruction (UniQuanF, FlexRound) holds the weights, element-wise parameters, gradients,
# two Adam moments, int64 level codes and the unified init's temporaries, and the window's
# activations for the backward pass; it keeps full-precision inputs, quantized inputs and
# targets. Measured for UniQuanF: 27x a 2048 x 5504 Llama block with 128-token windows
# (6804 MiB peak) and 43x a 1024 x 2816 block with 1024-token windows (3389 MiB).
# GPTQ holds per-layer Hessians and the column-update temporaries, runs windows without
# gradients, and keeps one stream plus the one it is writing (1756 MiB peak measured on the
# 1024 x 2816 model with 64 x 1024 tokens spilled).
RECONSTRUCTION_COST = (30, 20, 3)
HESSIAN_COST = (15, 4, 2)


def memory_estimate(model: PreTrainedModel, method: str, calib_samples: int, seq_len: int, bits: int,
                    spill: bool = False, batch_size: int = 1) -> int:
    """Bytes a calibrated run of `method` on an onloaded model needs at its peak (see the constants).

    With `spill` the activation streams live on disk and only the samples in use (one
    batch per stream) count.
    """
    block_copies, window_copies, streams = HESSIAN_COST if method in HESSIAN_METHODS else RECONSTRUCTION_COST
    config = model.config
    resident = sum(p.numel() * 4 for p in model.parameters() if not p.is_meta)
    blocks = decoder_blocks(model)
    block = sum(p.numel() for p in blocks[0].parameters()) * 4
    packed = sum(p.numel() for b in blocks for p in b.parameters()) * (bits + 1) / 8
    per_token = (config.hidden_size + getattr(config, "intermediate_size", 4 * config.hidden_size)
                 + getattr(config, "num_attention_heads", 1) * seq_len)
    window = window_copies * batch_size * seq_len * per_token * 4
    samples_held = batch_size if spill else calib_samples
    activations = streams * samples_held * seq_len * config.hidden_size * 4
    return int(BASELINE_BYTES + resident + block_copies * block + window + packed + activations)


class BlockOnloader:
    """Reads decoder block `index` from the shards into the meta model; called once per block."""

    def __init__(self, model: PreTrainedModel, files: dict[str, Path]) -> None:
        self.model = model
        self.files = files
        self.prefix = architecture_of(model).blocks

    def __call__(self, index: int) -> None:
        block = decoder_blocks(self.model)[index]
        if not any(p.is_meta for p in block.parameters()):
            return
        if any(True for _, b in block.named_buffers() if b.is_meta):
            raise UnibcqError("decoder blocks with computed buffers cannot be onloaded; quantize without --max-memory")
        _materialize(block, f"{self.prefix}.{index}.", self.files)


def onload_model(model_dir: str | os.PathLike) -> tuple[PreTrainedModel, BlockOnloader]:
    """The model with everything but its decoder blocks in memory, and the loader for the blocks."""
    model_dir = Path(model_dir)
    hf_config = read_model_config(model_dir)
    files = source_weight_map(model_dir)
    model = meta_skeleton(model_dir, hf_config, torch.float32)
    blocks = architecture_of(model).blocks
    block_modules = {id(b) for b in decoder_blocks(model)}
    for name, child in list(model.named_modules()):
        if id(child) in block_modules or name.startswith(f"{blocks}."):
            continue
        own_params = dict(child.named_parameters(recurse=False))
        meta_buffers = [b for b in child.buffers(recurse=False) if b.is_meta]
        for pname, param in own_params.items():
            key = f"{name}.{pname}" if name else pname
            if key not in files:
                continue  # tied lm_head: set by tie_weights below
            child._parameters[pname] = nn.Parameter(read_tensor(files[key], key).float(), requires_grad=False)
        if meta_buffers:
            # Computed buffers (rotary inverse frequencies): rebuild the module for real.
            try:
                rebuilt = type(child)(config=hf_config)
            except TypeError as exc:
                raise UnibcqError(f"cannot rebuild {name} ({type(child).__name__}) outside the meta device") from exc
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, rebuilt)
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(f"{blocks}.")]
    if leftover:
        raise UnibcqError(f"the model files lack {leftover[:3]}")
    model.eval()
    return model, BlockOnloader(model, files)
