"""SmolLM2-135M on the papers' perplexity protocol: the full WikiText-2 test set at 2048 tokens.

The main table (`benchmarks/smollm2_table.py`) scores the first 40 windows of 512 tokens so
that every row is affordable on a CPU. The papers score every 2048-token window of the test
set instead; this script does that for the unquantized model and each checkpoint OUT/ROW the
main table wrote,

    unibcq eval ROW --ppl wikitext2 --seq-len 2048 [--kl-ref none] --json OUT/ROW.eval-L2048-full[-nokl].json

and prints a markdown table beside the 40 x 512 figures of the same checkpoints (read from
OUT/ROW.eval-L512-N40.json). `--no-kl` skips the KL reference, which halves the cost of a
row. Resumable: an existing JSON is not recomputed. With --write-docs the section between
``<!-- smollm2-full-test:start -->`` and ``<!-- smollm2-full-test:end -->`` of
docs/BENCHMARKS.md is replaced.

Example:
    UNIBCQ_DATA_DIR=/work/shared/datasets .venv/bin/python benchmarks/smollm2_full_test.py \\
        --out /tmp/bench --rows fp,rtn-w3-g128,gptq-w3-g128 --no-kl --write-docs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from smollm2_table import default_unibcq, machine_description, read_json, run, section_head, write_docs
from smollm2_tasks import FP_ROW, bits_per_weight, checked_rows, label, pending_note, row_parser


START_MARKER = "<!-- smollm2-full-test:start -->"
END_MARKER = "<!-- smollm2-full-test:end -->"
SEQ_LEN = 2048
SHORT_PROTOCOL = "eval-L512-N40"


def build_parser() -> argparse.ArgumentParser:
    p = row_parser(__doc__)
    p.add_argument("--no-kl", action="store_true", help="skip the KL reference (half the time per row)")
    return p


def result_path(args: argparse.Namespace, row: str) -> Path:
    suffix = "" if row == FP_ROW or not args.no_kl else "-nokl"
    return args.out / f"{row}.eval-L{SEQ_LEN}-full{suffix}.json"


def evaluate_row(args: argparse.Namespace, exe: str, row: str) -> Path:
    """Run (or reuse) the full-test evaluation of one row; returns its JSON path."""
    path = result_path(args, row)
    if path.is_file() or args.no_run:
        return path
    source = args.model if row == FP_ROW else str(args.out / row)
    flags = ["--ppl", "wikitext2", "--seq-len", str(SEQ_LEN), "--no-progress", "--json", str(path)]
    flags += ["--data-dir", args.data_dir] if args.data_dir else []
    if row == FP_ROW or args.no_kl:
        flags += ["--kl-ref", "none"]
    run([exe, "eval", source, *flags], args.out / "logs" / f"{path.stem}.log")
    return path


def row_figures(args: argparse.Namespace, row: str, full: dict[str, Any]) -> dict[str, Any]:
    short_path = args.out / f"{row}.{SHORT_PROTOCOL}.json"
    short = read_json(short_path) if short_path.is_file() else {}
    return {"bits": bits_per_weight(args, row), "short_ppl": short.get("ppl", {}).get("wikitext2"),
            "short_kl": short.get("kl_vs_ref"), "ppl": full["ppl"]["wikitext2"], "kl": full.get("kl_vs_ref"),
            "windows": full["windows"]["wikitext2"], "tokens": full["tokens"]["wikitext2"],
            "seconds": full["seconds"]}


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| method | config | bits/weight | ppl 40 x 512 | KL 40 x 512 | **ppl full test @ 2048** | "
             "KL full test | eval s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row, f in rows:
        lines.append(f"| {label(row)} | {_cell(f['bits'], '.3f')} | {_cell(f['short_ppl'], '.2f')} | "
                     f"{_cell(f['short_kl'], '.4f')} | **{f['ppl']:.2f}** | {_cell(f['kl'], '.4f')} | "
                     f"{f['seconds']:.0f} |")
    return "\n".join(lines)


def docs_section(args: argparse.Namespace, table: str, first: dict[str, Any], missing: Sequence[str] = ()) -> str:
    return section_head(START_MARKER, "SmolLM2-135M-Instruct: the full WikiText-2 test set at 2048 tokens") + f"""

- **Protocol (the papers', up to the text's joins):** the whole WikiText-2 raw test split
  (its non-empty lines joined by blank lines; GPTQ's join of the Hub rows also keeps the
  empty rows and each row's newline, 1% more tokens: `--ppl wikitext2-gptq`), tokenized as in the main
  table, cut into {first['windows']} non-overlapping windows of {SEQ_LEN} tokens ({first['tokens']:,}
  predicted tokens), float32. The 40 x 512 columns repeat the main table's figures for the
  same checkpoints; longer windows give each token more context, hence lower perplexity.
- **Checkpoints:** those of the main table (same flags, same calibration).
- **Machine:** {machine_description(args.out, not args.no_run)}, no GPU. **eval s** is the
  measuring time (model loading excluded) on a machine shared with other benchmarks (most
  rows ran on one thread beside another run), so it is not a speed figure. The KL columns
  are against the checkpoint's source model; "-" where a row ran without it (`--no-kl`).{pending_note(missing)}

{table}
{END_MARKER}"""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exe = args.unibcq or default_unibcq()
    rows, missing = [], []
    for row in checked_rows(args.out, args.rows, measuring=not args.no_run):
        path = evaluate_row(args, exe, row)
        if path.is_file():
            rows.append((row, row_figures(args, row, read_json(path))))
        else:
            missing.append(row)
    if not rows:
        raise SystemExit("smollm2_full_test: no row has results yet")
    table = markdown_table(rows)
    print(table)
    if args.write_docs:
        write_docs(args.docs, docs_section(args, table, rows[0][1], missing), START_MARKER, END_MARKER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
