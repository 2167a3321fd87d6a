"""SmolLM2-135M task table: zero-shot accuracy and MMLU of every row of the perplexity table.

For the unquantized model and each checkpoint OUT/ROW that `benchmarks/smollm2_table.py`
wrote (ROW such as `gptq-w3-g128`), this runs

    unibcq eval ROW --ppl none --tasks piqa,arc_easy,... --limit N --task-dtype D --json OUT/ROW.tasks-LN.json
    unibcq eval ROW --ppl none --tasks mmlu --mmlu-shots K --limit M --task-dtype D --json OUT/ROW.mmlu{K}-L{M}.json

and prints a markdown table: accuracy per task (acc_norm where the task defines it, else
acc), the zero-shot mean with its standard error, MMLU micro accuracy, and honest bits per
weight from OUT/ROW.info.json. `--limit 0` scores the full sets. Resumable: an existing JSON
is not recomputed (one scored in another --task-dtype is an error: delete it to redo), and
`unibcq eval` resumes a row killed half-way from its finished tasks. With --write-docs the
section between ``<!-- smollm2-tasks:start -->`` and ``<!-- smollm2-tasks:end -->`` of
docs/BENCHMARKS.md is replaced (``smollm2-tasks-full`` markers for --limit 0 --mmlu-limit 0).

Example:
    UNIBCQ_DATA_DIR=/work/shared/datasets .venv/bin/python benchmarks/smollm2_tasks.py \\
        --out /tmp/bench --rows fp,rtn-w3-g128,gptq-w3-g128 --write-docs
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from smollm2_table import REPO, default_unibcq, machine_description, read_json, run, section_head, write_docs


SECTION = "smollm2-tasks"
ZERO_SHOT = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada")
SHORT = {"arc_easy": "arc-e", "arc_challenge": "arc-c", "hellaswag": "hellaswag", "winogrande": "wino",
         "openbookqa": "obqa"}
FP_ROW = "fp"
UNQUANTIZED_BITS = 32.0  # the GGUF is dequantized to float32 parameters


def row_parser(doc: str) -> argparse.ArgumentParser:
    """The options every per-row SmolLM2 script shares (rows, model, CLI, docs); `doc` is its docstring."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the folder smollm2_table.py wrote (checkpoints, JSONs)")
    p.add_argument("--rows", required=True,
                   help=f"comma-separated checkpoint names under --out, and '{FP_ROW}' for the unquantized model")
    p.add_argument("--model", default="smollm2-135m", help="the unquantized model (the fp row)")
    add_run_options(p)
    return p


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Data folder, CLI, tabulate-only and docs options, the same in every per-row script."""
    p.add_argument("--data-dir", help="passed to unibcq (default: $UNIBCQ_DATA_DIR)")
    p.add_argument("--unibcq", default=None, help="path of the unibcq CLI (default: the repo's .venv)")
    p.add_argument("--no-run", action="store_true", help="only tabulate rows whose JSONs already exist")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")


def build_parser() -> argparse.ArgumentParser:
    p = row_parser(__doc__)
    p.add_argument("--limit", type=int, default=100, help="first N items of each zero-shot task; 0 = full sets")
    p.add_argument("--mmlu-limit", type=int, default=3, help="first N test questions per MMLU subject; 0 = all")
    p.add_argument("--mmlu-shots", type=int, default=5)
    p.add_argument("--task-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", type=int, default=64)
    return p


def markers(args: argparse.Namespace) -> tuple[str, str]:
    """Full-set results get their own section, so the quick table and the full one coexist."""
    name = SECTION + ("-full" if not args.limit and not args.mmlu_limit else "")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _limit_tag(limit: int) -> str:
    return f"L{limit}" if limit else "full"


def evaluate_row(args: argparse.Namespace, exe: str, row: str) -> tuple[Path, Path]:
    """Run (or reuse) the zero-shot and MMLU evaluations of one row; returns their JSON paths."""
    source = args.model if row == FP_ROW else str(args.out / row)
    common = ["--ppl", "none", "--task-dtype", args.task_dtype, "--batch-size", str(args.batch_size)]
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    zero_shot = args.out / f"{row}.tasks-{_limit_tag(args.limit)}.json"
    mmlu = args.out / f"{row}.mmlu{args.mmlu_shots}-{_limit_tag(args.mmlu_limit)}.json"
    jobs = [(zero_shot, ["--tasks", ",".join(ZERO_SHOT)] + (["--limit", str(args.limit)] if args.limit else [])),
            (mmlu, ["--tasks", "mmlu", "--mmlu-shots", str(args.mmlu_shots)]
             + (["--limit", str(args.mmlu_limit)] if args.mmlu_limit else []))]
    for path, flags in jobs:
        if not path.is_file() and not args.no_run:
            run([exe, "eval", source, *common, *flags, "--json", str(path)], args.out / "logs" / f"{path.stem}.log")
    return zero_shot, mmlu


def bits_per_weight(args: argparse.Namespace, row: str) -> float | None:
    if row == FP_ROW:
        return UNQUANTIZED_BITS
    info = args.out / f"{row}.info.json"
    return read_json(info).get("bits_per_weight") if info.is_file() else None


def row_figures(zero_shot: dict[str, Any], mmlu: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
    """Per-task score, the zero-shot mean and its standard error, MMLU, seconds."""
    for result in (zero_shot, mmlu):
        if result is not None and result.get("task_dtype") != dtype:
            raise SystemExit(f"smollm2_tasks: a result was scored in {result.get('task_dtype')}, not {dtype}; "
                             "delete its JSON to redo it")
    tasks = zero_shot["tasks"]
    scores, errors = {}, []
    for name in ZERO_SHOT:
        entry = tasks[name]
        normed = entry.get("acc_norm") is not None
        scores[name] = entry["acc_norm"] if normed else entry["acc"]
        errors.append(entry.get("acc_norm_stderr") if normed else entry["stderr"])
    mean = sum(scores.values()) / len(scores)
    # Tasks are independent samples, so the mean's variance is the mean of their variances / k.
    mean_stderr = None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(errors)
    seconds = sum(e["seconds"] for k, e in tasks.items() if not k.startswith("_"))
    figures = {"scores": scores, "stderrs": [e for e in errors if e is not None], "mean": mean,
               "mean_stderr": mean_stderr, "n": tasks[ZERO_SHOT[0]]["n"],
               "seconds": seconds, "mmlu": None, "mmlu_stderr": None, "mmlu_n": None}
    if mmlu is not None:
        entry = mmlu["tasks"]["mmlu"]
        figures.update(mmlu=entry["acc"], mmlu_stderr=entry["stderr"], mmlu_n=entry["n"],
                       seconds=seconds + entry["seconds"])
    return figures


def label(row: str) -> str:
    """Method and config cells: 'uniquanf+e4-w3-g128' -> 'uniquanf (+e4) | w3 g128'."""
    if row == FP_ROW:
        return "unquantized | -"
    head, _, rest = row.partition("-w")
    method, _, variant = head.partition("+")
    bits, _, group = rest.partition("-g")
    config = f"w{bits} " + ("per-channel" if group == "-1" else f"g{group}")
    return f"{method}{f' (+{variant})' if variant else ''} | {config}"


def plus_minus(value: float, stderr: float | None) -> str:
    """A percentage with its standard error, or alone when that is unknown (a task of one item)."""
    return f"{100 * value:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def markdown_table(rows: Sequence[tuple[str, float | None, dict[str, Any]]], shots: int) -> str:
    header = ["method", "config", "bits/weight", *(SHORT.get(t, t) for t in ZERO_SHOT), "zero-shot mean",
              f"MMLU {shots}-shot", "eval s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, bits, f in rows:
        cells = [label(row), "-" if bits is None else f"{bits:.3f}",
                 *(f"{100 * f['scores'][t]:.1f}" for t in ZERO_SHOT),
                 f"**{plus_minus(f['mean'], f['mean_stderr'])}**",
                 "-" if f["mmlu"] is None else plus_minus(f["mmlu"], f["mmlu_stderr"]),
                 f"{f['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def docs_section(args: argparse.Namespace, table: str, first: dict[str, Any], minutes: float,
                 missing: Sequence[str] = ()) -> str:
    items = "the full sets" if not args.limit else f"the first {first['n']} items of each task"
    questions = ("every test question" if not args.mmlu_limit
                 else f"the first {args.mmlu_limit} test questions of each subject ({first['mmlu_n']} in all)")
    caveat = "" if not args.limit or first["mean_stderr"] is None else f"""
