"""One evaluation protocol (perplexity + KL + tasks) shared by `unibcq eval` and `unibcq compare`.

Keeping it in one place guarantees that every row of a comparison report was measured
exactly as a standalone `unibcq eval` with the same flags would measure it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unibcq.errors import UnibcqError
from unibcq.eval.journal import EvalJournal
from unibcq.models.architectures import context_window


@dataclass
class EvalSettings:
    """What to measure: perplexity datasets (KL on the first), and optional benchmark tasks."""

    datasets: list[str]
    seq_len: int = 2048
    max_windows: int | None = None
    tasks: list[str] | None = None
    limit: int | None = None
    mmlu_shots: int = 5
    batch_size: int = 8
    task_dtype: str = "float32"
    data_dir: str | Path | None = None
    chat_template: bool = False

    @classmethod
    def from_flags(cls, ppl: str, tasks: str | None, **kwargs: Any) -> "EvalSettings":
        """Parse `--ppl a,b|none` and `--tasks x,y` as the CLI spells them."""
        skip_ppl = ppl.strip().lower() == "none"
        datasets = [] if skip_ppl else [d.strip() for d in ppl.split(",") if d.strip()]
        if not datasets and not skip_ppl:
            raise UnibcqError("--ppl needs at least one dataset, or 'none'")
        task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
        if task_list is None and skip_ppl:
            raise UnibcqError("--ppl none leaves nothing to evaluate; add --tasks")
        return cls(datasets, tasks=task_list, **kwargs)

    def check(self, sources: bool = True) -> None:
        """Fail before any model is loaded when a task, its files or its options are wrong, and
        (with `sources`) when a perplexity dataset cannot be read (`check_sources`)."""
        from unibcq.eval.tasks import check_tasks, scoring_dtype

        if self.seq_len < 2:
            raise UnibcqError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise UnibcqError(f"--max-windows must be >= 1, got {self.max_windows}")
        scoring_dtype(self.task_dtype)
        if self.tasks is not None:
            check_tasks(self.tasks, self.limit, self.data_dir, self.mmlu_shots, self.batch_size, self.chat_template)
        elif self.chat_template:
            raise UnibcqError("--chat-template applies to gsm8k; add --tasks gsm8k")
        elif self.limit is not None or self.mmlu_shots != type(self).mmlu_shots:
            raise UnibcqError(f"{'--limit' if self.limit is not None else '--mmlu-shots'} applies to benchmark "
                              "tasks; add --tasks (e.g. --tasks piqa,mmlu), or --max-windows to shorten perplexity")
        if sources:
            self.check_sources()

    def check_sources(self) -> None:
        """Refuse a perplexity dataset that cannot be read (a missing file or data folder, no way
        to fetch it) now, rather than after the model loaded."""
        from unibcq.data.sources import EVAL, check_source

        for dataset in self.datasets:
            check_source(dataset, EVAL, self.data_dir)

    def capped_to(self, context: int | None) -> "EvalSettings":
        """These settings with perplexity windows no longer than the model's `context`: positions
        past it were never trained (lm-eval caps its rolling windows the same way)."""
        if context is None or not self.datasets or self.seq_len <= context:
            return self
        return replace(self, seq_len=context)

    def record(self) -> dict[str, Any]:
        """Every setting as a JSON value: what a report says its figures were measured with
        (a --limit run must not read as a full one)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def journal_key(self) -> dict[str, Any]:
        """The settings every journal piece depends on (see `unibcq.eval.journal`).

        Pieces are named by their own dataset or task, so the lists of datasets and tasks
        are left out: adding a task to a killed run keeps the pieces it finished. Batch size
        is left out too: it changes speed and memory (in bfloat16, the last digits of a
        score), so a run resumed with a smaller batch after running out of memory still
        reuses its pieces. The data folder is resolved, so switching $UNIBCQ_DATA_DIR or
        the working directory changes the key.
        """
        from unibcq.data.sources import resolve_data_dir

        fields = asdict(self)
        for unused in ("batch_size", "datasets", "tasks"):
            del fields[unused]
        if not self.chat_template:  # the key journals had before the option existed
            del fields["chat_template"]
        root = resolve_data_dir(self.data_dir)
        fields["data_dir"] = str(root.resolve()) if root is not None else None
        return fields


