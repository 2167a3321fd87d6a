"""Dispatcher for the benchmark tasks behind `unibcq eval --tasks`.

Task names: piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, openbookqa,
lambada (zero-shot, log-likelihood), mmlu (k-shot, log-likelihood) and gsm8k (8-shot
generation). "all" means every zero-shot task whose files are in the data directory plus
mmlu; gsm8k is left out of it because generation is far slower than scoring.

`run_tasks` returns one entry per task,

    {"acc", "acc_norm" (None where the task defines none), "stderr" (of acc), "n", "seconds", ...}

with task-specific extras: acc_norm_stderr (multiple choice), ppl (lambada), acc_macro,
shots and subjects (mmlu: acc is the micro average), acc_strict (gsm8k: acc is the
flexible match). A summary sits under the key "_mean" (leading underscore: not a task):
{"mean_acc": mean over the zero-shot tasks run of acc_norm where defined, else acc,
"tasks": their names}; mean_acc is None when no zero-shot task ran.

Scoring may run in bfloat16 (`dtype`): 1.2-1.8x faster than float32 on a CPU with
AVX512-BF16 in our runs, which helps make task sets affordable there (on a CPU without
AVX-512 its large products run as float32 GEMMs of the bfloat16 values, see
`unibcq.compute_dtype`); perplexity and KL stay in float32.
"""

from __future__ import annotations

import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from unibcq.compute_dtype import compute_dtype, half_linear_in_float32
from unibcq.data.sources import read_jsonl
from unibcq.errors import UnibcqError
from unibcq.eval.journal import EvalJournal
from unibcq.eval.gsm8k import (
    GSM8K_FILE, build_chat_prompt, build_prompt, evaluate_gsm8k, greedy_generator, load_gsm8k,
)
from unibcq.eval.mmlu import check_shots, evaluate_mmlu, read_questions, subjects
from unibcq.eval.zeroshot import (
    LAMBADA_FILE, MULTIPLE_CHOICE, ProgressFn, data_file, data_root, evaluate_lambada, evaluate_multiple_choice,
    load_lambada,
)
from unibcq.nn.qlinear import dense_weights
from unibcq.progress import progress_bar

ZEROSHOT_TASKS = (*MULTIPLE_CHOICE, "lambada")
TASKS = (*ZEROSHOT_TASKS, "mmlu", "gsm8k")
MEAN_KEY = "_mean"


def scoring_dtype(name: str) -> torch.dtype:
    """The torch dtype for a `--task-dtype` name, or an error listing the choices."""
    return compute_dtype(name, "--task-dtype")


