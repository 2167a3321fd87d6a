"""Quantized checkpoints: save, load, inspect.

A checkpoint is a directory holding the original model config with a
`quantization_config` entry, the tokenizer, and `model.safetensors` with the packed
tensors of every quantized layer (`<layer>.bcq_planes`, `.bcq_alpha`, `.bcq_offset`) and the
unquantized tensors. It is written into a temporary sibling and renamed into place, so it
is complete or absent. Loading uses safetensors only: no pickle, no code from the
checkpoint is executed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from unibcq import __version__
from unibcq.atomic import atomic_directory
from unibcq.config import FORMAT_VERSION, QuantConfig
from unibcq.errors import CheckpointError, UnibcqError
from unibcq.models.architectures import set_module
from unibcq.formats.bcq import num_groups
from unibcq.formats.grouped_binary import parse_granularity
from unibcq.nn.qlinear import PACKED_MODULES, PackedLinear

WEIGHTS_FILE = "model.safetensors"
QUANT_KEY = "quantization_config"
PACKED_SUFFIXES = ("bcq_planes", "bcq_alpha", "bcq_offset", "gb_signs", "gb_index", "gb_scales")
ACCOUNTING_KEYS = ("bits_per_weight_paper", "bits_per_weight_fixed", "bits_per_weight_entropy")


def quantized_layers(model: torch.nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def layer_layout(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer: what the loader needs to rebuild its module."""
    return {name: m.layout() for name, m in quantized_layers(model).items()}


def save_checkpoint(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    config: QuantConfig,
    source_model: str,
    tokenizer=None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (with BCQLinear layers) as a checkpoint directory, atomically."""
    layout = layer_layout(model)
    if not layout:
        raise UnibcqError("the model has no quantized layers; run unibcq.quantize first")
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        # Tied weights are one tensor; safetensors stores each storage once.
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    hf_config = model.config.to_dict()
    hf_config[QUANT_KEY] = {
        "quant_method": "unibcq",
        "format": "bcq",
        "format_version": FORMAT_VERSION,
        "unibcq_version": __version__,
        "source_model": source_model,
        **config.to_dict(),
        **(extra or {}),
        "layers": layout,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "unibcq_format": "bcq"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json with a validated quantization_config."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} not found")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing; not a unibcq checkpoint")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    qcfg = data.get(QUANT_KEY)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "unibcq":
        raise CheckpointError(f"{path} is not a unibcq checkpoint (no unibcq quantization_config in config.json)")
    if qcfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses format version {qcfg.get('format_version')!r}; this unibcq reads version {FORMAT_VERSION}"
        )
    layers = qcfg.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{cfg_file}: quantization_config.layers must be a non-empty object")
    for name, spec in layers.items():
        _check_layer_spec(cfg_file, name, spec)
    return data


def _check_layer_spec(cfg_file: Path, name: str, spec: Any) -> None:
    """Types and ranges of one layer's layout entry, so hostile configs fail clearly."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"{cfg_file}: layer {name!r} must be an object")
    fmt = spec.get("format", "bcq")
    if fmt not in PACKED_MODULES:
        raise CheckpointError(f"{cfg_file}: layer {name!r} has unknown format {fmt!r}")
    ints = ("in_features", "out_features") + (("bits", "group_size") if fmt == "bcq" else ("max_groups",))
    if any(type(spec.get(k)) is not int for k in ints):
        raise CheckpointError(f"{cfg_file}: layer {name!r} needs integer {', '.join(ints)}")
    if not 1 <= spec["in_features"] <= 2**24 or not 1 <= spec["out_features"] <= 2**24:
        raise CheckpointError(f"{cfg_file}: layer {name!r} has an out-of-range shape")
    if fmt == "bcq":
        if not 1 <= spec["bits"] <= 8:
            raise CheckpointError(f"{cfg_file}: layer {name!r} has out-of-range bits {spec['bits']}")
        if spec["group_size"] == 0 or spec["group_size"] < -1:
            raise CheckpointError(f"{cfg_file}: layer {name!r} has invalid group_size {spec['group_size']}")
    else:
        if not 1 <= spec["max_groups"] <= 256:
            raise CheckpointError(f"{cfg_file}: layer {name!r} has out-of-range max_groups {spec['max_groups']}")
        try:
            parse_granularity(spec.get("granularity"))
        except (UnibcqError, AttributeError) as exc:
            raise CheckpointError(f"{cfg_file}: layer {name!r}: {exc}") from exc


def is_checkpoint(path: str | os.PathLike) -> bool:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        return json.loads(cfg_file.read_text()).get(QUANT_KEY, {}).get("quant_method") == "unibcq"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}); re-create the checkpoint") from exc


