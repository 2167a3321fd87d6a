"""Calibration-free quantization: every decoder linear layer on its own.

Matrices are independent, so with `workers > 1` they are quantized in parallel worker
processes (spawned, one torch thread each); results are identical to a serial run. At most
2 x workers matrices are in flight, so memory stays bounded on large models.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError
from unibcq.methods.registry import PER_MATRIX_METHODS as METHODS
from unibcq.models.architectures import quantizable_linears, set_module
from unibcq.nn.qlinear import PackedTensor, packed_module
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
    accounting: dict[str, float] | None = None


def quantize_matrix(name: str, weight: torch.Tensor, config: QuantConfig) -> tuple[PackedTensor, float, float]:
    """(packed weight, relative Frobenius error, seconds) for one layer."""
    start = time.perf_counter()
    try:
        packed = METHODS[config.method](weight, config)
    except UnibcqError as exc:
        raise UnibcqError(f"{name}: {exc}") from exc
    seconds = time.perf_counter() - start
    weight = weight.float()
    error = (packed.dequantize() - weight).norm() / weight.norm().clamp(min=1e-30)
    return packed, float(error), seconds


def _worker_init() -> None:
    torch.set_num_threads(1)


def quantize_per_matrix(
    model: nn.Module, config: QuantConfig, show_progress: bool = True, workers: int = 1
) -> list[LayerRecord]:
    """Replace every decoder linear layer of `model` by its packed module, in place."""
    layers = quantizable_linears(model, config.include_lm_head)
    if config.include_lm_head:
        model.config.tie_word_embeddings = False
    records = []

    def install(name: str, result: tuple[PackedTensor, float, float]) -> None:
        packed, error, seconds = result
        layer, layer_cfg = layers[name], config.for_layer(name)
        bias = layer.bias.detach() if layer.bias is not None else None
        module = packed_module(packed, bias)
        set_module(model, name, module)
        accounting = packed.accounting() if hasattr(packed, "accounting") else None
        records.append(LayerRecord(name, config.method, layer_cfg.bits, layer_cfg.group_size, packed.numel,
                                   packed.bits_per_weight, error, seconds, accounting))

    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"{config.method} w{config.bits}", total=len(layers))
        if workers == 1:
            for name, layer in layers.items():
                install(name, quantize_matrix(name, layer.weight.detach(), config.for_layer(name)))
                bar.update(task, advance=1, description=f"{config.method} {name}")
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                pending: list[tuple[str, Future]] = []
                names = list(layers)
                for i, name in enumerate(names):
                    pending.append((name, pool.submit(quantize_matrix, name, layers[name].weight.detach().clone(),
                                                      config.for_layer(name))))
                    while pending and (len(pending) >= 2 * workers or i == len(names) - 1):
                        done_name, future = pending.pop(0)
                        install(done_name, future.result())
                        bar.update(task, advance=1, description=f"{config.method} {done_name}")
    return records
