"""How much a task's scores depend on how its questions are batched, per scoring dtype.

Each task is scored twice on the same model: as one part (every question in one scoring
run) and in parts of --part-items questions, which is how `unibcq eval` journals long tasks.
The two differ only in which requests share a forward pass (padding width, stems run
together), so any difference is the arithmetic's, not the method's: it bounds how far a
task figure can move when nothing but batching changes (another batch size, another
device's pass budget, a resumed run of an older version). The table gives, per dtype, how
many choice log-likelihoods came out bit-identical, the largest difference, and both
accuracies.

Example (SmolLM2, the first 600 ARC-Easy questions, parts of 200, one thread):
    UNIBCQ_DATA_DIR=/work/shared/datasets OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/task_batching_noise.py --task arc_easy --limit 600 --part-items 200
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from unibcq.eval import zeroshot
from unibcq.eval.tasks import parameters_as, scoring_dtype
from unibcq.models import load_model, load_tokenizer
from unibcq.progress import print_table


def score(model: torch.nn.Module, tokenizer, docs: list, part_items: int, batch_size: int,
          normalize: bool) -> tuple[list[float], dict[str, Any]]:
    """(every choice's log-likelihood in order, the task result) scored in parts of `part_items`."""
    parts: dict[str, dict[str, Any]] = {}
    previous = zeroshot.TASK_PART_ITEMS
    zeroshot.TASK_PART_ITEMS = part_items
    try:
        result = zeroshot.evaluate_multiple_choice(model, tokenizer, docs, normalize, batch_size,
                                                   on_part=parts.__setitem__)
    finally:
        zeroshot.TASK_PART_ITEMS = previous
    return [ll for piece in parts.values() for lls in piece["outcomes"] for ll in lls], result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arc_easy", choices=sorted(zeroshot.MULTIPLE_CHOICE))
    parser.add_argument("--limit", type=int, default=600, help="first N questions of the task")
    parser.add_argument("--part-items", type=int, default=200, help="questions per part in the split run")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", help="datasets folder (default: $UNIBCQ_DATA_DIR)")
    args = parser.parse_args(argv)

    task = zeroshot.MULTIPLE_CHOICE[args.task]
    docs = task.load(zeroshot.data_root(args.data_dir), args.limit)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    rows = []
    for name in args.dtypes.split(","):
        with torch.inference_mode(), parameters_as(model, scoring_dtype(name)):
            whole_lls, whole = score(model, tokenizer, docs, len(docs), args.batch_size, task.normalize)
            split_lls, split = score(model, tokenizer, docs, args.part_items, args.batch_size, task.normalize)
        gaps = [abs(a - b) for a, b in zip(whole_lls, split_lls)]
        norm = (lambda r: "-" if r["acc_norm"] is None else f"{100 * r['acc_norm']:.2f}")
        rows.append((name, f"{sum(g == 0 for g in gaps)} / {len(gaps)}", f"{max(gaps):.2e}",
                     f"{100 * whole['acc']:.2f}", f"{100 * split['acc']:.2f}", norm(whole), norm(split),
                     f"{whole['seconds']:.0f}", f"{split['seconds']:.0f}"))
    threads = torch.get_num_threads()
    print_table(f"{args.task}, first {len(docs)} questions: one part vs parts of {args.part_items} "
                f"(batch size {args.batch_size}, {threads} thread{'' if threads == 1 else 's'})",
                ["dtype", "identical log-liks", "max |diff|", "acc one part", "acc parts", "acc_norm one part",
                 "acc_norm parts", "s one part", "s parts"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