- **Not full sets:** with {items} a task's standard error is
  {100 * max(first['stderrs']):.0f} points or less and the mean's about {100 * first['mean_stderr']:.1f}
  (first row), so only differences of several points in the mean are meaningful. A full-set row
  costs hours on this machine (HellaSwag alone took 76 min on one core); see the full-set
  section below."""
    start_marker, end_marker = markers(args)
    title = "full sets" if not args.limit and not args.mmlu_limit else "quick subsets"
    return section_head(start_marker, f"SmolLM2-135M-Instruct: zero-shot tasks and MMLU per method ({title})") + f"""

- **Machine:** {machine_description(args.out, not args.no_run)}, no GPU; scoring all rows took {minutes:.0f} min
  (times are noisy: the machine was shared with other work).
- **Checkpoints:** the ones of the perplexity table above (same flags, same calibration); the
  unquantized row is SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF to float32.
- **Protocol:** lm-evaluation-harness conventions (see `unibcq eval --help`): {items}
  (PIQA val, ARC-Easy/Challenge test, HellaSwag val, WinoGrande dev with partial scoring,
  BoolQ val, OpenBookQA test, LAMBADA OpenAI last-word accuracy); the score is acc_norm where
  the task defines it, else acc, in percent. MMLU is {args.mmlu_shots}-shot (dev exemplars), {questions},
  micro accuracy. Scored in {args.task_dtype} (`--task-dtype`); ± is one standard error; **eval s**
  is the scoring time of the row (model loading excluded).{caveat}{pending_note(missing)}

