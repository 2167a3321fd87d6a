"""On-disk progress of a block-by-block run, so a run killed half-way can continue.

Calibrated methods (GPTQ, UniQuanF, FlexRound) walk the decoder blocks in order, and
everything block k needs is: the packed layers of blocks < k, and the activation streams
entering block k (the quantized stream, plus the full-precision one for reconstruction).
After each block those are written to a state directory, each file through a temporary
name and an atomic rename, and `state.json` (the commit record) is rewritten last. A kill
at any instant therefore leaves either the previous or the new commit, never a mixture.

A resumed run reloads the committed blocks' packed layers and activation streams
bit-for-bit, and every block's training randomness is seeded from (seed, block index), so
it produces the same checkpoint as an uninterrupted run. The state records a fingerprint of
the quantization config, the model and the calibration tokens; resuming with anything
different is refused rather than silently mixing two runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from unibcq.atomic import write_json_atomic
from unibcq.config import QuantConfig
from unibcq.errors import CheckpointError, UnibcqError
from unibcq.methods.activations import ActivationStore, as_store
from unibcq.models.architectures import block_linears, set_module
from unibcq.models.fingerprint import files_fingerprint
from unibcq.nn.qlinear import PACKED_MODULES, PackedLinear

STATE_FILE = "state.json"
STATE_VERSION = 2  # 2: activation streams as folders of per-sample files
SPILL_PREFIX = "unibcq-spill-"  # activation spill folders a run makes inside its state directory
LOCK_FILE = "lock"  # held (flock) by the run using the directory


def _is_scratch(path: Path) -> bool:
    """Files a killed run may leave that no later run needs: spill folders, temporaries, the lock."""
    return path.name.startswith(SPILL_PREFIX) or ".tmp-" in path.name or path.name == LOCK_FILE


def state_dir_for(out_dir: str | os.PathLike) -> Path:
    """Where a run writing `out_dir` keeps its progress: a sibling `<out>.partial`."""
    out = Path(out_dir).expanduser().absolute()
    return out.with_name(out.name + ".partial")


def run_fingerprint(model: nn.Module, config: QuantConfig, windows: torch.Tensor) -> dict[str, Any]:
    """What must be equal for a saved state to be continued: config, model shape and name, the
    model's files (a model replaced under the same path must not be continued), calibration tokens."""
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    name = model_config.get("_name_or_path")
    return {
        "config": config.to_dict(),
        "model": {k: model_config.get(k) for k in ("_name_or_path", "model_type", "hidden_size",
                                                   "num_hidden_layers", "intermediate_size", "vocab_size")},
        "model_files": files_fingerprint(name) if name else None,
        "calibration_sha256": hashlib.sha256(windows.cpu().contiguous().numpy().tobytes()).hexdigest(),
        "calibration_shape": list(windows.shape),
    }


def _save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is missing or corrupt ({exc}); remove {path.parent} to start over") from exc


