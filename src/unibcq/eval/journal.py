"""The on-disk journal that lets a long evaluation resume where it was killed.

A full task set on a CPU takes hours, so every finished piece (one perplexity dataset, one
task) is committed to a small JSON file as soon as it is measured. A rerun with the same
protocol reuses those pieces instead of measuring them again; a journal written under a
different protocol (other model, windows, limit, shots, dtype...) is never mixed in: it is
replaced, with a message. The caller removes the journal once the final result is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from unibcq.atomic import write_json_atomic

JOURNAL_VERSION = 1


def files_fingerprint(spec: str | Path) -> list[tuple[str, int, int]] | None:
    """(name, size, mtime_ns) of a local model file or of the files in a model folder; None
    for a hub id. A checkpoint re-quantized under the same path then no longer matches."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file())
    else:
        return None
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


class EvalJournal:
    """Finished pieces of one evaluation, keyed by kind ("ppl", "task", "mmlu" subjects) and name."""

    def __init__(self, path: str | Path, protocol: dict[str, Any]) -> None:
        self.path = Path(path)
        self.protocol = json.loads(json.dumps(protocol, default=str))  # compare as it reads back from disk
        self.pieces: dict[str, dict[str, Any]] = {}
        stored = self._read()
        if stored is None:
            return
        if stored.get("version") == JOURNAL_VERSION and stored.get("protocol") == self.protocol:
            self.pieces = {kind: dict(named) for kind, named in stored.get("pieces", {}).items()}
        else:
            print(f"unibcq: ignoring the partial results in {self.path}: they were measured under other "
                  "settings; starting over", file=sys.stderr)

    def _read(self) -> dict[str, Any] | None:
        try:
            stored = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            print(f"unibcq: ignoring the unreadable partial results in {self.path}", file=sys.stderr)
            return None
        return stored if isinstance(stored, dict) else None

    def get(self, kind: str, name: str) -> Any:
        """The stored piece, or None when it still has to be measured."""
        return self.pieces.get(kind, {}).get(name)

    def finished(self, kind: str) -> dict[str, Any]:
        return dict(self.pieces.get(kind, {}))

    def put(self, kind: str, name: str, value: Any) -> None:
        """Record a finished piece and commit the journal atomically."""
        self.pieces.setdefault(kind, {})[name] = value
        write_json_atomic(self.path, {"version": JOURNAL_VERSION, "protocol": self.protocol, "pieces": self.pieces})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def resumed(self) -> list[str]:
        """Names of the pieces this run did not have to measure (for the user's message)."""
        return [f"{kind} {name}" for kind, named in self.pieces.items() for name in named]
