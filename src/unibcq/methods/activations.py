"""Calibration activations of one stream, held in memory or spilled to disk.

Block-by-block calibration keeps per-sample hidden states between blocks: the inputs from
the quantized blocks, and for reconstruction also the full-precision inputs and targets.
For a large model with many long calibration windows these streams outgrow memory
(128 x 2048 tokens x 8192 hidden x 4 bytes = 8 GiB each), so a store can keep each sample
in its own safetensors file instead and read it back when the engine asks for it: memory
then holds one batch of activations, not the stream. The engines only append and index,
so they do not care which kind they get.

The same per-sample files are the activation format of a run's saved state
(`RunState`), which is how a resumed run gets its streams back without loading them whole.
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unibcq.errors import CheckpointError

_KEY = "hidden"


def _sample_file(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.safetensors"


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a sample file (files are never rewritten in place); copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _read(path: Path) -> torch.Tensor:
    try:
        return load_file(str(path))[_KEY]
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"activation file {path} is missing or corrupt ({exc})") from exc


class ActivationStore(Sequence[torch.Tensor]):
    """Per-sample tensors of one activation stream: a list in memory, or files under `spill_dir`.

    A spilled store owns a fresh folder inside `spill_dir` and deletes it when the store is
    garbage-collected, so finished streams do not pile up on disk.
    """

    def __init__(self, spill_dir: str | os.PathLike | None = None) -> None:
        self._items: list[torch.Tensor] = []
        self._count = 0
        self.folder: Path | None = None
        if spill_dir is not None:
            self.folder = Path(spill_dir) / f"stream-{uuid.uuid4().hex[:12]}"
            self.folder.mkdir(parents=True)
            weakref.finalize(self, shutil.rmtree, self.folder, True)

    @property
    def spilled(self) -> bool:
        return self.folder is not None

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu()
        if self.folder is None:
            self._items.append(tensor)
        else:
            save_file({_KEY: tensor.contiguous()}, str(_sample_file(self.folder, self._count)))
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not -self._count <= index < self._count:
            raise IndexError(f"sample {index} of a stream of {self._count}")
        index %= self._count
        if self.folder is None:
            return self._items[index]
        return _read(_sample_file(self.folder, index))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self._count))

    def save(self, folder: Path) -> None:
        """Write every sample as `folder/NNNNNN.safetensors` (hard links for a spilled store)."""
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(self._count):
            if self.folder is not None:
                _link_or_copy(_sample_file(self.folder, index), _sample_file(folder, index))
            else:
                save_file({_KEY: self._items[index].contiguous()}, str(_sample_file(folder, index)))

    @classmethod
    def load(cls, folder: Path, count: int, spill_dir: str | os.PathLike | None = None) -> "ActivationStore":
        """The `count` samples saved by `save` in `folder`: read into memory, or (with `spill_dir`) linked there."""
        missing = [i for i in range(count) if not _sample_file(folder, i).is_file()]
        if missing or _sample_file(folder, count).is_file():
            raise CheckpointError(f"{folder} does not hold the {count} saved samples (missing: {missing[:3]})")
        store = cls(spill_dir)
        for index in range(count):
            if store.folder is None:
                store.append(_read(_sample_file(folder, index)))
                continue
            _link_or_copy(_sample_file(folder, index), _sample_file(store.folder, index))
            store._count += 1
        return store


def as_store(samples: Sequence[torch.Tensor], spill_dir: str | os.PathLike | None = None) -> ActivationStore:
    """`samples` in a store (spilled when `spill_dir` is given)."""
    store = ActivationStore(spill_dir)
    for sample in samples:
        store.append(sample)
    return store