@contextmanager
def parameters_as(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Run `model` with its floating-point parameters in `dtype`, then give the originals back.

    The originals are kept, not cast back, so nothing is lost to rounding; buffers (rotary
    frequencies, packed codes) are left alone.
    """
    originals = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    try:
        for param, data in originals:
            param.data = data.to(dtype)
        yield model
    finally:
        for param, data in originals:
            param.data = data


def _required_files(name: str) -> tuple[str, ...]:
    """Files a task reads (MMLU's per-subject files are found by listing its folder)."""
    if name in MULTIPLE_CHOICE:
        return MULTIPLE_CHOICE[name].files
    return {"lambada": (LAMBADA_FILE,), "gsm8k": (GSM8K_FILE,)}.get(name, ())


def _present(root: Path, name: str) -> bool:
    return all((root / f).is_file() for f in _required_files(name))


def resolve_tasks(tasks: Sequence[str], root: Path) -> list[str]:
    """Validated task names in the order given, duplicates dropped and "all" expanded."""
    chosen: list[str] = []
    for name in (t.strip().lower() for t in tasks):
        if name == "all":
            expanded = [t for t in ZEROSHOT_TASKS if _present(root, t)] + ["mmlu"]
        elif name in TASKS:
            expanded = [name]
        else:
            raise UnibcqError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}, all")
        chosen.extend(t for t in expanded if t not in chosen)
    if not chosen:
        raise UnibcqError(f"no tasks given; valid tasks: {', '.join(TASKS)}, all")
    return chosen


def _finished_parts(journal: EvalJournal | None, name: str) -> dict[str, dict[str, Any]]:
    """The parts of task `name` an interrupted run finished, by part name (journal kind "part")."""
    if journal is None:
        return {}
    return {part.removeprefix(f"{name}:"): piece for part, piece in journal.finished("part").items()
            if part.startswith(f"{name}:")}


def _run_one(
    name: str, model: nn.Module, tokenizer, root: Path, limit: int | None, mmlu_shots: int, batch_size: int,
    progress: ProgressFn, journal: EvalJournal | None = None, chat_template: bool = False,
) -> dict[str, Any]:
    # Long tasks resume part by part (zero-shot) or subject by subject (MMLU, 14k questions).
    on_part = (lambda part, piece: journal.put("part", f"{name}:{part}", piece)) if journal else None
    if name in MULTIPLE_CHOICE:
        task = MULTIPLE_CHOICE[name]
        return evaluate_multiple_choice(model, tokenizer, task.load(root, limit), task.normalize, batch_size,
                                        progress=progress, finished=_finished_parts(journal, name), on_part=on_part)
    if name == "lambada":
        return evaluate_lambada(model, tokenizer, load_lambada(root, limit), batch_size, progress=progress,
                                finished=_finished_parts(journal, name), on_part=on_part)
    if name == "mmlu":
        return evaluate_mmlu(model, tokenizer, root, mmlu_shots, limit, batch_size, progress=progress,
                             finished=journal.finished("mmlu") if journal else None,
                             on_subject=(lambda subject, piece: journal.put("mmlu", subject, piece)) if journal else None)
    prompt = (lambda question: build_chat_prompt(tokenizer, question)) if chat_template else build_prompt
    result = evaluate_gsm8k(load_gsm8k(root, limit), greedy_generator(model, tokenizer), batch_size, progress, prompt)
    return {**result, "chat_template": chat_template}


def check_tasks(
    tasks: Sequence[str], limit: int | None, data_dir: str | Path | None, mmlu_shots: int = 5, batch_size: int = 8,
    chat_template: bool = False,
) -> tuple[Path, list[str]]:
    """(data directory, task names) after checking every option and task file.

    The CLI calls this before loading a model or computing perplexity, so a typo or a
    missing file does not surface after an hour of evaluation.
    """
    if limit is not None and limit < 1:
        raise UnibcqError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise UnibcqError(f"--batch-size must be >= 1, got {batch_size}")
    root = data_root(data_dir)
    names = resolve_tasks(tasks, root)
    for name in names:
        for relative in _required_files(name):
            path = data_file(root, relative)
            if path.suffix == ".jsonl" and next(read_jsonl(path), None) is None:
                raise UnibcqError(f"{path} holds no rows to score (truncated or emptied?)")
    if "mmlu" in names:
        check_shots(mmlu_shots)
        for subject in subjects(root):  # found later, these would stop the run after the model loaded
            if not read_questions(data_file(root, f"mmlu/test/{subject}_test.csv"), limit=1):
                raise UnibcqError(f"mmlu/test/{subject}_test.csv holds no questions (truncated or emptied?)")
            if mmlu_shots:
                data_file(root, f"mmlu/dev/{subject}_dev.csv")
    if chat_template and "gsm8k" not in names:
        raise UnibcqError("--chat-template applies to gsm8k only (the scored tasks follow lm-eval's plain "
                          "prompts); add gsm8k to --tasks")
    return root, names


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None,
    data_dir: str | Path | None,
    mmlu_shots: int = 5,
    batch_size: int = 8,
    show_progress: bool = True,
    dtype: str = "float32",
    journal: EvalJournal | None = None,
    chat_template: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run `tasks` (names or "all") on the first `limit` items of each; see the module docstring.

    With a `journal` (an interrupted run's, same settings) its finished tasks are taken as
    they are, and each task (and each MMLU subject and zero-shot part) is committed to it as
    it completes.
    """
    root, names = check_tasks(tasks, limit, data_dir, mmlu_shots, batch_size, chat_template)
    torch_dtype = scoring_dtype(dtype)
    finished = journal.finished("task") if journal else {}
    results = {name: dict(finished[name]) for name in names if name in finished}
    pending = [name for name in names if name not in results]
    if pending:
        with (torch.inference_mode(), dense_weights(model, torch_dtype), parameters_as(model, torch_dtype),
              half_linear_in_float32(model, torch_dtype), progress_bar(show_progress) as bar):
            for name in pending:
                bar_id = bar.add_task(name, total=None)

                def progress(done: int, total: int, bar_id=bar_id) -> None:
                    bar.update(bar_id, completed=done, total=total)

                start = time.perf_counter()
                results[name] = _run_one(name, model, tokenizer, root, limit, mmlu_shots, batch_size, progress,
                                         journal, chat_template)
                # Resumable tasks time themselves, counting the time their reused parts took.
                results[name].setdefault("seconds", time.perf_counter() - start)
                if journal is not None:
                    parts = [("part", f"{name}:{part}") for part in _finished_parts(journal, name)]
                    subjects_done = [("mmlu", s) for s in journal.finished("mmlu")] if name == "mmlu" else []
                    journal.put("task", name, results[name], supersedes=parts + subjects_done)
    results = {name: results[name] for name in names}
    zeroshot = [n for n in names if n in ZEROSHOT_TASKS]
    scores = [results[n]["acc_norm"] if results[n]["acc_norm"] is not None else results[n]["acc"] for n in zeroshot]
    results[MEAN_KEY] = {"mean_acc": sum(scores) / len(scores) if scores else None, "tasks": zeroshot}
    return results


SUMMARY_COLUMNS = ("task", "n", "acc", "acc_norm", "stderr", "seconds", "notes")


def summary_rows(results: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Table rows for `results` (SUMMARY_COLUMNS), with each task's extra figures as notes."""
    rows: list[tuple[Any, ...]] = []
    for name, r in results.items():
        if name == MEAN_KEY:
            continue
        notes = ""
        if name == "lambada":
            notes = f"ppl {r['ppl']:.3f}"
        elif name == "mmlu":
            notes = f"{r['shots']}-shot, macro {r['acc_macro']:.4f}"
        elif name == "gsm8k":
            notes = f"acc = flexible; strict {r['acc_strict']:.4f}"
        rows.append((name, r["n"], r["acc"], "-" if r["acc_norm"] is None else r["acc_norm"],
                     "-" if r["stderr"] is None else r["stderr"], r["seconds"], notes))
    mean = results[MEAN_KEY]
    if mean["mean_acc"] is not None:
        rows.append(("mean (zero-shot)", "-", mean["mean_acc"], "-", "-", "-", "acc_norm where defined, else acc"))
    return rows
