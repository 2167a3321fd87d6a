"""A cheap identity of a local model's files, so saved progress is never continued on other weights.

Hashing every weight would cost a full read of the model. A unibcq checkpoint carries a
manifest of its files' sha256, which every load verifies, so its identity is its content: a
checkpoint quantized again, bit for bit the same (a deterministic method on the same
machine, or on a fresh clone of the benchmark folder), keeps the progress saved against it.
Any other local model is known by (name, size, mtime) of its weight and config files, which
changes whenever a file is written anew or replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from unibcq.config import lists_unread_settings, normalized_record

MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
MODEL_FILE_NAMES = ("config.json",)
MANIFEST_FILE = "manifest.json"  # a checkpoint's file list with sizes and sha256 (unibcq.checkpoint)
QUANT_KEY = "quantization_config"  # where a checkpoint's config.json describes its quantization
# A real config.json is a few kB (a few hundred kB with the layer layout of a large model);
# anything far bigger is not a checkpoint config and is not read into memory.
MAX_CONFIG_BYTES = 16 * 2**20
# Entries of a checkpoint's config that describe the machine or the run rather than the model:
# where the source was loaded from (a cache folder named after the source file's modification
# time), the source files' modification times, and how long quantizing took.
RUN_ENTRIES = ("_name_or_path",)
QUANT_RUN_ENTRIES = ("source_files", "quantize_seconds")


def files_fingerprint(spec: str | Path) -> list[tuple[str, int, int | str]] | None:
    """The identity of a local model file or folder; None for a hub id.

    A unibcq checkpoint: (name, size, sha256) of every file its manifest lists, its config
    without the entries that describe the run. Anything else: (name, size, mtime_ns) of the
    file, or of a folder's weight and config files (not the eval outputs a user keeps beside
    them), so a model rewritten under the same path no longer matches its old pieces.
    """
    if not str(spec):
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        content = checkpoint_identity(path)
        if content is not None:
            return content
        files = sorted(f for f in path.iterdir()
                       if f.is_file() and (f.suffix in MODEL_FILE_SUFFIXES or f.name in MODEL_FILE_NAMES))
    else:
        return None
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def checkpoint_identity(folder: Path) -> list[tuple[str, int, str]] | None:
    """(name, size, sha256) of a checkpoint's files (weights, tokenizer, generation config) and of
    its config without the run's entries; None for a folder that is not a unibcq checkpoint whose
    config names its manifest (the ones `load` verifies), so its files' times identify it.

    A config written before 2026-12-07 lists every setting and is hashed as written; a later one
    lists only its method's and is hashed with the others at their defaults, so a checkpoint
    quantized again now, bit for bit the same, keeps the progress saved against the earlier one
    whenever that one's unread settings were at their defaults.
    """
    try:
        config = _small_json(folder / "config.json")
        qcfg = config[QUANT_KEY]
        if qcfg.get("quant_method") != "unibcq" or qcfg.get("manifest") != MANIFEST_FILE:
            return None
        entries = _small_json(folder / MANIFEST_FILE)["files"]
        files = sorted((str(name), int(entry["bytes"]), str(entry["sha256"]))
                       for name, entry in entries.items() if name != "config.json")
        stable = {k: v for k, v in config.items() if k not in RUN_ENTRIES}
        settings = {k: v for k, v in qcfg.items() if k not in QUANT_RUN_ENTRIES}
        stable[QUANT_KEY] = settings if lists_unread_settings(settings) else normalized_record(settings)
        text = json.dumps(stable, sort_keys=True).encode()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not any(Path(name).suffix in MODEL_FILE_SUFFIXES for name, _, _ in files):
        return None
    return [*files, ("config.json", len(text), hashlib.sha256(text).hexdigest())]


def _small_json(path: Path) -> Any:
    """A JSON file of at most MAX_CONFIG_BYTES (ValueError past it: not read into memory)."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is too large")
    return json.loads(path.read_text())


def source_spec(spec: str | os.PathLike) -> str:
    """How a model is recorded as a source: a local path absolutely, so that it resolves from any
    working directory (a checkpoint's tokenizer and default KL reference come from it); Hub ids
    and aliases as given."""
    if not str(spec):
        return ""  # no source (a model built from a config): not the working directory
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)
