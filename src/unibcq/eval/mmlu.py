"""MMLU (Hendrycks et al.) 0- to 5-shot, scored like lm-evaluation-harness's `mmlu` task.

The prompt for a subject is

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {k exemplars from the dev split, each "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"}
    {test question in the same form, ending with "Answer:"}

and the model's answer is the choice among " A", " B", " C", " D" with the highest
log-likelihood after it (the next-token logits when each letter is one token; the four
share one forward pass). `--limit N` keeps the first N test questions of every subject.
Micro accuracy counts every question equally; macro accuracy averages the subjects.
The standard error is that of the micro mean over all questions pooled; the harness's
group figure pools the per-subject variances instead, which leaves out the spread between
subjects and comes out a few percent smaller.
A prompt longer than the model's window loses its first tokens, as in the harness; the
original Hendrycks script drops exemplars until it fits instead. That only differs for
windows of 2048 tokens: with SmolLM2's tokenizer 377 of the 14,042 5-shot prompts are
longer (the two history subjects and a few law questions), none reaches SmolLM2's 8192.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from unibcq.errors import UnibcqError, not_utf8
from unibcq.eval.zeroshot import (
    ProgressFn, argmax_first, data_file, encode, encode_pairs, loglikelihoods, no_progress,
    stderr_of_mean,
)

LETTERS = ("A", "B", "C", "D")
MAX_SHOTS = 5


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of LETTERS


def format_question(q: Question, with_answer: bool) -> str:
    """One block of the prompt; exemplars carry their answer, the test question stops at 'Answer:'."""
    lines = [q.question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))]
    body = "\n".join(lines) + "\nAnswer:"
    return f"{body} {q.answer}\n\n" if with_answer else body


def few_shot_prefix(subject: str, exemplars: Sequence[Question]) -> str:
    """The part of the prompt shared by every question of a subject: header and exemplars."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(e, True) for e in exemplars)


def build_prompt(subject: str, exemplars: Sequence[Question], question: Question) -> str:
    """The full k-shot prompt for `question` (k = len(exemplars))."""
    return few_shot_prefix(subject, exemplars) + format_question(question, False)


def _common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    first = sequences[0]
    length = len(first)
    for other in sequences[1:]:
        length = next((i for i, (a, b) in enumerate(zip(first[:length], other)) if a != b), min(length, len(other)))
    return list(first[:length])


def read_questions(path: Path, limit: int | None = None) -> list[Question]:
    """The first `limit` rows of an MMLU csv (no header: question, A, B, C, D, answer)."""
    questions = []
    with path.open(encoding="utf-8-sig", newline="") as handle:  # a byte-order mark is not question text
        try:
            for lineno, row in enumerate(csv.reader(handle), 1):
                if limit is not None and len(questions) >= limit:
                    break
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    raise UnibcqError(f"{path} row {lineno}: expected question,A,B,C,D,answer with answer in A-D")
                questions.append(Question(row[0], (row[1], row[2], row[3], row[4]), row[5].strip()))
        except UnicodeDecodeError as exc:
            raise not_utf8(path, exc) from exc
    return questions


def subjects(root: Path) -> list[str]:
    """Subject names from mmlu/test/{subject}_test.csv, sorted."""
    folder = root / "mmlu" / "test"
    names = sorted(p.name[: -len("_test.csv")] for p in folder.glob("*_test.csv"))
    if not names:
        raise UnibcqError(f"no MMLU files {folder}/*_test.csv; point --data-dir / UNIBCQ_DATA_DIR at a folder "
                          "containing mmlu/test and mmlu/dev")
    return names


def check_shots(shots: int) -> None:
    """The dev split holds five exemplars per subject, so 0..5 shots are possible."""
    if not 0 <= shots <= MAX_SHOTS:
        raise UnibcqError(f"--mmlu-shots must be between 0 and {MAX_SHOTS} (the dev split has 5), got {shots}")


def evaluate_mmlu(
    model: nn.Module,
    tokenizer,
    root: Path,
    shots: int = 5,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: ProgressFn = no_progress,
    finished: Mapping[str, dict[str, Any]] | None = None,
    on_subject: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Micro and macro accuracy over every subject, with per-subject accuracy and counts.

    `finished` maps subjects an interrupted run completed to {"hits": per-question 1/0,
    "seconds"}, which are reused; `on_subject(subject, that dict)` is called as each other
    subject completes.
    """
    check_shots(shots)
    per_subject: dict[str, list[int]] = {}
    plans = []  # per subject: (name, dev exemplars, test questions)
    for subject in subjects(root):
        exemplars = read_questions(data_file(root, f"mmlu/dev/{subject}_dev.csv"), shots) if shots else []
        if len(exemplars) < shots:
            raise UnibcqError(f"mmlu/dev/{subject}_dev.csv has {len(exemplars)} exemplars, fewer than {shots} shots")
        questions = read_questions(data_file(root, f"mmlu/test/{subject}_test.csv"), limit)
        if not questions:  # silently skipped, it would shrink the micro and macro averages unnoticed
            raise UnibcqError(f"mmlu/test/{subject}_test.csv holds no questions (truncated or emptied?)")
        plans.append((subject, exemplars, questions))
    total = sum(len(LETTERS) * len(questions) for _, _, questions in plans)
    done = 0
    began, reused_seconds = time.perf_counter(), 0.0
    for subject, exemplars, questions in plans:
        golds = [LETTERS.index(q.answer) for q in questions]
        stored = (finished or {}).get(subject)
        if stored is not None and len(stored["hits"]) == len(golds):
            per_subject[subject] = list(stored["hits"])
            reused_seconds += stored["seconds"]
        else:
            start = time.perf_counter()
            # Tokenized only when scored: a resumed run skips the finished subjects' prompts.
            requests = encode_pairs(tokenizer, [(build_prompt(subject, exemplars, q), f" {letter}")
                                                for q in questions for letter in LETTERS])
            # Tokens can merge across the prefix's end ("\n\n" + next word), so share only the
            # token prefix that the encoded few-shot text and every question really have in common.
            prefix = _common_prefix([encode(tokenizer, few_shot_prefix(subject, exemplars))]
                                    + [c for c, _ in requests])
            scores = loglikelihoods(model, requests, batch_size, max_length,
                                    lambda d, _, done=done: progress(done + d, total), prefix)
            per_subject[subject] = [int(argmax_first([ll for ll, _ in scores[4 * i: 4 * i + 4]]) == gold)
                                    for i, gold in enumerate(golds)]
            if on_subject is not None:
                on_subject(subject, {"hits": per_subject[subject], "seconds": time.perf_counter() - start})
        done += len(LETTERS) * len(questions)
        progress(done, total)
    n = sum(len(hits) for hits in per_subject.values())
    if n == 0:
        raise UnibcqError(f"the MMLU test files under {root / 'mmlu' / 'test'} hold no questions")
    acc = sum(sum(h) for h in per_subject.values()) / n
    subject_acc = {s: sum(h) / len(h) for s, h in per_subject.items()}
    return {
        "acc": acc, "acc_norm": None, "stderr": stderr_of_mean(acc, n), "n": n,
        "acc_macro": sum(subject_acc.values()) / len(subject_acc), "shots": shots,
        "subjects": {s: {"acc": subject_acc[s], "n": len(h)} for s, h in per_subject.items()},
        "seconds": time.perf_counter() - began + reused_seconds,
    }