{table}
{end_marker}"""


def pending_note(missing: Sequence[str]) -> str:
    """A docs bullet naming the requested rows that have no results yet (empty when none)."""
    return f"\n- **Not measured yet:** {', '.join(missing)}." if missing else ""


def checked_rows(out: Path, rows: str, measuring: bool = True) -> list[str]:
    """The --rows names. When `measuring`, each must be the unquantized row or a checkpoint
    smollm2_table.py wrote under `out`; --no-run tabulates JSONs, whose (git-ignored)
    checkpoints a fresh clone lacks."""
    names = [r.strip() for r in rows.split(",") if r.strip()]
    for row in names if measuring else ():
        if row != FP_ROW and not (out / row).is_dir():
            raise SystemExit(f"{Path(sys.argv[0]).name}: no checkpoint {out / row}; run smollm2_table.py first")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exe = args.unibcq or default_unibcq()
    rows, missing = [], []
    for row in checked_rows(args.out, args.rows, measuring=not args.no_run):
        zero_shot, mmlu = evaluate_row(args, exe, row)
        if not zero_shot.is_file():
            missing.append(row)
            continue
        if not mmlu.is_file():
            missing.append(f"{row} (MMLU)")
        rows.append((row, bits_per_weight(args, row),
                     row_figures(read_json(zero_shot), read_json(mmlu) if mmlu.is_file() else None,
                                 args.task_dtype)))
    if not rows:
        raise SystemExit("smollm2_tasks: no row has results yet")
    table = markdown_table(rows, args.mmlu_shots)
    print(table)
    if args.write_docs:
        section = docs_section(args, table, rows[0][2], sum(f["seconds"] for _, _, f in rows) / 60, missing)
        write_docs(args.docs, section, *markers(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
