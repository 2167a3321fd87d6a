"""Progress bars with ETA and summary tables (rich), shared by every long-running command."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class _NullProgress:
    """Stands in for a rich Progress when progress display is off."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None


class _NestedProgress:
    """Adds rows to an already running display (rich allows one live display) and removes them after."""

    def __init__(self, outer: Progress) -> None:
        self.outer = outer
        self.tasks: list[Any] = []

    def add_task(self, *args, **kwargs) -> Any:
        task = self.outer.add_task(*args, **kwargs)
        self.tasks.append(task)
        return task

    def update(self, *args, **kwargs) -> None:
        self.outer.update(*args, **kwargs)

    def close(self) -> None:
        for task in self.tasks:
            self.outer.remove_task(task)


_active: Progress | None = None


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _NullProgress | _NestedProgress]:
    """A progress bar on stderr: description, bar, done/total, elapsed, ETA.

    Opened inside another enabled progress bar (e.g. a layer bar inside `unibcq compare`'s
    bar over cells), its rows join the outer display and disappear when it closes.
    """
    global _active
    if not enabled:
        yield _NullProgress()
        return
    if _active is not None:
        nested = _NestedProgress(_active)
        try:
            yield nested
        finally:
            nested.close()
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    _active = progress
    try:
        with progress:
            yield progress
    finally:
        _active = None


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a summary table to stdout."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "name", "metric", "dataset") else "right")
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=None if sys.stdout.isatty() else 160).print(table)
