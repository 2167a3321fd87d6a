"""Calibration-free quantization: every decoder linear layer on its own.

Matrices are independent, so with `workers > 1` they are quantized in parallel worker
processes (spawned, one torch thread each), or with `backend="ray"` as Ray tasks on a
cluster (the one `RAY_ADDRESS` names, else a local instance); results are identical to a
serial run. At most 2 x workers matrices are in flight, so memory stays bounded on large
models.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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
    seconds: float | None  # None: trained jointly with its block, whose time the block table gives
    accounting: dict[str, float] | None = None

    @classmethod
    def of(cls, name: str, config: QuantConfig, packed: PackedTensor, rel_error: float,
           seconds: float | None) -> LayerRecord:
        """The row of layer `name`, packed under `config` (its per-layer bits and group size);
        formats with index costs (grouped binary) add their bits-per-weight accounting."""
        layer_cfg = config.for_layer(name)
        accounting = packed.accounting() if hasattr(packed, "accounting") else None
        return cls(name, config.method, layer_cfg.bits, layer_cfg.group_size, packed.numel, packed.bits_per_weight,
                   rel_error, seconds, accounting)


def relative_error(packed: PackedTensor, weight: torch.Tensor) -> float:
    """||dequantize(packed) - W||_F / ||W||_F, the error every summary table reports."""
    weight = weight.detach().float()
    return float((packed.dequantize().to(weight.device) - weight).norm() / weight.norm().clamp(min=1e-30))


def quantize_matrix(name: str, weight: torch.Tensor, config: QuantConfig) -> tuple[PackedTensor, float, float]:
    """(packed weight, relative Frobenius error, seconds) for one layer."""
    start = time.perf_counter()
    try:
        packed = METHODS[config.method](weight, config)
    except UnibcqError as exc:
        raise UnibcqError(f"{name}: {exc}") from exc
    return packed, relative_error(packed, weight), time.perf_counter() - start


def _worker_init() -> None:
    torch.set_num_threads(1)


BACKENDS = ("local", "ray")


def _bounded(names: list[str], submit: Callable[[str], Any], wait: Callable[[Any], Any],
             in_flight: int) -> Iterator[tuple[str, Any]]:
    """Yield (name, result) in order, with at most `in_flight` submitted and not yet collected."""
    pending: list[tuple[str, Any]] = []
    for i, name in enumerate(names):
        pending.append((name, submit(name)))
        while pending and (len(pending) >= in_flight or i == len(names) - 1):
            done_name, handle = pending.pop(0)
            yield done_name, wait(handle)


def _ray_results(layers: dict[str, nn.Module], config: QuantConfig, workers: int) -> Iterator[tuple[str, Any]]:
    """Quantize every layer as a Ray task (one CPU each) on the cluster RAY_ADDRESS names, or locally."""
    try:
        import ray
    except ImportError as exc:
        raise UnibcqError("--backend ray needs Ray: pip install 'unibcq[ray]'") from exc
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": workers}))
    task = ray.remote(num_cpus=1)(_ray_quantize)

    def submit(name: str) -> Any:
        return task.remote(name, layers[name].weight.detach().clone(), config.for_layer(name))

    yield from _bounded(list(layers), submit, ray.get, 2 * workers)


def _ray_quantize(name: str, weight: torch.Tensor, config: QuantConfig) -> tuple[PackedTensor, float, float]:
    torch.set_num_threads(1)
    return quantize_matrix(name, weight, config)


def quantize_per_matrix(
    model: nn.Module, config: QuantConfig, show_progress: bool = True, workers: int = 1, backend: str = "local"
) -> list[LayerRecord]:
    """Replace every decoder linear layer of `model` by its packed module, in place."""
    if backend not in BACKENDS:
        raise UnibcqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    layers = quantizable_linears(model, config.include_lm_head)
    if config.include_lm_head:
        model.config.tie_word_embeddings = False
    records = []

    def install(name: str, result: tuple[PackedTensor, float, float]) -> None:
        packed, error, seconds = result
        layer = layers[name]
        set_module(model, name, packed_module(packed, layer.bias.detach() if layer.bias is not None else None))
        records.append(LayerRecord.of(name, config, packed, error, seconds))

    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"{config.method} w{config.bits}", total=len(layers))
        if backend == "ray":
            results: Iterator[tuple[str, Any]] = _ray_results(layers, config, workers)
        elif workers == 1:
            results = ((name, quantize_matrix(name, layer.weight.detach(), config.for_layer(name)))
                       for name, layer in layers.items())
        else:
            results = _process_results(layers, config, workers)
        for name, result in results:
            install(name, result)
            bar.update(task, advance=1, description=f"{config.method} {name}")
    return records


def _process_results(layers: dict[str, nn.Module], config: QuantConfig, workers: int) -> Iterator[tuple[str, Any]]:
    """Quantize every layer in spawned local worker processes (one torch thread each)."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)

    def submit(name: str) -> Future:
        return pool.submit(quantize_matrix, name, layers[name].weight.detach().clone(), config.for_layer(name))

    try:
        yield from _bounded(list(layers), submit, Future.result, 2 * workers)
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        raise UnibcqError(f"a worker process died while quantizing (killed, most often for memory: each of the "
                          f"{workers} workers holds its own copies of a matrix); rerun with fewer --workers") from None
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or failed: drop the queued matrices instead of finishing them.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
