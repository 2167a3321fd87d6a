"""Progress bars with ETA and summary tables (rich), shared by every long-running command."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

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


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _NullProgress]:
    """A progress bar on stderr: description, bar, done/total, elapsed, ETA."""
    if not enabled:
        yield _NullProgress()
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
    with progress:
        yield progress


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a summary table to stdout."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "name", "metric", "dataset") else "right")
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=None if sys.stdout.isatty() else 160).print(table)
