"""Block-wise reconstruction: the one training engine for calibrated fake-quant methods.

For each decoder block in order: the full-precision inputs X_fp and outputs Y_fp on the
calibration set, and the inputs X_q produced by the already-quantized earlier blocks, are
kept on the CPU (or, with `spill_dir`, in per-sample files on disk). The block's linear
layers become trainable fake-quant modules (UniQuanF or FlexRound); Adam (one learning rate
for mapping parameters, one for BCQ levels) with a cosine schedule minimises
MSE(block(X), Y_fp), where X mixes X_q and X_fp element-wise (an element is taken from X_q
with probability `input_prob`, else from X_fp, as in QDrop and the UniQuanF authors' code).
Then the block is frozen, each layer exported to packed BCQ (for UniQuanF through the
unification theorem), and the block's quantized outputs become the next block's X_q. Only
one block's trainable state exists at a time. Blocks train in float32 whatever the model's
dtype (a bfloat16 loss cannot resolve the small errors being minimised, and the fake-quant
weights are float32); each block returns to the model's dtype once exported. With a
`RunState`, every finished block is committed to disk and a killed run continues from the
last committed block with the same result.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError
from unibcq.memory import MemoryCap
from unibcq.methods.per_matrix import LayerRecord, relative_error
from unibcq.methods.run_state import RunState
from unibcq.methods.sequential import BlockInputs, _to, capture_block_inputs, run_block
from unibcq.models.architectures import block_linears, decoder_blocks, set_module
from unibcq.nn.fake_quant import FlexRoundLinear, UniQuanFLinear
from unibcq.nn.qlinear import packed_module
from unibcq.progress import print_table, progress_bar


TRAIN_DTYPE = torch.float32


@dataclass
class BlockRecord:
    """One row of the reconstruction summary: loss on quantized inputs before / after training."""

    block: int
    initial_loss: float
    final_loss: float
    iterations: int
    seconds: float


def make_fake_quant(linear: nn.Linear, config: QuantConfig) -> UniQuanFLinear | FlexRoundLinear:
    if config.method == "flexround":
        return FlexRoundLinear(linear, config.bits, config.group_size)
    return UniQuanFLinear(linear, config.bits, config.group_size, config.grid_points, config.iters,
                          config.p_norm, config.shift, config.mapping, config.remap_every)


@torch.no_grad()
def block_loss(block: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kwargs: dict,
               device: torch.device) -> float:
    """Mean MSE of the (float32) block on quantized inputs against the FP targets."""
    total = 0.0
    for x, y in zip(inputs, targets):
        out = block(x.to(device, TRAIN_DTYPE), **kwargs)
        total += F.mse_loss((out[0] if isinstance(out, tuple) else out), y.to(device, TRAIN_DTYPE)).item()
    return total / len(inputs)


def _train_block(block: nn.Module, fakes: dict[str, nn.Module], q_in: Sequence[torch.Tensor],
                 fp_in: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kwargs: dict, config: QuantConfig,
                 device: torch.device, generator: torch.Generator, on_step) -> int:
    groups = {"mapping": [], "levels": []}
    for fake in fakes.values():
        for key, params in fake.param_groups().items():
            groups[key].extend(params)
    optimizer = torch.optim.Adam([
        {"params": groups["mapping"], "lr": config.u_lr},
        {"params": groups["levels"], "lr": config.b_lr},
    ])
    samples = len(q_in)
    steps_per_epoch = max(1, samples // config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    for fake in fakes.values():
        fake.train()
    for _ in range(config.epochs):
        order = torch.randperm(samples, generator=generator)
        for start in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            idx = order[start : start + config.batch_size].tolist()
            x_q = torch.cat([q_in[i] for i in idx]).to(device, TRAIN_DTYPE)
            x_fp = torch.cat([fp_in[i] for i in idx]).to(device, TRAIN_DTYPE)
            y = torch.cat([targets[i] for i in idx]).to(device, TRAIN_DTYPE)
            take_fp = torch.rand(x_q.shape, generator=generator).to(device) < 1 - config.input_prob
            out = block(torch.where(take_fp, x_fp, x_q), **kwargs)
            loss = F.mse_loss(out[0] if isinstance(out, tuple) else out, y)
            if not math.isfinite(loss.item()):
                raise UnibcqError("reconstruction loss became NaN/inf; lower --u-lr / --b-lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            on_step(loss.item())
    for fake in fakes.values():
        fake.eval()
        if isinstance(fake, UniQuanFLinear):  # codes for the mapping parameters as the last step left
            # them, not as the step before it used them (the notes leave this step out; 2.4% of the
            # codes change, and the error drops)
            fake.remap(local=config.mapping == "local")
    return total


def _install_fake_quants(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig,
                         device: torch.device) -> dict[str, nn.Module]:
    """Replace a block's linear layers by trainable fake-quantized ones, returned by name.

    In eval mode: the block's loss before training must not remap or advance the remap period.
    """
    fakes = {}
    for name, layer in layers.items():
        try:
            fakes[name] = make_fake_quant(layer, config.for_layer(name)).to(device).eval()
        except UnibcqError as exc:
            raise UnibcqError(f"{name}: {exc}") from exc
        set_module(model, name, fakes[name])
    return fakes


def _install_exports(model: nn.Module, fakes: dict[str, nn.Module], layers: dict[str, nn.Linear],
                     config: QuantConfig, device: torch.device) -> list[LayerRecord]:
    """Replace each trained fake-quantized layer by its exported packed layer (the unification
    step), and record its error against the original weight. No per-layer time: the layers
    were trained jointly with their block."""
    records = []
    for name, fake in fakes.items():
        packed = fake.export()
        error = relative_error(packed, layers[name].weight.to(device))
        set_module(model, name, packed_module(packed, fake.bias).to(device))
        records.append(LayerRecord.of(name, config, packed, error, None))
    return records


def _floating_dtype(block: nn.Module) -> torch.dtype:
    """The dtype the model keeps this block's weights in (float32 for a block without any)."""
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)


