"""Quantized checkpoints: save, load, inspect.

A checkpoint is a directory holding the original model config with a
`quantization_config` entry, the tokenizer, and `model.safetensors` with the packed
tensors of every quantized layer (`<layer>.bcq_planes`, `.bcq_alpha`, `.bcq_offset`) and the
unquantized tensors. It is written into a temporary sibling and renamed into place, so it
is complete or absent. Loading uses safetensors only: no pickle, no code from the
checkpoint is executed.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from unibcq.errors import CheckpointError, UnibcqError, one_line
from unibcq.finite import refuse_nonfinite
from unibcq.models.architectures import ARCHITECTURES, set_module
from unibcq.models.fingerprint import MANIFEST_FILE, MAX_CONFIG_BYTES, QUANT_KEY, files_fingerprint, source_spec
from unibcq.models.shards import WEIGHTS_INDEX, read_weight_map
from unibcq.formats.bcq import MAX_BITS, MIN_BITS, num_groups
from unibcq.formats.grouped_binary import MAX_GROUPS, parse_granularity
from unibcq.nn.qlinear import PACKED_MODULES, PackedLinear

WEIGHTS_FILE = "model.safetensors"
PACKED_SUFFIXES = ("bcq_planes", "bcq_alpha", "bcq_offset", "gb_signs", "gb_index", "gb_scales")
# One key: safetensors writes metadata from a hash map, so two keys come out in a random order
# and identical tensors would give files with different hashes.
WEIGHTS_METADATA = {"format": "pt"}
ACCOUNTING_KEYS = ("bits_per_weight_paper", "bits_per_weight_fixed", "bits_per_weight_entropy")
# What a checkpoint may store its unquantized tensors (embeddings, norms, biases) in.
DENSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def floating_dtype(dtype: torch.dtype | str | None, argument: str = "dtype") -> torch.dtype | None:
    """`dtype` (a torch dtype or one of DENSE_DTYPES' names) for the unquantized tensors, or
    None; anything else is refused by name: integer embeddings would be truncated into a
    checkpoint that cannot be loaded."""
    if isinstance(dtype, str):
        if dtype not in DENSE_DTYPES:
            raise UnibcqError(f"{argument} must be a floating-point torch dtype or one of "
                              f"{', '.join(DENSE_DTYPES)}, got {dtype!r}")
        return DENSE_DTYPES[dtype]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UnibcqError(f"{argument} must be a floating-point torch dtype or one of {', '.join(DENSE_DTYPES)}, "
                          f"got {dtype!r}")
    return dtype


def quantized_layers(model: torch.nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16: how config.json and the CLI spell a dtype."""
    return str(dtype).removeprefix("torch.")


def is_packed_key(key: str, layers: dict[str, Any]) -> bool:
    """Whether state-dict `key` is a packed tensor (codes, scales, offsets) of a quantized layer."""
    layer, _, suffix = key.rpartition(".")
    return suffix in PACKED_SUFFIXES and layer in layers


def cast_checked(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, or an error naming it when finite values overflow there (float16
    ends at 65504), rather than a checkpoint that loading would call corrupt."""
    cast = tensor.to(dtype)
    if cast.dtype != tensor.dtype and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
        raise UnibcqError(f"tensor {key} holds values beyond {dtype_name(dtype)}'s range (largest magnitude "
                          f"{tensor.abs().max().item():.4g}); use float32 or bfloat16 for it")
    return cast


def cast_dense(state: dict[str, torch.Tensor], layers: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with its unquantized floating tensors in `dtype`; the packed ones keep their own."""
    return {k: cast_checked(k, v, dtype) if v.is_floating_point() and not is_packed_key(k, layers) else v
            for k, v in state.items()}


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
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (with BCQLinear layers) as a checkpoint directory, atomically.

    The unquantized tensors are stored in `dtype` (default: the embeddings' dtype), which
    the config records as the checkpoint's dtype. Quantizing runs in float32, but a model
    published in bfloat16 gains nothing from float32 embeddings: storing them in the
    source's dtype is lossless and halves their share of the file.
    """
    dtype = floating_dtype(dtype)
    layout = layer_layout(model)
    if not layout:
        raise UnibcqError("the model has no quantized layers; run unibcq.quantize first")
    quantized_with = getattr(getattr(model.config, "quantization_config", None), "method", None)
    config.validate()
    if quantized_with is not None and quantized_with != config.method:
        raise UnibcqError(f"the model was quantized with {quantized_with}, but the config describes {config.method}; "
                          "save with the QuantConfig the model was quantized with")
    check_config_matches(config, layout)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        # Tied weights are one tensor; safetensors stores each storage once.
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    for key, tensor in state.items():
        if not is_packed_key(key, layout):
            refuse_nonfinite(key, tensor)
    # The config records what the tensors hold: `model.to(...)` does not update config.dtype.
    dtype = dtype or model.get_input_embeddings().weight.dtype
    state = cast_dense(state, layout, dtype)
    hf_config = model.config.to_dict() | {"dtype": dtype_name(dtype)}
    hf_config[QUANT_KEY] = quantization_entry(config, source_model, layout, extra)
    check_output_dir(out_dir, overwrite, source_model)
    with atomic_directory(out_dir, overwrite, lambda: check_output_dir(out_dir, overwrite, source_model)) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata=WEIGHTS_METADATA)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
    describe_quantization(model, hf_config[QUANT_KEY])
    return Path(out_dir).expanduser()


def check_config_matches(config: QuantConfig, layout: dict[str, dict[str, Any]]) -> None:
    """Refuse to record a config the layers were not quantized with: the checkpoint would claim
    one method and width (in `info`, reports and compare's reuse) while holding another."""
    binary = config.method == "dyngroup"
    for name, spec in layout.items():
        wanted = config.for_layer(name)
        if spec["format"] == "grouped-binary":
            found, matches = "dyngroup's grouped signs", binary
        else:
            found = f"{spec['bits']}-bit BCQ in groups of {spec['group_size']}"
            matches = not binary and (spec["bits"], spec["group_size"]) == (wanted.bits, wanted.group_size)
        if not matches:
            claimed = "dyngroup" if binary else f"{config.method} at {wanted.bits} bits in groups of {wanted.group_size}"
            raise UnibcqError(f"layer {name} holds {found}, but the config describes {claimed}; save with the "
                              "QuantConfig the model was quantized with")


def describe_quantization(model: PreTrainedModel, config: QuantConfig | dict[str, Any], source_model: str = "",
                          extra: dict[str, Any] | None = None) -> None:
    """Set `model.config.quantization_config` to what a checkpoint of `model` records (or to a
    checkpoint's stored entry `config`), so that transformers' `save_pretrained` writes a folder
    that `from_pretrained` and `load` read back as this packed model. Without it, `save_pretrained`
    writes the packed tensors with a plain config, and `from_pretrained` builds ordinary linear
    layers with random weights beside them, with only a load report to say so."""
    from unibcq.integrations.transformers import UnibcqHfConfig

    entry = config if isinstance(config, dict) else quantization_entry(config, source_model, layer_layout(model), extra)
    model.config.quantization_config = UnibcqHfConfig(**entry)


def quantization_entry(config: QuantConfig, source_model: str, layout: dict[str, dict[str, Any]],
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `quantization_config` a checkpoint's config.json carries (also read by transformers)."""
    return {
        "quant_method": "unibcq",
        "format": "bcq",
        "format_version": FORMAT_VERSION,
        "unibcq_version": __version__,
        "source_model": source_spec(source_model),
        # The identity of a local source's files (`files_fingerprint`): eval tells when the default KL reference
        # is no longer the model this checkpoint was quantized from.
        "source_files": files_fingerprint(source_model),
        "manifest": MANIFEST_FILE,
        **config.recorded(),
        **(extra or {}),
        "layers": layout,
    }


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file's size and sha256, so `load` can tell a damaged checkpoint from a good one.

    Written last, after every other file is complete (the directory is still the temporary
    one that `atomic_directory` renames into place).
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def verify_manifest(path: Path, qcfg: dict[str, Any]) -> None:
    """Check every file listed in the manifest against its recorded size and sha256.

    Checkpoints written before manifests existed carry no `manifest` key and are not checked.
    """
    if "manifest" not in qcfg:
        return
    if qcfg["manifest"] != MANIFEST_FILE:
        raise CheckpointError(f"{path / 'config.json'}: unexpected manifest name {_short(qcfg['manifest'])}")
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        raise CheckpointError(f"{manifest} is missing; the checkpoint is incomplete or was edited")
    data = _read_json(manifest)
    entries = data.get("files") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"{manifest} has no file list; the checkpoint is corrupt")
    for name, entry in entries.items():
        file = path / name
        if (not isinstance(entry, dict) or Path(name).is_absolute() or ".." in Path(name).parts
                or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{manifest}: bad entry {_short(name)}; the checkpoint is corrupt")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST_FILE}); the checkpoint is incomplete")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise CheckpointError(
                f"{file} does not match its checksum in {MANIFEST_FILE}; the file is damaged or was edited"
            )


def _short(value: Any, limit: int = 48) -> str:
    """repr(value), cut to `limit` characters so a hostile value cannot flood the error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(file: Path) -> Any:
    """Parse a small JSON file; every way it can be unreadable becomes a CheckpointError."""
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(
                f"{file} is {size} bytes, more than a checkpoint config can be ({MAX_CONFIG_BYTES}); "
                "the checkpoint is corrupt"
            )
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit, nesting
        raise CheckpointError(f"{file} is not valid JSON ({one_line(exc, 200)}); the checkpoint is corrupt") from exc
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read ({exc.strerror or exc})") from exc


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json with a validated quantization_config."""
    path = Path(path).expanduser()
    cfg_file = path / "config.json"
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is the directory `unibcq quantize --out` wrote")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} not found")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing; not a unibcq checkpoint")
    data = _read_json(cfg_file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    qcfg = data.get(QUANT_KEY)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "unibcq":
        raise CheckpointError(f"{path} is not a unibcq checkpoint (no unibcq quantization_config in config.json)")
    version = qcfg.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses format version {_short(version)}; this unibcq reads version {FORMAT_VERSION}"
        )
    for key, types in (("method", (str,)), ("bits", (int,)), ("group_size", (int,)),
                       ("source_model", (str, type(None)))):
        if key in qcfg and (type(qcfg[key]) not in types):
            raise CheckpointError(f"{cfg_file}: quantization_config.{key} has the wrong type ({_short(qcfg[key])})")
    _check_layers(str(cfg_file), qcfg.get("layers"))
    return data


def _check_layers(where: str, layers: Any) -> None:
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{where}: quantization_config.layers must be a non-empty object")
    for name, spec in layers.items():
        _check_layer_spec(where, name, spec)


def _check_layer_spec(where: str, name: str, spec: Any) -> None:
    """Types and ranges of one layer's layout entry, so hostile configs fail clearly."""
    name = _short(name, 80)
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: layer {name} must be an object")
    fmt = spec.get("format", "bcq")
    if not isinstance(fmt, str) or fmt not in PACKED_MODULES:
        raise CheckpointError(f"{where}: layer {name} has unknown format {_short(fmt)}")
    ints = ("in_features", "out_features") + (("bits", "group_size") if fmt == "bcq" else ("max_groups",))
    if any(type(spec.get(k)) is not int for k in ints):
        raise CheckpointError(f"{where}: layer {name} needs integer {', '.join(ints)}")
    if not 1 <= spec["in_features"] <= 2**24 or not 1 <= spec["out_features"] <= 2**24:
        raise CheckpointError(f"{where}: layer {name} has an out-of-range shape")
    for key in ("offset", "bias"):
        if key in spec and type(spec[key]) is not bool:
            raise CheckpointError(f"{where}: layer {name} has non-boolean {key} {_short(spec[key])}")
    for key in ("bits_per_weight", *ACCOUNTING_KEYS):
        value = spec.get(key, 0.0)
        if type(value) not in (int, float) or not 0 <= value <= 2**16:  # also rejects NaN
            raise CheckpointError(f"{where}: layer {name} has invalid {key} {_short(value)}")
    if fmt == "bcq":
        if not MIN_BITS <= spec["bits"] <= MAX_BITS:
            raise CheckpointError(f"{where}: layer {name} has out-of-range bits {_short(spec['bits'])}")
        if spec["group_size"] == 0 or spec["group_size"] < -1:
            raise CheckpointError(f"{where}: layer {name} has invalid group_size {_short(spec['group_size'])}")
    else:
        if not 1 <= spec["max_groups"] <= MAX_GROUPS:
            raise CheckpointError(f"{where}: layer {name} has out-of-range max_groups {_short(spec['max_groups'])}")
        try:
            parse_granularity(spec.get("granularity"))
        except UnibcqError as exc:
            raise CheckpointError(f"{where}: layer {name}: {exc}") from exc


def check_output_dir(out: str | os.PathLike, overwrite: bool, source: str | None = None) -> None:
    """Refuse an output folder that would lose something: an existing path without `overwrite`;
    with it, anything but an earlier unibcq checkpoint (or an empty folder) -- never the working
    directory, a folder holding it, or the model being quantized. The CLI checks before any
    work and every save checks again, so `unibcq.save(..., overwrite=True)` is as safe."""
    out = Path(out).expanduser()
    if not out.exists():
        return
    if not overwrite:
        raise UnibcqError(f"output {out} already exists; remove it or pass --overwrite (overwrite=True)")
    if not out.is_dir():
        raise UnibcqError(f"output {out} is a file; --overwrite replaces only an earlier checkpoint folder")
    target = out.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise UnibcqError(f"output {out} is the working directory or holds it; choose another --out")
    model = Path(source).expanduser() if source else None
    if model is not None and model.exists() and (model.resolve() == target or target in model.resolve().parents):
        raise UnibcqError(f"output {out} holds the model being quantized ({source}); choose another --out")
    if any(out.iterdir()) and not is_checkpoint(out):
        raise UnibcqError(f"output {out} is not a unibcq checkpoint; --overwrite replaces only an earlier "
                          "checkpoint, so move its files away or choose another --out")
    added = _files_added_to(out)
    if added:
        shown = ", ".join(added[:3]) + (f" and {len(added) - 3} more" if len(added) > 3 else "")
        raise UnibcqError(f"output {out} also holds files the checkpoint did not write ({shown}); --overwrite "
                          "would delete them, so move them away first")


def listed_files(folder: str | os.PathLike) -> set[str] | None:
    """The files a checkpoint wrote, by its manifest (the manifest included); None where the
    folder has no readable manifest."""
    try:
        return set(json.loads((Path(folder) / MANIFEST_FILE).read_text())["files"]) | {MANIFEST_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _files_added_to(checkpoint: Path) -> list[str]:
    """Files in a checkpoint folder that its manifest does not list (a user's notes or eval
    reports); none for a checkpoint without a readable manifest, which cannot tell."""
    listed = listed_files(checkpoint)
    if listed is None:
        return []
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                  if p.is_file() and str(p.relative_to(checkpoint)) not in listed)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a config.json that declares a unibcq checkpoint."""
    cfg_file = Path(path).expanduser() / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        data = _read_json(cfg_file)
    except CheckpointError:
        return False
    qcfg = data.get(QUANT_KEY) if isinstance(data, dict) else None
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == "unibcq"


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: `model.safetensors`, or the shards its index lists."""
    path = Path(path).expanduser()
    index = path / WEIGHTS_INDEX
    if index.is_file():
        files = [path / name for name in sorted(set(read_weight_map(index, CheckpointError).values()))]
    else:
        files = [path / WEIGHTS_FILE]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    return files


def has_unibcq_weights(path: str | os.PathLike) -> bool:
    """Whether `path` holds a model.safetensors written by unibcq (it stores packed tensors).

    Lets callers recognise a checkpoint whose config.json is damaged, so the user gets the
    checkpoint loader's precise error instead of a generic model-loading one. Checkpoints
    written before 2026-11-27 also carry a `unibcq_format` metadata key.
    """
    try:
        for weights in weight_files(path):  # a shard may hold only dense tensors (the embedding)
            with safe_open(str(weights), "pt") as f:
                if ("unibcq_format" in (f.metadata() or {})
                        or any(key.rsplit(".", 1)[-1] in PACKED_SUFFIXES for key in f.keys())):
                    return True
        return False
    except Exception:  # any unreadable file is simply not recognisable
        return False


def read_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every stored tensor, from the file header only.

    safetensors checks that the header's shapes and offsets fit the file, so a hostile
    header (a tensor of 10**12 elements, offsets past the end) fails here, before anything
    the size of a tensor is allocated.
    """
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    for weights in weight_files(path):
        try:
            with safe_open(str(weights), "pt") as f:
                for key in f.keys():
                    if key in header:
                        raise CheckpointError(f"tensor {_short(key)} is stored twice; the checkpoint is corrupt")
                    sl = f.get_slice(key)
                    header[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{weights} is corrupt or truncated ({exc}); re-create the checkpoint") from exc
    return header


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for weights in weight_files(path):
        try:
            state.update(load_file(str(weights)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{weights} is corrupt or truncated ({exc}); re-create the checkpoint") from exc
    return state


def install_packed_layers(model: torch.nn.Module, layers: dict[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """Swap each listed linear layer for an empty packed module of its recorded layout.

    Shared by `load_checkpoint` and the transformers quantizer, so both check the layout
    against the model the same way before any tensor is read.
    """
    _check_layers("quantization_config", layers)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for name, spec in layers.items():
        shown = _short(name, 80)
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"layer {shown} in the checkpoint does not exist in a {model_type} model") from exc
        if not isinstance(current, torch.nn.Linear):
            raise CheckpointError(f"layer {shown} in the checkpoint is a {type(current).__name__}, not a linear layer")
        if (current.in_features, current.out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"layer {shown}: shape in quantization_config disagrees with the model config")
        fmt = spec.get("format", "bcq")
        set_module(model, name, PACKED_MODULES[fmt].from_layout(spec, dtype))


# safetensors dtype names of the torch dtypes a checkpoint can hold
_SAFETENSORS_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool, "F16": torch.float16, "BF16": torch.bfloat16,
    "I16": torch.int16, "F32": torch.float32, "I32": torch.int32, "F64": torch.float64, "I64": torch.int64,
}

TensorSpec = tuple[tuple[int, ...], Any]  # (shape, torch dtype, or the header's name for an unknown one)


def _model_config(path: Path, data: dict[str, Any], header: dict[str, TensorSpec]) -> PretrainedConfig:
    """The transformers config of a checkpoint, checked before any module is built."""
    cfg_file = path / "config.json"
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{cfg_file}: model_type {_short(model_type)} is not one unibcq quantizes "
            f"({', '.join(sorted(ARCHITECTURES))})"
        )
    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
        _check_config_types(cfg_file, data, defaults)
        hf_config = AutoConfig.for_model(**data)
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises ValueError/TypeError/validation errors here
        raise CheckpointError(f"{cfg_file} does not describe a model transformers can build: {one_line(exc)}") from exc
    # Building the module tree costs Python time per layer even on the meta device; every
    # decoder layer stores at least one tensor, so the header bounds the honest count.
    layers = getattr(hf_config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(header):
        raise CheckpointError(
            f"{cfg_file} declares {layers} decoder layers but {WEIGHTS_FILE} holds only {len(header)} tensors"
        )
    return hf_config


def _check_config_types(cfg_file: Path, data: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Each known field has the JSON type of its default (None is always allowed).

    transformers does not check most fields; a wrong type (e.g. output_hidden_states: 0.0)
    would build a model that only fails in the middle of its first forward pass.
    """
    for key, value in data.items():
        default = defaults.get(key)
        if value is None or default is None:
            continue
        if key.endswith("_token_id"):  # an int, or a list of them (several end-of-sequence tokens)
            ok = (type(value) is int) or isinstance(value, list)
        elif isinstance(default, bool):
            ok = type(value) is bool
        elif isinstance(default, int):
            ok = type(value) is int
        elif isinstance(default, float):
            ok = type(value) in (int, float)
        elif isinstance(default, (str, dict, list)):
            ok = isinstance(value, type(default))
        else:
            continue
        if not ok:
            raise CheckpointError(
                f"{cfg_file}: {key} must be a {type(default).__name__} like its default {_short(default)}, "
                f"got {_short(value)}"
            )


def _build_model(path: Path, hf_config: PretrainedConfig, layers: dict[str, Any]) -> PreTrainedModel:
    """An uninitialised model of `hf_config` with the packed layers of `layers` in place."""
    dtype = hf_config.dtype or torch.float32
    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as exc:  # transformers raises ValueError/TypeError/validation errors here
        raise CheckpointError(
            f"{path / 'config.json'} does not describe a model transformers can build: {one_line(exc)}"
        ) from exc
    install_packed_layers(model, layers, dtype)
    _load_generation_config(path, model)
    return model


def _load_generation_config(path: Path, model: PreTrainedModel) -> None:
    """The checkpoint's generation_config.json (saved from the source model), which `from_config`
    does not read: without it a quantized model would stop and sample otherwise than its source
    (another EOS list, top-k, top-p)."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except Exception as exc:  # JSON and validation errors of many types
        raise CheckpointError(f"{path / 'generation_config.json'} is malformed: {one_line(exc)}") from exc


def _expected_tensors(model: torch.nn.Module, hf_config: PretrainedConfig) -> dict[str, TensorSpec]:
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if getattr(hf_config, "tie_word_embeddings", False):
        # Tied weights are one tensor; the checkpoint stores the embedding only.
        expected.pop("lm_head.weight", None)
    return expected


def _check_tensor_specs(path: Path, expected: dict[str, TensorSpec], found: dict[str, TensorSpec]) -> None:
    """The stored tensors are exactly those the config implies, with the same shapes and dtypes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} does not match its config: missing {missing[:3]}, unexpected "
            f"{[k[:80] for k in unexpected[:3]]}"
        )
    for key, (shape, dtype) in found.items():
        want_shape, want_dtype = expected[key]
        if shape != want_shape or dtype != want_dtype:
            raise CheckpointError(
                f"tensor {key} has shape {_short(shape)} {dtype}, the config implies {want_shape} {want_dtype}"
            )


def check_stored_values(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Reject loaded values no quantizer writes: NaN/inf, group indices past the scales. Tensors
    left on the meta device (offloaded by a transformers device map) are not in memory to check."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path / WEIGHTS_FILE}: tensor {key} holds NaN/inf values; the checkpoint is corrupt"
            )
    for name, layer in quantized_layers(model).items():
        if any(buffer.is_meta for buffer in layer.buffers()):
            continue
        try:
            layer.weight_tensor().check_values()
        except UnibcqError as exc:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: layer {name}: {exc}; the checkpoint is corrupt") from exc


def _verified_layout(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], str]],
                                          PretrainedConfig, dict[str, TensorSpec]]:
    """(quantization_config, header, transformers config, expected tensors), all checked.

    The model is built on the meta device (no memory) and its tensors compared with the
    safetensors header, whose shapes safetensors has checked against the file size; so
    nothing the files claim is allocated before it is known to match the real file.
    """
    data = read_config(path)
    qcfg = data.pop(QUANT_KEY)
    header = read_header(path)
    typed = {k: (shape, _SAFETENSORS_DTYPES.get(name, name)) for k, (shape, name) in header.items()}
    hf_config = _model_config(path, data, typed)
    with torch.device("meta"):
        skeleton = _build_model(path, hf_config, qcfg["layers"])
    expected = _expected_tensors(skeleton, hf_config)
    _check_tensor_specs(path, expected, typed)
    return qcfg, header, hf_config, expected


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """Rebuild the quantized model: config -> empty model -> packed layers -> tensors.

    The whole layout is checked against the file header first (`_verified_layout`), so the
    real model, built next, is no larger than the files; then every file against the
    manifest's checksums, which catches damage that leaves the layout intact (a flipped
    bit in a tensor). A structural problem is reported as such before any checksum.
    `dtype` (a torch dtype or its name) is what the unquantized tensors compute in (default: as stored); evaluation
    asks for float32 so that a bfloat16 checkpoint is compared with its float32 reference
    on quantization error alone.
    """
    dtype = floating_dtype(dtype)
    path = Path(path).expanduser()
    qcfg, _, hf_config, expected = _verified_layout(path)
    verify_manifest(path, qcfg)
    state = _load_tensors(path)
    # The file could have changed since its header was read: check what was really loaded.
    _check_tensor_specs(path, expected, {k: (tuple(v.shape), v.dtype) for k, v in state.items()})
    if dtype is not None and dtype != hf_config.dtype:
        hf_config.dtype = dtype
        state = cast_dense(state, qcfg["layers"], dtype)
    model = _build_model(path, hf_config, qcfg["layers"])
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    check_stored_values(path, model, state)
    describe_quantization(model, qcfg)
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
    dense_dtype: str
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
            "dense_dtype": self.dense_dtype,
            "file_bytes": self.file_bytes,
            "layers": self.layers,
        }


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Per-layer and whole-model bits per weight, without loading the tensors.

    The file header is checked against the config as `load` checks it (shapes and dtypes of
    every tensor), so the figures describe a checkpoint whose layout can load.
    """
    path = Path(path).expanduser()
    qcfg, header, hf_config, _ = _verified_layout(path)
    layers: dict[str, dict[str, Any]] = {name: {"bytes": 0} for name in qcfg["layers"]}  # model order, not the header's
    dense_params = dense_bytes = 0
    for key, (shape, dtype) in header.items():
        numel = math.prod(shape)
        nbytes = numel * _SAFETENSORS_DTYPES[dtype].itemsize  # every dtype known: _verified_layout checked them
        if is_packed_key(key, qcfg["layers"]):
            layers[key.rpartition(".")[0]]["bytes"] += nbytes
        else:
            dense_params += numel
            dense_bytes += nbytes
    qparams = qbytes = 0
    for name, spec in qcfg["layers"].items():
        numel = spec["in_features"] * spec["out_features"]
        nbytes = layers[name]["bytes"]
        layers[name] = {**spec, "bytes": nbytes, "bits_per_weight": 8.0 * nbytes / numel}
        if spec.get("format", "bcq") == "bcq":
            layers[name]["groups_per_row"] = num_groups(spec["in_features"], spec["group_size"])
        qparams += numel
        qbytes += nbytes
    return CheckpointInfo(
        method=qcfg.get("method", "?"), bits=qcfg.get("bits", 0), group_size=qcfg.get("group_size", 0),
        quantized_params=qparams, quantized_bytes=qbytes, dense_params=dense_params, dense_bytes=dense_bytes,
        dense_dtype=dtype_name(hf_config.dtype or torch.float32),
        file_bytes=sum(f.stat().st_size for f in weight_files(path)), layers=layers,
    )
