"""The on-disk journal that lets a long evaluation resume where it was killed.

A full task set on a CPU takes hours, so every finished piece (one perplexity dataset, one
task, one MMLU subject, one part of a zero-shot task) is committed to a small JSON file as
soon as it is measured. A rerun under the same protocol reuses those pieces instead of
measuring them again; a journal written under another protocol (other model files, windows,
limit, shots, dtype, data...) is never mixed in: it is replaced, with a message. The caller removes the journal once the
final result is written. A journal that cannot be written only costs the ability to resume.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from unibcq.atomic import write_json_atomic

JOURNAL_VERSION = 1
KIND_LABELS = {"ppl": "perplexity dataset(s)", "task": "task(s)", "mmlu": "MMLU subject(s)",
               "part": "task part(s)"}


class EvalJournal:
    """Finished pieces of one evaluation, keyed by kind ("ppl", "task", "mmlu", "part") and name."""

    def __init__(self, path: str | Path, protocol: dict[str, Any]) -> None:
        self.path = Path(path).expanduser()  # where write_json_atomic writes it
        self.protocol = json.loads(json.dumps(protocol, default=str))  # compare as it reads back from disk
        self.pieces: dict[str, dict[str, Any]] = {}
        self.writable = True
        stored = self._read()
        if stored is not None and stored.get("version") == JOURNAL_VERSION and stored.get("protocol") == self.protocol:
            self.pieces = {kind: dict(named) for kind, named in stored["pieces"].items()}
        elif stored is not None:
            print(f"unibcq: ignoring the partial results in {self.path}: they were measured under other "
                  "settings; starting over", file=sys.stderr)
        self.reused = Counter({kind: len(named) for kind, named in self.pieces.items() if named})
        if self.reused:
            print(f"unibcq: resuming from {self.path} ({self.summary()} already measured)", file=sys.stderr)

    @staticmethod
    def stored_protocol(path: str | Path) -> dict[str, Any] | None:
        """The protocol a journal file at `path` was written under, without taking its pieces."""
        try:
            stored = json.loads(Path(path).expanduser().read_text())
        except (OSError, ValueError):
            return None
        return stored.get("protocol") if isinstance(stored, dict) else None

    def _read(self) -> dict[str, Any] | None:
        try:
            stored = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            stored = None
        well_formed = (isinstance(stored, dict) and isinstance(stored.get("pieces"), dict)
                       and all(isinstance(named, dict) for named in stored["pieces"].values()))
        if not well_formed:
            print(f"unibcq: ignoring the unreadable partial results in {self.path}", file=sys.stderr)
            return None
        return stored

    def get(self, kind: str, name: str) -> Any:
        """The stored piece, or None when it still has to be measured."""
        return self.pieces.get(kind, {}).get(name)

    def finished(self, kind: str) -> dict[str, Any]:
        """Every stored piece of `kind`, by name (a copy)."""
        return dict(self.pieces.get(kind, {}))

    def put(self, kind: str, name: str, value: Any, supersedes: Sequence[tuple[str, str]] = ()) -> None:
        """Record a finished piece and commit the journal atomically; the (kind, name) pieces
        it `supersedes` (the parts of a task now finished) leave the journal in the same write.

        A failed write (read-only folder, full disk) is reported once and the evaluation goes
        on without a journal: the result matters more than the ability to resume it.
        """
        for old_kind, old_name in supersedes:
            self.pieces.get(old_kind, {}).pop(old_name, None)
        self.pieces = {k: named for k, named in self.pieces.items() if named}
        self.pieces.setdefault(kind, {})[name] = value
        if not self.writable:
            return
        try:
            write_json_atomic(self.path, {"version": JOURNAL_VERSION, "protocol": self.protocol,
                                          "pieces": self.pieces})
        except OSError as err:
            self.writable = False
            print(f"unibcq: cannot write {self.path} ({err}); this evaluation will not be resumable",
                  file=sys.stderr)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def summary(self) -> str:
        """What this run found already measured, e.g. '2 task(s), 12 MMLU subject(s)'; empty if nothing."""
        return ", ".join(f"{count} {KIND_LABELS.get(kind, kind)}" for kind, count in self.reused.items())
