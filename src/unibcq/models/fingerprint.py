"""A cheap identity of a local model's files, so saved progress is never continued on other weights.

Hashing every weight would cost a full read of the model; (name, size, mtime) of its weight
and config files changes whenever a checkpoint is written anew or a file is replaced.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
MODEL_FILE_NAMES = ("config.json",)


def files_fingerprint(spec: str | Path) -> list[tuple[str, int, int]] | None:
    """(name, size, mtime_ns) of a local model file, or of a model folder's weight and config
    files (not the eval outputs a user may keep beside them); None for a hub id. A checkpoint
    re-quantized under the same path then no longer matches its old pieces."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir()
                       if f.is_file() and (f.suffix in MODEL_FILE_SUFFIXES or f.name in MODEL_FILE_NAMES))
    else:
        return None
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
