"""Quantize a model larger than memory: one weight at a time from its safetensors shards.

Per-matrix methods need nothing but each weight, so the full-precision model is never
built. The model class is instantiated on the meta device only to learn which tensors are
decoder linear weights (the same discovery as the in-memory path); then every tensor is
read on its own from the (memory-mapped) shards, quantized or cast, and appended to the
output. The output is written in shards of at most `shard_bytes`, so the process holds
one full-precision weight, its quantizer's temporaries and one output shard at a time:
peak memory is set by the budget, not the model's size.

Each shard is mapped only while one tensor is copied out of it, so the file pages it
touched are unmapped straight away and never pile up in the process's resident memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Collection
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from unibcq.atomic import atomic_directory
from unibcq.checkpoint import (
    QUANT_KEY, WEIGHTS_FILE, WEIGHTS_INDEX, WEIGHTS_METADATA, cast_checked, check_output_dir, dtype_name,
    quantization_entry, write_manifest,
)
from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError, one_line
from unibcq.finite import refuse_nonfinite
from unibcq.methods.per_matrix import LayerRecord, quantize_matrix
from unibcq.methods.registry import PER_MATRIX_METHODS
from unibcq.models.architectures import quantizable_linears
from unibcq.models.shards import read_weight_map
from unibcq.nn.qlinear import packed_module
from unibcq.progress import progress_bar

# Python, torch and transformers before any weight is read.
BASELINE_BYTES = 700 * 2**20
# A weight's quantizer holds a handful of fp32 copies of it (the weight, its groups, errors).
QUANTIZER_COPIES = 6
# Output shards stay below this even under a large budget, like the Hub's 5 GB shards.
MAX_SHARD_BYTES = 4 * 2**30

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # the last: Kubernetes' spelling


def parse_memory(text: str) -> int:
    """'8GiB', '8G', '512MiB' or a byte count -> bytes (binary units)."""
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    size = value * _UNITS.get(unit, 0)
    if not (math.isfinite(size) and size >= 1):  # 1e400 overflowed int(); 0.5 bytes truncated to 0
        raise UnibcqError(f"--max-memory {text!r} is not a memory size; use e.g. 8GiB, 512MiB or a byte count")
    return int(size)


def source_weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single-file or sharded model."""
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        files = {name: model_dir / file for name, file in read_weight_map(index).items()}
    elif (model_dir / WEIGHTS_FILE).is_file():
        with _open(model_dir / WEIGHTS_FILE) as f:
            files = {name: model_dir / WEIGHTS_FILE for name in f.keys()}
    else:
        raise UnibcqError(
            f"{model_dir} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}; streaming reads safetensors checkpoints "
            "(load .bin or .gguf models without --max-memory)"
        )
    for file in set(files.values()):
        if not file.is_file():
            raise UnibcqError(f"{file} listed in {WEIGHTS_INDEX} is missing")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UnibcqError(f"{file} is not a readable safetensors file ({exc})") from exc


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor, copied out of its shard; the mapping is closed before returning."""
    with _open(file) as f:
        return f.get_tensor(name)


def _read_finite(files: dict[str, Path], key: str) -> torch.Tensor:
    """An unquantized tensor, refused if it holds NaN/inf (the checkpoint would not load)."""
    return refuse_nonfinite(key, read_tensor(files[key], key))


def fp32_nbytes(file: Path, name: str) -> int:
    """Bytes of the tensor once read as float32 (quantizers work in fp32), from the header only."""
    with _open(file) as f:
        return math.prod(f.get_slice(name).get_shape()) * 4


@dataclass
class _ShardWriter:
    """Collects output tensors and writes them as numbered safetensors shards."""

    folder: Path
    shard_bytes: int
    held: dict[str, torch.Tensor] = field(default_factory=dict)
    held_bytes: int = 0
    files: list[str] = field(default_factory=list)
    weight_map: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.held and self.held_bytes + size > self.shard_bytes:
            self.flush()
        self.held[name] = tensor.contiguous()
        self.held_bytes += size
        if self.held_bytes >= self.shard_bytes:  # an oversized tensor (an embedding) is not held on
            self.flush()                         # while the next weights are quantized

    def flush(self) -> None:
        if not self.held:
            return
        file = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.held, str(self.folder / file), metadata=WEIGHTS_METADATA)
        self.files.append(file)
        self.weight_map.update({name: file for name in self.held})
        self.held, self.held_bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard and give the shards their final names (plus an index when several)."""
        self.flush()
        files, weight_map = self.files, self.weight_map
        if len(files) == 1:
            os.replace(self.folder / files[0], self.folder / WEIGHTS_FILE)
            return
        final = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
        for old, new in final.items():
            os.replace(self.folder / old, self.folder / new)
        weight_map = {name: final[file] for name, file in weight_map.items()}
        total = sum((self.folder / f).stat().st_size for f in final.values())
        (self.folder / WEIGHTS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def read_model_config(model_dir: Path) -> PretrainedConfig:
    """The transformers config of a local model directory, with a clear error."""
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UnibcqError(f"could not read the model config in {model_dir}: {one_line(exc)}") from exc


def meta_skeleton(model_dir: Path, hf_config: PretrainedConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model on the meta device: names and shapes, no memory. A config transformers cannot
    build as a causal LM (an encoder, say) is refused here, before any weight is read."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, **({} if dtype is None else {"dtype": dtype}))
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/TypeError/validation errors here
        raise UnibcqError(f"{model_dir} is not a causal LM transformers can build: {one_line(exc)}") from exc


def quantize_streaming(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: QuantConfig,
    source_model: str,
    max_memory: int,
    overwrite: bool = False,
    show_progress: bool = True,
    shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[LayerRecord]:
    """Quantize the safetensors model in `model_dir` into the checkpoint `out_dir` within `max_memory` bytes.

    Unquantized tensors are stored in `dtype` (default: the model's declared dtype).

    Raises before reading any weight when the budget cannot hold the largest weight's
    quantization, so a run never dies of memory half-way. Output shards hold what the
    budget leaves after that working set (at most `MAX_SHARD_BYTES`, or `shard_bytes`).
    """
    config.validate()
    if config.method not in PER_MATRIX_METHODS:
        raise UnibcqError(
            f"--max-memory streams weights one at a time, which per-matrix methods allow "
            f"({', '.join(sorted(PER_MATRIX_METHODS))}); {config.method} needs whole blocks and calibration"
        )
    model_dir = Path(model_dir)
    hf_config = read_model_config(model_dir)
    skeleton = meta_skeleton(model_dir, hf_config)
    linears = quantizable_linears(skeleton, config.include_lm_head)
    if not linears:
        raise UnibcqError("the model has no decoder linear layers to quantize (does its config have 0 layers?)")
    config.check_overrides(linears)
    dtype = dtype or hf_config.dtype or torch.float32
    expected = dict(skeleton.state_dict())
    source_tied = getattr(hf_config, "tie_word_embeddings", False)
    if source_tied and not config.include_lm_head:
        expected.pop("lm_head.weight", None)
    files = source_weight_map(model_dir)
    # A tied source stores the output layer once, as the input embedding: a quantized lm_head reads it there.
    stored_as = ({"lm_head.weight": _input_embedding_key(skeleton)}
                 if source_tied and config.include_lm_head and "lm_head.weight" not in files else {})
    files |= {key: files[name] for key, name in stored_as.items() if name in files}
    missing = sorted(set(expected) - set(files))
    if missing:
        raise UnibcqError(f"{model_dir} lacks tensors the config implies, e.g. {missing[:3]}")

    dense = [key for key in expected if key.rsplit(".", 1)[0] not in linears]
    working = _working_bytes(files, linears, dense, max_memory, stored_as)
    if config.include_lm_head:
        hf_config.tie_word_embeddings = False
    records: list[LayerRecord] = []
    layout: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    check_output_dir(out_dir, overwrite, str(model_dir))
    with atomic_directory(out_dir, overwrite, lambda: check_output_dir(out_dir, overwrite, str(model_dir))) as tmp:
        writer = _ShardWriter(tmp, shard_bytes or min(max_memory - working, MAX_SHARD_BYTES))
        with progress_bar(show_progress) as bar:
            task = bar.add_task(f"{config.method} w{config.bits} (streaming)", total=len(expected))
            for key in expected:
                layer = key.rsplit(".", 1)[0]
                if layer in linears and key.endswith(".bias"):
                    continue  # written with its layer's packed weight
                if layer in linears:
                    layout[layer], record = _write_quantized(writer, layer, files, f"{layer}.bias" in expected,
                                                             config, dtype, stored_as.get(key, key))
                    records.append(record)
                else:
                    writer.add(key, cast_checked(key, _read_finite(files, key), dtype))
                bar.update(task, advance=1, description=f"{config.method} {layer}")
        writer.finish()
        hf_dict = hf_config.to_dict() | {"dtype": dtype_name(dtype)}
        hf_dict[QUANT_KEY] = quantization_entry(config, source_model, layout, {
            "quantize_seconds": round(time.perf_counter() - start, 3), "max_memory": max_memory})
        (tmp / "config.json").write_text(json.dumps(hf_dict, indent=2) + "\n")
        _copy_generation_files(model_dir, tmp)
        write_manifest(tmp)
    return records


def _input_embedding_key(skeleton: torch.nn.Module) -> str:
    """The state-dict name of the model's input embedding weight."""
    embedding = skeleton.get_input_embeddings()
    return next(f"{name}.weight" for name, module in skeleton.named_modules() if module is embedding)


def _working_bytes(files: dict[str, Path], linears: Collection[str], dense: Collection[str], max_memory: int,
                   stored_as: dict[str, str]) -> int:
    """Memory the quantization of the largest weight needs besides the output shard being filled;
    refuse, before any weight is read, a budget that cannot also hold that weight's read, or
    the read and cast of the largest tensor left unquantized (an embedding of a large
    vocabulary can outweigh every linear layer)."""
    largest = max(fp32_nbytes(files[key], stored_as.get(key, key)) for key in (f"{name}.weight" for name in linears))
    largest_dense = max((fp32_nbytes(files[key], key) for key in dense), default=0)
    working = BASELINE_BYTES + QUANTIZER_COPIES * largest
    needed = max(working + largest, BASELINE_BYTES + 2 * largest_dense)
    if max_memory < needed:
        what = (f"quantizing the largest weight ({largest / 2**20:.0f} MiB in fp32)" if needed == working + largest
                else f"reading the largest unquantized tensor ({largest_dense / 2**20:.0f} MiB in fp32) and its cast")
        raise UnibcqError(
            f"--max-memory {max_memory / 2**30:.2f} GiB is too small: {what} needs about {needed / 2**30:.2f} GiB, "
            f"of which {BASELINE_BYTES / 2**30:.2f} GiB is the process itself (Python, torch, transformers)"
        )
    return working


def _write_quantized(writer: _ShardWriter, layer: str, files: dict[str, Path], has_bias: bool,
                     config: QuantConfig, dtype: torch.dtype, stored: str) -> tuple[dict[str, Any], LayerRecord]:
    """Quantize one linear layer read from the source (its weight stored there as `stored`), add
    its packed tensors (and bias) to the output shards, and return its layout and record;
    nothing of it stays in memory."""
    packed, error, seconds = quantize_matrix(layer, read_tensor(files[f"{layer}.weight"], stored),
                                             config.for_layer(layer))
    bias = cast_checked(f"{layer}.bias", _read_finite(files, f"{layer}.bias"), dtype) if has_bias else None
    module = packed_module(packed, bias)
    for name, tensor in module.state_dict().items():
        writer.add(f"{layer}.{name}", tensor)
    return module.layout(), LayerRecord.of(layer, config, packed, error, seconds)


def _copy_generation_files(model_dir: Path, out: Path) -> None:
    """The source's generation config and tokenizer, which the checkpoint needs to generate."""
    if (model_dir / "generation_config.json").is_file():
        shutil.copyfile(model_dir / "generation_config.json", out / "generation_config.json")
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    except (OSError, ValueError):
        pass  # a weights-only model directory: the checkpoint works without a tokenizer