def install_packed_layers(model: torch.nn.Module, layers: dict[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """Swap each listed linear layer for an empty packed module of its recorded layout.

    Shared by `load_checkpoint` and the transformers quantizer, so both check the layout
    against the model the same way before any tensor is read.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for name, spec in layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"layer {name!r} in the checkpoint does not exist in a {model_type} model") from exc
        if not isinstance(current, torch.nn.Linear):
            raise CheckpointError(f"layer {name!r} in the checkpoint is a {type(current).__name__}, not a linear layer")
        if (current.in_features, current.out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"layer {name!r}: shape in quantization_config disagrees with the model config")
        fmt = spec.get("format", "bcq")
        if fmt not in PACKED_MODULES:
            raise CheckpointError(f"layer {name!r} has unknown format {fmt!r}")
        set_module(model, name, PACKED_MODULES[fmt].from_layout(spec, dtype))


def load_checkpoint(path: str | os.PathLike) -> PreTrainedModel:
    """Rebuild the quantized model: config -> empty model -> packed layers -> tensors."""
    path = Path(path)
    data = read_config(path)
    qcfg = data.pop(QUANT_KEY)
    try:
        hf_config: PretrainedConfig = AutoConfig.for_model(**data)
        dtype = hf_config.dtype or torch.float32
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as exc:  # transformers raises ValueError/TypeError/validation errors here
        raise CheckpointError(f"{path / 'config.json'} does not describe a model transformers can build: {exc}") from exc
    install_packed_layers(model, qcfg["layers"], dtype)
    state = _load_tensors(path)
    expected = model.state_dict()
    if getattr(hf_config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, tensor in state.items():
        want = expected[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {key} has shape {tuple(tensor.shape)} {tensor.dtype}, the config implies "
                f"{tuple(want.shape)} {want.dtype}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model


@dataclass
class CheckpointInfo:
    """Honest size accounting, computed from the stored tensors' headers."""

    method: str
    bits: int
    group_size: int
    quantized_params: int
    quantized_bytes: int
    dense_params: int
    dense_bytes: int
    file_bytes: int
    layers: dict[str, dict[str, Any]]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.quantized_bytes / max(self.quantized_params, 1)

    def accounting(self) -> dict[str, float]:
        """Whole-model bits per weight under the paper's / fixed-index / entropy-index counts.

        BCQ layers cost the same under all three; grouped-binary layers differ by how their
        per-weight group index is counted. Weighted by each layer's number of weights.
        """
        totals = dict.fromkeys(ACCOUNTING_KEYS, 0.0)
        for spec in self.layers.values():
            numel = spec["in_features"] * spec["out_features"]
            for key in ACCOUNTING_KEYS:
                totals[key] += spec.get(key, spec["bits_per_weight"]) * numel
        return {k: v / max(self.quantized_params, 1) for k, v in totals.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "bits_per_weight": self.bits_per_weight,
            **self.accounting(),
            "quantized_params": self.quantized_params,
            "quantized_bytes": self.quantized_bytes,
            "dense_params": self.dense_params,
            "dense_bytes": self.dense_bytes,
            "file_bytes": self.file_bytes,
            "layers": self.layers,
        }


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Per-layer and whole-model bits per weight, without loading the tensors."""
    path = Path(path)
    qcfg = read_config(path)[QUANT_KEY]
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete")
    layers: dict[str, dict[str, Any]] = {}
    dense_params = dense_bytes = 0
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                nbytes = numel * _dtype_size(sl.get_dtype())
                layer, _, suffix = key.rpartition(".")
                if suffix in PACKED_SUFFIXES and layer in qcfg["layers"]:
                    layers.setdefault(layer, {"bytes": 0})["bytes"] += nbytes
                else:
                    dense_params += numel
                    dense_bytes += nbytes
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc})") from exc
    qparams = qbytes = 0
    for name, spec in qcfg["layers"].items():
        numel = spec["in_features"] * spec["out_features"]
        nbytes = layers.get(name, {}).get("bytes", 0)
        if not nbytes:
            raise CheckpointError(f"{weights} has no packed tensors for layer {name}")
        layers[name] = {**spec, "bytes": nbytes, "bits_per_weight": 8.0 * nbytes / numel}
        if spec.get("format", "bcq") == "bcq":
            layers[name]["groups_per_row"] = num_groups(spec["in_features"], spec["group_size"])
        qparams += numel
        qbytes += nbytes
    return CheckpointInfo(
        method=qcfg.get("method", "?"), bits=qcfg.get("bits", 0), group_size=qcfg.get("group_size", 0),
        quantized_params=qparams, quantized_bytes=qbytes, dense_params=dense_params, dense_bytes=dense_bytes,
        file_bytes=weights.stat().st_size, layers=layers,
    )


_DTYPE_SIZES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}


def _dtype_size(name: str) -> int:
    if name not in _DTYPE_SIZES:
        raise CheckpointError(f"unexpected tensor dtype {name} in checkpoint")
    return _DTYPE_SIZES[name]
