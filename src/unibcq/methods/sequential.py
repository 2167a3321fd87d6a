"""The sequential (block-by-block) calibration pipeline shared by calibrated methods.

Calibration windows run through the model once up to the first decoder block, whose inputs
are captured; then each block in turn sees the outputs of the already-quantized blocks
before it, so later blocks are calibrated on the activations they will really receive.
Activations stay on the CPU, or with `spill_dir` in per-sample files on disk (see
`unibcq.methods.activations`); only the current block is on the compute device.

GPTQ uses it through `quantize_sequential` with a per-layer quantizer that receives the
layer's input Hessian H = 2 X^T X / n, accumulated by forward hooks on the block's linear
layers during one pass over the calibration set; with `true_sequential` one pass per group
of layers that read the same input, each after the groups before it are quantized.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError
from unibcq.memory import MemoryCap
from unibcq.methods.activations import ActivationStore
from unibcq.methods.per_matrix import LayerRecord, relative_error
from unibcq.methods.run_state import RunState
from unibcq.models.architectures import block_linears, decoder_blocks, set_module
from unibcq.nn.qlinear import PackedTensor, packed_module
from unibcq.progress import progress_bar

HessianQuantizer = Callable[[torch.Tensor, torch.Tensor, QuantConfig], PackedTensor]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@dataclass
class BlockInputs:
    """Per-sample hidden states entering the current block, and the shared block kwargs."""

    hidden: Sequence[torch.Tensor]
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor,
                         spill_dir: str | os.PathLike | None = None) -> BlockInputs:
    """Run each calibration window (n, L) up to the first decoder block and keep its inputs.

    This runs where the embeddings are (the CPU, while only the block being quantized visits
    the compute device); `run_block` moves the captured inputs to the device block by block.
    """
    first = decoder_blocks(model)[0]
    embeddings = model.get_input_embeddings().weight.device
    hidden = ActivationStore(spill_dir)
    shared: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden.append(args[0] if args else kwargs["hidden_states"])
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window.unsqueeze(0).to(embeddings), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(hidden) != len(windows):
        raise UnibcqError("could not capture the first decoder block's inputs; is this a supported architecture?")
    return BlockInputs(hidden, shared)


def _to(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A block input (a tensor or a tuple of them) on `device`, its floating tensors in `dtype`
    when one is given (masks and position ids keep theirs)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    return value


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device,
              spill_dir: str | os.PathLike | None = None, keep: bool = True,
              dtype: torch.dtype | None = None) -> ActivationStore:
    """The block's outputs for every captured sample (on the CPU, or spilled under `spill_dir`).

    With `keep=False` the outputs are dropped as they come (a pass run for its hooks). With
    `dtype` the inputs are cast to it first (a block run in another precision than the model's).
    """
    kwargs = {k: _to(v, device, dtype) for k, v in inputs.kwargs.items()}
    outputs = ActivationStore(spill_dir if keep else None)
    for hidden in inputs.hidden:
        out = block(_to(hidden, device, dtype), **kwargs)
        if keep:
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def accumulate_input_hessians(
    block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, device: torch.device
) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n for every linear layer of the block, from one pass over the samples."""
    from unibcq.quantizers.gptq import accumulate_hessian

    state: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in layers}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            hessian, count = state[name]
            state[name] = accumulate_hessian(hessian, args[0].detach(), count)
        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        run_block(block, inputs, device, keep=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: h for name, (h, _) in state.items()}


@torch.no_grad()
def input_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs,
                 device: torch.device) -> list[list[str]]:
    """The block's linear layers grouped by the tensor they read, in the order they run.

    Found from one sample, so no architecture has to spell it out: in a Llama block
    [q, k, v], [o], [gate, up], [down]. Layers the sample never reached form a last group
    (their Hessians stay empty, which the quantizer reports).
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        run_block(block, BlockInputs([inputs.hidden[0]], inputs.kwargs), device, keep=False)
    finally:
        for handle in handles:
            handle.remove()
    groups = [names for _, names in seen]
    reached = {name for names in groups for name in names}
    missed = [name for name in layers if name not in reached]
    return groups + [missed] if missed else groups


def quantize_sequential(
    model: nn.Module,
    config: QuantConfig,
    windows: torch.Tensor,
    quantizer: HessianQuantizer,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    state: RunState | None = None,
    onload: Callable[[int], None] | None = None,
    spill_dir: str | os.PathLike | None = None,
    memory_cap: MemoryCap | None = None,
) -> list[LayerRecord]:
    """Quantize the decoder blocks in order, each on the outputs of the quantized ones before it.

    Within a block every layer's input Hessian is collected in one pass before any layer is
    quantized, as in the GPTQ reference code (so o_proj and down_proj see the unquantized
    q/k/v and gate/up outputs of their own block; AutoGPTQ's `true_sequential` does not).

    With `config.true_sequential` the Hessians are collected group by group instead
    (`input_groups`), so o_proj sees the quantized q/k/v and down_proj the quantized gate/up:
    one pass over the calibration set per group instead of one per block.

    `onload(index)`, when given, reads block `index` from disk just before it is needed;
    with `spill_dir` the activations between blocks live in files there instead of memory;
    `memory_cap` is checked after every layer.
    """
    device = torch.device(device)
    blocks = decoder_blocks(model)
    records: list[LayerRecord] = []
    inputs = capture_block_inputs(model, windows, spill_dir)
    first = 0
    if state is not None and state.completed:
        inputs = BlockInputs(state.resume(model, onload, spill_dir)["quantized"], inputs.kwargs)
        records = [LayerRecord(**r) for r in state.records.get("layers", [])]
        first = state.completed
    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"{config.method} w{config.bits}", total=len(blocks), completed=first)
        for index, block in enumerate(blocks):
            if index < first:
                continue
            if onload is not None:
                onload(index)
            block.to(device)
            layers = block_linears(model, index)
            groups = input_groups(block, layers, inputs, device) if config.true_sequential else [list(layers)]
            for group in groups:
                hessians = accumulate_input_hessians(block, {name: layers[name] for name in group}, inputs, device)
                for name in group:
                    records.append(_quantize_layer(model, name, layers[name], hessians.pop(name), quantizer,
                                                   config, device))
                    if memory_cap is not None:
                        memory_cap.check(name)
            inputs = BlockInputs(run_block(block, inputs, device, spill_dir), inputs.kwargs)
            block.to("cpu")
            if state is not None:
                state.commit_block(model, index, {"quantized": inputs.hidden}, {"layers": records})
            bar.update(task, advance=1, description=f"{config.method} block {index}")
    return records


def _quantize_layer(model: nn.Module, name: str, layer: nn.Module, hessian: torch.Tensor,
                    quantizer: HessianQuantizer, config: QuantConfig, device: torch.device) -> LayerRecord:
    """Quantize one linear layer from its input Hessian and put the packed module in its place."""
    layer_cfg = config.for_layer(name)
    start = time.perf_counter()
    weight = layer.weight.detach().float()
    try:
        packed = quantizer(weight, hessian, layer_cfg)
    except UnibcqError as exc:
        raise UnibcqError(f"{name}: {exc}") from exc
    seconds = time.perf_counter() - start
    bias = layer.bias.detach() if layer.bias is not None else None
    set_module(model, name, packed_module(packed, bias).to(device))
    return LayerRecord.of(name, config, packed, relative_error(packed, weight), seconds)
