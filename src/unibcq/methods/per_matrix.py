"""Calibration-free quantization: every decoder linear layer on its own, layer by layer."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError
from unibcq.methods.registry import METHODS
from unibcq.models.architectures import quantizable_linears, set_module
from unibcq.nn.qlinear import BCQLinear
from unibcq.progress import progress_bar


@dataclass
class LayerRecord:
    """One row of the summary table."""

    name: str
    method: str
    bits: int
    group_size: int
    numel: int
    bits_per_weight: float
    rel_error: float
    seconds: float


def quantize_model(model: nn.Module, config: QuantConfig, show_progress: bool = True) -> list[LayerRecord]:
    """Replace every decoder linear layer of `model` by a `BCQLinear`, in place."""
    config.validate()
    quantizer = METHODS[config.method]
    layers = quantizable_linears(model, config.include_lm_head)
    if config.include_lm_head:
        model.config.tie_word_embeddings = False
    torch.manual_seed(config.seed)
    records = []
    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"{config.method} w{config.bits}", total=len(layers))
        for name, layer in layers.items():
            if isinstance(layer, BCQLinear):
                raise UnibcqError(f"{name} is already quantized; start from a full-precision model")
            layer_cfg = config.for_layer(name)
            start = time.perf_counter()
            weight = layer.weight.detach()
            try:
                qweight = quantizer(weight, layer_cfg)
            except UnibcqError as exc:
                raise UnibcqError(f"{name}: {exc}") from exc
            seconds = time.perf_counter() - start
            error = (qweight.dequantize() - weight.float()).norm() / weight.float().norm().clamp(min=1e-30)
            bias = layer.bias.detach() if layer.bias is not None else None
            set_module(model, name, BCQLinear.from_tensor(qweight, bias))
            records.append(
                LayerRecord(
                    name, config.method, layer_cfg.bits, layer_cfg.group_size, qweight.numel,
                    qweight.bits_per_weight, float(error), seconds,
                )
            )
            bar.update(task, advance=1, description=f"{config.method} {name}")
    return records
