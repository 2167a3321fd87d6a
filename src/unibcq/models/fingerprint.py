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
from pathlib import Path

MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
MODEL_FILE_NAMES = ("config.json",)
MANIFEST_FILE = "manifest.json"  # a checkpoint's file list with sizes and sha256 (unibcq.checkpoint)
QUANT_KEY = "quantization_config"  # where a checkpoint's config.json describes its quantization
# Entries of a checkpoint's config that describe the run rather than the model: the source files'
# modification times (they differ wherever the source is installed) and how long quantizing took.
RUN_ENTRIES = ("source_files", "quantize_seconds")


def files_fingerprint(spec: str | Path) -> list[tuple[str, int, int | str]] | None:
    """The identity of a local model file or folder; None for a hub id.

    A unibcq checkpoint: (name, size, sha256) of its weight files from its manifest, and of its
    config without the entries that describe the run. Anything else: (name, size, mtime_ns) of the
    file, or of a folder's weight and config files (not the eval outputs a user keeps beside
    them), so a model rewritten under the same path no longer matches its old pieces.
    """
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
    """(name, size, sha256) of a checkpoint's weight files and machine-independent config, or
    None for a folder without a readable unibcq manifest (fall back to modification times)."""
    try:
        entries = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        config = json.loads((folder / "config.json").read_text())
        weights = sorted((name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in entries.items()
                         if Path(name).suffix in MODEL_FILE_SUFFIXES)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get(QUANT_KEY), dict) or not weights:
        return None
    config[QUANT_KEY] = {k: v for k, v in config[QUANT_KEY].items() if k not in RUN_ENTRIES}
    text = json.dumps(config, sort_keys=True).encode()
    return [*weights, ("config.json", len(text), hashlib.sha256(text).hexdigest())]

