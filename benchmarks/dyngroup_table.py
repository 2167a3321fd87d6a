"""Dynamic grouping on SmolLM2-135M beside RTN / bcq-alternating at matching honest bits.

dyngroup stores a fixed-length group index per weight, so G = 4, 8, 32 groups cost about
3, 4 and 6 honest bits per weight; the baselines run per-channel at 3, 4 and 6 bits, which
cost the same to within a few hundredths of a bit. Each row is quantized, inspected and
evaluated with the unibcq CLI exactly as `smollm2_table.py` does (same protocol, resumable:
existing checkpoints and eval JSONs are reused). With --write-docs the section between
`<!-- dyngroup-table:start -->` and `<!-- dyngroup-table:end -->` of docs/BENCHMARKS.md is
replaced.

Example:
    UNIBCQ_DATA_DIR=/work/shared/datasets .venv/bin/python benchmarks/dyngroup_table.py \\
        --out /tmp/bench2 --write-docs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_table import (  # noqa: E402
    REPO, command_line, default_unibcq, eval_flags, fp_row, is_complete_checkpoint, machine_description, read_json,
    run, write_docs,
)

RUNS: list[tuple[str, list[str]]] = [
    ("dyngroup-G4", ["--method", "dyngroup", "--max-groups", "4"]),
    ("dyngroup-G8", ["--method", "dyngroup", "--max-groups", "8"]),
    ("dyngroup-G32", ["--method", "dyngroup", "--max-groups", "32"]),
    ("rtn-w3-g-1", ["--method", "rtn", "--bits", "3", "--group-size", "-1"]),
    ("bcq-alternating-w3-g-1", ["--method", "bcq-alternating", "--bits", "3", "--group-size", "-1"]),
    ("rtn-w4-g-1", ["--method", "rtn", "--bits", "4", "--group-size", "-1"]),
    ("bcq-alternating-w4-g-1", ["--method", "bcq-alternating", "--bits", "4", "--group-size", "-1"]),
    ("rtn-w6-g-1", ["--method", "rtn", "--bits", "6", "--group-size", "-1"]),
    ("bcq-alternating-w6-g-1", ["--method", "bcq-alternating", "--bits", "6", "--group-size", "-1"]),
    ("dyngroup-G32-refine", ["--method", "dyngroup", "--max-groups", "32", "--refine-sweeps", "20"]),
]


def row(args: argparse.Namespace, exe: str, name: str, flags: list[str]) -> dict | None:
    """Quantize / inspect / evaluate one run (reusing what exists); None when --no-run and it is missing."""
    ckpt = args.out / name
    if args.no_run and not all((args.out / f"{name}.{kind}.json").is_file() for kind in ("eval", "info", "quantize")):
        return None
    if not args.no_run and not is_complete_checkpoint(ckpt):
        run([exe, "quantize", args.model, *flags, "--out", str(ckpt), "--json", str(args.out / f"{name}.quantize.json"),
             "--no-progress"], args.out / "logs" / f"{name}.quantize.log")
    info_json, eval_json = args.out / f"{name}.info.json", args.out / f"{name}.eval.json"
    if not (args.no_run and info_json.is_file()):
        run([exe, "info", str(ckpt), "--json", str(info_json)], args.out / "logs" / f"{name}.info.log")
    if eval_json.is_file() and not same_windows(args, read_json(eval_json)):
        if args.no_run:
            print(f"{name}: {eval_json} was measured on other windows than --seq-len {args.seq_len} "
                  f"--max-windows {args.max_windows}; left out", file=sys.stderr)
            return None
        eval_json.unlink()
    if not eval_json.is_file():
        run([exe, "eval", str(ckpt), *eval_flags(args), "--json", str(eval_json)], args.out / "logs" / f"{name}.eval.log")
    info, ev, quant = read_json(info_json), read_json(eval_json), read_json(args.out / f"{name}.quantize.json")
    return {"name": name, "flags": " ".join(flags), **{k: info[k] for k in info if k.startswith("bits_per_weight")},
            "ppl": ev["ppl"]["wikitext2"], "kl": ev["kl_vs_ref"], "top1": ev["top1_agreement"],
            "seconds": quant["seconds"]}


def same_windows(args: argparse.Namespace, ev: dict) -> bool:
    """Whether an evaluation JSON measured the windows this run asks for (its name does not say)."""
    return ev.get("seq_len") == args.seq_len and ev.get("windows", {}).get("wikitext2") == args.max_windows


def markdown(rows: list[dict], fp_ppl: float) -> str:
    lines = ["| run | flags | bits paper | bits fixed | bits entropy | bits stored | ppl | KL vs FP | top-1 | quant s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| unquantized | - | 32 | 32 | 32 | 32 | {fp_ppl:.2f} | - | - | - |"]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['flags']}` | {r.get('bits_per_weight_paper', r['bits_per_weight']):.3f} | "
            f"{r.get('bits_per_weight_fixed', r['bits_per_weight']):.3f} | "
            f"{r.get('bits_per_weight_entropy', r['bits_per_weight']):.3f} | {r['bits_per_weight']:.3f} | "
            f"{r['ppl']:.2f} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--data-dir")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--no-run", action="store_true", help="only tabulate the runs that are already evaluated")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    exe = default_unibcq()
    args.out.mkdir(parents=True, exist_ok=True)
    fp = fp_row(args, exe)
    rows = [r for name, flags in RUNS if (r := row(args, exe, name, flags)) is not None]
    table = markdown(rows, fp.ppl)
    print(table)
    if args.write_docs:
        section = f"""<!-- dyngroup-table:start -->
## Dynamic grouping (Zheng et al. 2025) at honest bits, SmolLM2-135M-Instruct

```sh
{command_line()}
```

Machine: {machine_description(args.out, not args.no_run)}, no GPU, shared with other work while it ran (times are noisy).
Protocol as in the main SmolLM2 table below (WikiText-2 test, first {args.max_windows} windows of {args.seq_len} tokens,
KL and top-1 against the unquantized model). dyngroup: windowed greedy merge, window 256,
lambda 0.75 (normalised), one set of groups per matrix, as in the paper; `--refine-sweeps 20`
is our boundary refinement. **bits paper** is the paper's count 1 + 16G/N, which leaves out the
per-weight group index; **bits fixed** adds a ceil(log2 G)-bit index, **bits entropy** an
entropy-coded one; **bits stored** is what the checkpoint really holds per quantized weight
(the fixed-length index). Baselines are per-channel (one group per output row) at the bit width
that matches dyngroup's honest (fixed) count.

{table}
<!-- dyngroup-table:end -->"""
        write_docs(args.docs, section, "<!-- dyngroup-table:start -->", "<!-- dyngroup-table:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
