"""One entry point for every method: per-matrix or block-by-block calibrated."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from unibcq.checkpoint import describe_quantization
from unibcq.config import QuantConfig
from unibcq.devices import check_device
from unibcq.finite import refuse_nonfinite
from unibcq.errors import UnibcqError
from unibcq.memory import MemoryCap
from unibcq.methods.per_matrix import LayerRecord, quantize_per_matrix
from unibcq.methods.reconstruction import reconstruct_blocks
from unibcq.methods.run_state import SPILL_PREFIX, RunState, run_fingerprint
from unibcq.methods.registry import CALIBRATED, HESSIAN_METHODS
from unibcq.methods.sequential import quantize_sequential
from unibcq.models.architectures import check_window_fits, quantizable_linears
from unibcq.nn.qlinear import PackedLinear


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor | None = None,
    show_progress: bool = True,
    workers: int = 1,
    device: str = "cpu",
    state_dir: str | Path | None = None,
    resume: bool = False,
    backend: str = "local",
    onload: Callable[[int], None] | None = None,
    spill_activations: bool = False,
    memory_cap: MemoryCap | None = None,
) -> list[LayerRecord]:
    """Quantize `model` in place with `config`; calibrated methods need `calibration` (n, L) token ids.

    Calibrated methods run block by block; with `state_dir` each finished block is committed
    there, and `resume=True` continues a killed run from its last committed block (same
    result as an uninterrupted run). The caller removes `state_dir` once it has saved the
    checkpoint. Per-matrix methods keep no state: rerunning them costs minutes, not hours;
    they run on `workers` local processes, or as Ray tasks with `backend="ray"`. The local
    processes are spawned, so a script that asks for `workers > 1` must run its work under
    `if __name__ == "__main__":` (each worker imports the script anew). `onload`
    (calibrated methods) reads each block from disk when its turn comes (`methods.onload`);
    `spill_activations` keeps the calibration activations between blocks in files (in a
    temporary folder inside `state_dir`, else in the system's) instead of memory.
    `memory_cap` (calibrated methods) is checked after every layer and training step.
    """
    config.validate()
    if type(workers) is not int or workers < 1:
        raise UnibcqError(f"--workers must be an integer >= 1, got {workers!r}")
    layers = quantizable_linears(model, config.include_lm_head)
    if not layers:
        raise UnibcqError("the model has no decoder linear layers to quantize (does its config have 0 layers?)")
    config.check_overrides(layers)
    for name, layer in layers.items():
        if isinstance(layer, PackedLinear):
            raise UnibcqError(f"{name} is already quantized; start from a full-precision model")
    # Checked before any work: calibrated methods would otherwise meet a NaN as a calibration overflow
    # or a NaN loss far from its cause, and a NaN embedding or norm would be saved into a checkpoint that
    # loading calls corrupt. Weights not loaded yet (meta, read block by block) are checked when saved.
    for name, tensor in model.state_dict(keep_vars=True).items():
        refuse_nonfinite(name, tensor.detach())
    torch.manual_seed(config.seed)
    if config.method in CALIBRATED and backend != "local":
        raise UnibcqError(f"{config.method} runs block by block on one machine; --backend {backend} is for "
                          "per-matrix methods")
    if config.method in CALIBRATED:
        check_device(device)
        if config.include_lm_head:
            raise UnibcqError(f"{config.method} quantizes decoder blocks only; drop --quantize-lm-head")
        _check_calibration(model, config.method, calibration)
        state = (RunState.open(state_dir, run_fingerprint(model, config, calibration), resume)
                 if state_dir is not None else None)
        try:
            with tempfile.TemporaryDirectory(prefix=SPILL_PREFIX, dir=state_dir) as spill:
                spill_dir = spill if spill_activations else None
                if config.method in HESSIAN_METHODS:
                    records = quantize_sequential(model, config, calibration, HESSIAN_METHODS[config.method], device,
                                                  show_progress, state, onload, spill_dir, memory_cap)
                else:
                    records = reconstruct_blocks(model, config, calibration, device, show_progress, state, onload,
                                                 spill_dir, memory_cap)[0]
        finally:
            if state is not None:
                state.close()
    elif onload is not None:
        raise UnibcqError("per-matrix methods stream weights themselves; onloading is for calibrated methods")
    else:
        records = quantize_per_matrix(model, config, show_progress, workers, backend)
    describe_quantization(model, config, getattr(model.config, "_name_or_path", None) or "")
    return records


def _check_calibration(model: nn.Module, method: str, calibration: object) -> None:
    """Calibration must be (n, L) token ids the model can embed: anything else fails deep in a
    forward pass (a size mismatch in attention, an index error in the embedding)."""
    if calibration is None:
        raise UnibcqError(f"{method} needs calibration data (token windows)")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 \
            or calibration.dtype not in (torch.int64, torch.int32) or calibration.numel() == 0:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise UnibcqError(f"{method} needs calibration token ids as a non-empty int64 (or int32) tensor of shape "
                          f"(windows, tokens), got {shape}" + (f" {calibration.dtype}" if isinstance(
                              calibration, torch.Tensor) else ""))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise UnibcqError(f"calibration token ids must lie in [0, {vocab}) for this model's vocabulary, "
                          f"got ids from {low} to {high} (a tokenizer of another model?)")
    check_window_fits(model, calibration.shape[-1], "calibration windows")