def piece_name(dataset: str) -> str:
    """A dataset as the journal names it: local files by absolute path, names as given."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.exists() else dataset


@contextmanager
def placed_on(device: str | torch.device, *models: nn.Module | None) -> Iterator[None]:
    """Run with `models` on `device`, then move each back where it was.

    `compare` evaluates on the GPU but keeps its source model on the CPU between cells,
    where the next cell copies it and quantization moves one block at a time to the device.
    """
    present = [m for m in models if m is not None]
    homes = [next(m.parameters()).device for m in present]
    for model in present:
        model.to(device)
    try:
        yield
    finally:
        for model, home in zip(present, homes):
            model.to(home)


def evaluate_suite(model: nn.Module, tokenizer, settings: EvalSettings, ref_model: nn.Module | None = None,
                   show_progress: bool = True, journal: EvalJournal | None = None) -> dict[str, Any]:
    """Every figure of the protocol as a JSON-ready dict (the keys of `unibcq eval --json`).

    With a `journal`, each finished dataset and task is committed to it and pieces already
    there are reused, so a killed run resumes. "seconds" is the measuring time of all pieces,
    those of earlier runs included; loading the models is not counted.
    """
    from unibcq.data import eval_token_ids
    from unibcq.eval.perplexity import WindowStats, evaluate_windows
    from unibcq.eval.tasks import run_tasks

    seq_len = settings.capped_to(context_window(getattr(model, "config", None))).seq_len  # the length measured
    ref_model = ref_model if settings.datasets else None  # KL is measured on the perplexity windows only
    seconds = 0.0
    results = {}
    for name in settings.datasets:
        key = piece_name(name)
        piece = journal.get("ppl", key) if journal else None
        if piece is None:
            start = time.perf_counter()
            ids = eval_token_ids(tokenizer, name, settings.data_dir)
            stats = evaluate_windows(model, ids, seq_len, settings.max_windows, ref_model,
                                     description=name, show_progress=show_progress)
            piece = {"stats": asdict(stats), "seconds": time.perf_counter() - start}
            if journal:
                journal.put("ppl", key, piece)
        results[name] = WindowStats(**piece["stats"])
        seconds += piece["seconds"]
    tasks = None
    if settings.tasks is not None:
        tasks = run_tasks(model, tokenizer, settings.tasks, settings.limit, settings.data_dir, settings.mmlu_shots,
                          settings.batch_size, show_progress=show_progress, dtype=settings.task_dtype,
                          journal=journal, chat_template=settings.chat_template)
        seconds += sum(r["seconds"] for r in tasks.values() if "seconds" in r)
    first = results[settings.datasets[0]] if settings.datasets else None
    measured = ref_model is not None
    return {
        "ppl": {k: v.ppl for k, v in results.items()},
        "ref_ppl": {k: v.ref_ppl for k, v in results.items()} if measured else None,
        "kl_vs_ref": first.kl if first else None,
        "top1_agreement": first.top1_agreement if first else None,
        "kl_dataset": settings.datasets[0] if measured else None,
        "kl": {k: v.kl for k, v in results.items()} if measured else None,
        "top1": {k: v.top1_agreement for k, v in results.items()} if measured else None,
        "seq_len": seq_len if settings.datasets else None,  # no perplexity, no window length
        "task_dtype": settings.task_dtype if settings.tasks is not None else None,
        "windows": {k: v.windows for k, v in results.items()},
        "tokens": {k: v.tokens for k, v in results.items()},
        "seconds": seconds,
        "tasks": tasks,
    }