def reconstruct_blocks(
    model: nn.Module,
    config: QuantConfig,
    windows: torch.Tensor,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    state: RunState | None = None,
    onload: Callable[[int], None] | None = None,
    spill_dir: str | os.PathLike | None = None,
    memory_cap: MemoryCap | None = None,
) -> tuple[list[LayerRecord], list[BlockRecord]]:
    """Quantize every decoder block of `model` in place by block-wise reconstruction.

    With `state`, blocks it already holds are restored instead of retrained, and each newly
    finished block is committed to it. `onload(index)` is called before block `index` is
    touched (see `unibcq.methods.onload`), for models whose blocks are read from disk. With
    `spill_dir` the three activation streams live in files there instead of memory.
    `memory_cap` is checked after every training step and every finished block.
    `show_progress` shows the training bars and then each block's loss before and after
    training (the table a user watches to see reconstruction work; the returned BlockRecords
    hold the same figures for the API).
    """
    device = torch.device(device)
    blocks = decoder_blocks(model)
    for param in model.parameters():
        param.requires_grad_(False)
    captured = capture_block_inputs(model, windows, spill_dir)
    block_kwargs = captured.kwargs
    kwargs = {k: _to(v, device, TRAIN_DTYPE) for k, v in block_kwargs.items()}
    q_in, fp_in = captured.hidden, captured.hidden
    del captured  # at most three streams alive at once: q_in, fp_in and the one being written
    layer_records: list[LayerRecord] = []
    block_records: list[BlockRecord] = []
    first = 0
    if state is not None and state.completed:
        streams = state.resume(model, onload, spill_dir)
        q_in, fp_in = streams["quantized"], streams["full_precision"]
        layer_records = [LayerRecord(**r) for r in state.records.get("layers", [])]
        block_records = [BlockRecord(**r) for r in state.records.get("blocks", [])]
        first = state.completed
    with progress_bar(show_progress) as bar:
        steps = config.epochs * max(1, len(windows) // config.batch_size)
        overall = bar.add_task(f"{config.method} w{config.bits}", total=len(blocks), completed=first)
        for index, block in enumerate(blocks):
            if index < first:
                continue
            if onload is not None:
                onload(index)
            start = time.perf_counter()
            model_dtype = _floating_dtype(block)
            block.to(device, TRAIN_DTYPE)
            targets = run_block(block, BlockInputs(fp_in, block_kwargs), device, spill_dir, dtype=TRAIN_DTYPE)
            layers = block_linears(model, index)
            fakes = _install_fake_quants(model, layers, config, device)
            initial = block_loss(block, q_in, targets, kwargs, device)
            task = bar.add_task(f"block {index}", total=steps)
            generator = torch.Generator().manual_seed(config.seed * 100_003 + index)

            def on_step(loss: float, task=task, index=index) -> None:
                bar.update(task, advance=1, description=f"block {index} loss {loss:.3g}")
                if memory_cap is not None:
                    memory_cap.check(f"block {index}")

            iterations = _train_block(block, fakes, q_in, fp_in, targets, kwargs, config, device, generator, on_step)
            bar.update(task, visible=False)
            layer_records += _install_exports(model, fakes, layers, config, device)
            del fakes
            final = block_loss(block, q_in, targets, kwargs, device)
            fp_in = targets
            q_in = run_block(block, BlockInputs(q_in, block_kwargs), device, spill_dir, dtype=TRAIN_DTYPE)
            block.to("cpu", model_dtype)
            block_records.append(BlockRecord(index, initial, final, iterations, time.perf_counter() - start))
            if memory_cap is not None:
                memory_cap.check(f"block {index}")
            if state is not None:
                state.commit_block(model, index, {"quantized": q_in, "full_precision": fp_in},
                                   {"layers": layer_records, "blocks": block_records})
            bar.update(overall, advance=1)
    if show_progress:
        print_table(f"{config.method} block reconstruction", ["block", "initial loss", "final loss", "iterations",
                                                              "seconds"],
                    [(r.block, r.initial_loss, r.final_loss, r.iterations, r.seconds) for r in block_records])
    return layer_records, block_records