class RunState:
    """Committed progress of one run in a directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.completed = 0
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.layouts: dict[str, dict[str, Any]] = {}
        self.streams: dict[str, int] = {}  # samples per saved activation stream
        self._lock_fd: int | None = None
        self.seconds_before = 0.0  # quantizing time of the killed runs this one continues, to their last commit
        self._opened = perf_counter()

    @staticmethod
    def committed_seconds(path: str | os.PathLike) -> float:
        """The quantizing seconds the run state at `path` records up to its last committed block
        (0 when there is none): a resumed run adds them, so that its reported time is the whole
        quantization's, not that of its last stretch."""
        try:
            return float(json.loads((Path(path) / STATE_FILE).read_text()).get("seconds", 0.0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0.0

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: dict[str, Any], resume: bool) -> "RunState":
        """A fresh state at `path`, or (with `resume`) the one saved there by the same run.

        Without `resume` an existing state is an error, so a half-finished run is never
        discarded by accident; with `resume` and nothing saved the run simply starts. A folder
        at `path` that is no run state (no state file, yet more than a killed run's scratch)
        is refused either way: the run would take it over and delete it when done.
        """
        state = cls(path, fingerprint)
        record = state.path / STATE_FILE
        if state.path.exists() and not state.path.is_dir():
            raise UnibcqError(f"{state.path} is a file, where this run keeps its progress; move it away")
        if not record.is_file() and state.path.is_dir():
            if any(not _is_scratch(p) for p in state.path.iterdir()):
                raise UnibcqError(f"{state.path} is where this run keeps its progress, but it holds other files "
                                  f"(no {STATE_FILE}: not a unibcq run state); move it away or choose another --out")
        state.path.mkdir(parents=True, exist_ok=True)
        # Locked before anything is read or advised: a live run's directory must not be called
        # half-finished (and removed by the user on that advice).
        state._lock()
        try:
            if record.is_file():
                state._load_record(record, resume)
            state._clear_scratch()
        except BaseException:
            state.close()
            raise
        return state

    def _load_record(self, record: Path, resume: bool) -> None:
        """Take over the committed progress of a killed run of the same command."""
        if not resume:
            raise UnibcqError(f"{self.path} holds a half-finished run; pass --resume to continue it, "
                              f"or remove that directory to start over")
        try:
            saved = json.loads(record.read_text())
            if saved.get("version") != STATE_VERSION:
                raise ValueError(f"state version {saved.get('version')!r}, expected {STATE_VERSION}")
            completed, records, layouts = int(saved["completed"]), saved["records"], saved["layouts"]
            streams = {str(k): int(v) for k, v in saved["streams"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{record} is corrupt ({exc}); remove {self.path} to start over") from exc
        if saved.get("fingerprint") != self.fingerprint:
            differs = sorted(key for key in set(saved.get("fingerprint", {})) | set(self.fingerprint)
                             if saved.get("fingerprint", {}).get(key) != self.fingerprint.get(key))
            raise UnibcqError(f"{self.path} was saved by a different run (differs in: {', '.join(differs)}); "
                              f"rerun the same command to resume, or remove that directory to start over")
        self.completed, self.records, self.layouts, self.streams = completed, records, layouts, streams
        self.seconds_before = float(saved.get("seconds", 0.0))

    def _lock(self) -> None:
        """Lock the directory for this run, released by `close` (or when the process ends), so
        a second run on the same output fails instead of deleting the first one's files."""
        self._lock_fd = os.open(self.path / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise UnibcqError(f"another unibcq run is using {self.path}; wait for it to finish or stop it") from None

    def _clear_scratch(self) -> None:
        """Remove what a killed run left behind that no later run needs."""
        keep = f"activations-{self.completed:04d}"
        for entry in self.path.iterdir():
            stale_stream = entry.name.startswith("activations-") and entry.name != keep
            if (_is_scratch(entry) and entry.name != LOCK_FILE) or stale_stream:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the directory lock (the files stay for a later --resume)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def resume(self, model: nn.Module, onload: Callable[[int], None] | None,
               spill_dir: str | os.PathLike | None = None) -> dict[str, ActivationStore]:
        """Continue a run: put every committed block's packed layers back into `model` (blocks
        that stay on disk until their turn, `onload`, are read first, since a restored block
        keeps its norms and other dense parts) and return the streams entering the next block."""
        for index in range(self.completed if onload is not None else 0):
            onload(index)
        self.restore_blocks(model)
        return self.activations(spill_dir)

    def restore_blocks(self, model: nn.Module) -> None:
        """Put the packed layers of every committed block back into `model`."""
        for index in range(self.completed):
            tensors = _load_tensors(self.path / f"block-{index:04d}.safetensors")
            for name, layer in block_linears(model, index).items():
                spec = self.layouts.get(name)
                if spec is None:
                    raise CheckpointError(f"{self.path}: no saved layout for {name}; remove it to start over")
                dtype = layer.bias.dtype if getattr(layer, "bias", None) is not None else torch.float32
                module = PACKED_MODULES[spec["format"]].from_layout(spec, dtype)
                prefix = f"{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                       strict=True, assign=True)
                set_module(model, name, module)

    def activations(self, spill_dir: str | os.PathLike | None = None) -> dict[str, ActivationStore]:
        """The activation streams entering the first uncommitted block (spilled under `spill_dir` if given)."""
        folder = self.path / f"activations-{self.completed:04d}"
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is missing; remove {self.path} to start over")
        return {name: ActivationStore.load(folder / name, count, spill_dir) for name, count in self.streams.items()}

    def _save_activations(self, streams: dict[str, Sequence[torch.Tensor]], name: str) -> None:
        """Write the streams as `name/<stream>/` folders, through a temporary name and a rename."""
        final = self.path / name
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for stream, samples in streams.items():
            store = samples if isinstance(samples, ActivationStore) else as_store(samples)
            store.save(tmp / stream)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def commit_block(self, model: nn.Module, index: int, activations: dict[str, Sequence[torch.Tensor]],
                     records: dict[str, list[Any]]) -> None:
        """Record block `index` as done: its packed layers, the next block's inputs, the summary rows."""
        if index != self.completed:
            raise UnibcqError(f"internal error: committing block {index} after {self.completed} completed blocks")
        layers = {name: module for name, module in block_linears(model, index).items()}
        tensors: dict[str, torch.Tensor] = {}
        for name, module in layers.items():
            if not isinstance(module, PackedLinear):
                raise UnibcqError(f"internal error: {name} is not quantized at commit time")
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
            self.layouts[name] = module.layout()
        _save_tensors_atomic(tensors, self.path / f"block-{index:04d}.safetensors")
        self._save_activations(activations, f"activations-{index + 1:04d}")
        streams = {name: len(samples) for name, samples in activations.items()}
        for key, rows in records.items():
            self.records[key] = [asdict(r) if not isinstance(r, dict) else r for r in rows]
        write_json_atomic(self.path / STATE_FILE, {
            "version": STATE_VERSION, "completed": index + 1, "fingerprint": self.fingerprint,
            "records": self.records, "layouts": self.layouts, "streams": streams,
            "seconds": self.seconds_before + perf_counter() - self._opened,
        })
        self.completed, self.streams = index + 1, streams
        shutil.rmtree(self.path / f"activations-{index:04d}", ignore_errors=True)
