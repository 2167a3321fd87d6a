"""SmolLM2-135M, every method on the whole protocol: quantize, then every figure, rows in parallel.

The other SmolLM2 scripts each measure one part (the 40 x 512 table, the full test set,
the tasks) over checkpoints made earlier. This one takes a row from nothing to every
figure, so a machine lent for a short time (a GPU) produces a complete, self-consistent
table in one go. For the unquantized model and each METHOD x BITS:GROUP row it runs

    unibcq quantize MODEL --method M --bits B --group-size G --device D --out OUT/ROW
    unibcq info OUT/ROW
    unibcq eval OUT/ROW --ppl wikitext2 --seq-len 512 --max-windows 40 --device D        (+ KL)
    unibcq eval OUT/ROW --ppl wikitext2 --seq-len 2048 --device D                        (+ KL)
    unibcq eval OUT/ROW --ppl none --tasks piqa,...,lambada --task-dtype bfloat16 --device D
    unibcq eval OUT/ROW --ppl none --tasks mmlu --mmlu-shots 5 --task-dtype bfloat16 --device D

with --jobs rows at a time (each command limited to --threads CPU threads), and writes the
JSONs under the names the other scripts read (ROW.eval-L512-N40.json, ROW.eval-L2048-full.json,
ROW.tasks-full.json, ROW.mmlu5-full.json). A row whose command fails is reported and the
others go on. Resumable: finished checkpoints and JSONs are reused, and a killed eval resumes
from its journal. --time-budget stops the run in time on a lent machine: a row that starts
afresh starts only if the budget has its expected duration left (`expected_seconds`), no
step starts after the budget and a running one is killed at it. A row left unfinished keeps
its figures; the next run on the same kind of machine (same CPU or GPU model, vector unit,
core count, torch and transformers) continues it. Its checkpoint need not be there: ROW.checkpoint.json
records the identity (sha256) of the checkpoint the figures were measured on, and a row
quantized again keeps them only if the new checkpoint is bit for bit the same (deterministic
methods on the same machine, e.g. RTN or BCQ on one CPU thread); otherwise every figure is
measured again.

Rows accumulate across machines and sessions: OUT/machine.json fixes the protocol (model,
task dtype, set limits) for the folder, and OUT/ROW.machine.json records where each row ran.
Every figure of a row comes from one machine: a row that a different machine (GPU, CPU,
torch, transformers, device) would continue starts over, after the rows never tried. The
JSONs are small and the repository keeps them (benchmarks/results/smollm2-full-protocol/,
the default --out; checkpoints and logs there are ignored by git), so a later session
computes only the rows still missing.
With --write-docs the section between ``<!-- smollm2-full-protocol:start -->`` and
``<!-- smollm2-full-protocol:end -->`` of docs/BENCHMARKS.md is replaced.

Example (a GPU machine; on a lent GPU machine, benchmarks/device/README.md stages the model
and data and runs this):
    UNIBCQ_DATA_DIR=/work/shared/datasets .venv/bin/python benchmarks/smollm2_full_protocol.py \\
        --device cuda --jobs 6 --threads 2 --write-docs

On a 2-core CPU a row takes five to six hours on one thread (the full test set with KL about
58 min, the zero-shot sets and MMLU about 2 h each), so it spans sessions: give each run a --time-budget
and the rows to work on, e.g. `--rows rtn-w3-g128,bcq-alternating-w3-g128 --jobs 2 --threads 1
--time-budget 9000`. The evals' journals (ROW.*.json.partial) stay in the folder, and git keeps
them with the JSONs (a journal is tied to its checkpoint's identity and to the paths of the
folder and the data), so the next run of the same rows on the same kind of machine, even from
a fresh clone at the same path, continues where the budget stopped it, losing at most the zero-shot part or MMLU subject in progress; rows this machine
began go before new ones, so --rows may name the next rows too. Keep transformers at the
version the rows record (e.g. `pip install transformers==5.24.0` for the CPU rows), or they
start over.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from smollm2_table import (
    REPO, OutOfTime, command_line, default_unibcq, is_complete_checkpoint, parse_configs, parse_methods, read_json,
    run, section_head, write_docs,
)
from smollm2_tasks import (
    FP_ROW, UNQUANTIZED_BITS, ZERO_SHOT, add_run_options, label, pending_note, plus_minus, row_figures,
)
from smollm2_tasks import markdown_table as task_table

from unibcq.atomic import write_json_atomic
from unibcq.methods.registry import CALIBRATED
from unibcq.models.fingerprint import files_fingerprint
from unibcq.report.render import cpu_model

START_MARKER = "<!-- smollm2-full-protocol:start -->"
END_MARKER = "<!-- smollm2-full-protocol:end -->"
SHORT = ("512", "40")  # the main table's windows: seq_len, count
MMLU_SHOTS = 5
PART_NAMES = {"short": "40 x 512", "full": "full test", "tasks": "zero-shot", "mmlu": "MMLU"}
RESULTS = REPO / "benchmarks" / "results" / "smollm2-full-protocol"
# Seconds a row started afresh needs, by device. On a GPU, with 8 rows sharing an H100: its
# quantization (the 2026-11-26 run's slowest for uniquanf, flexround and gptq; no more than
# gptq's for the others) plus its evaluations (243 s there without MMLU, plus about 60 s of
# MMLU). On a CPU, with 2 rows on 2 cores at one thread each: the main table's quantization
# seconds (uniquanf 812, flexround 614, gptq 197) and rtn-w2-g128's evaluations on
# 2026-12-06/07 (185 + 4657 + 9463 + 6877 s: about 6 hours).
EXPECTED_QUANTIZE_SECONDS = {
    "cuda": {"uniquanf": 220, "flexround": 100, "gptq": 140, "gptq-bcq": 140, "bcq-alternating": 140, "rtn": 140},
    "cpu": {"uniquanf": 820, "flexround": 620, "gptq": 210, "gptq-bcq": 210, "bcq-alternating": 210, "rtn": 210},
}
EXPECTED_EVAL_SECONDS = {"cuda": 300, "cpu": 21200}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder for checkpoints, JSONs and logs, reused on rerun (default: the repository's "
                        "results folder, whose JSONs git keeps)")
    p.add_argument("--model", default="smollm2-135m", help="the unquantized model (alias, folder or hub id)")
    p.add_argument("--methods", type=parse_methods,
                   default=parse_methods("uniquanf,flexround,gptq,bcq-alternating,rtn,gptq-bcq"),
                   help="comma-separated methods, slowest first (default: the six of the main table)")
    p.add_argument("--configs", type=parse_configs, default=parse_configs("4:-1,3:128,2:128"),
                   help="comma-separated BITS:GROUP_SIZE; -1 = per output channel (default: 4:-1,3:128,2:128)")
    p.add_argument("--rows", help="comma-separated rows to run now (e.g. rtn-w3-g128,fp; default: every row); "
                                  "the table still lists every row of --methods x --configs")
    p.add_argument("--device", default="cpu", help="where quantization and evaluation run: cpu or cuda")
    p.add_argument("--jobs", type=int, default=1, help="rows processed at a time")
    p.add_argument("--threads", type=int, help="CPU threads per command (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--limit", type=int, default=0, help="first N items of each zero-shot task; 0 = full sets")
    p.add_argument("--mmlu-limit", type=int, default=0, help="first N questions per MMLU subject; 0 = all")
    p.add_argument("--task-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", type=int,
                   help="scored sequences per forward pass (default: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds: start no step after this and kill the running ones at it (0 = no limit)")
    add_run_options(p)
    return p


def row_names(args: argparse.Namespace) -> list[str]:
    """The unquantized row, then method by method in --methods order (the jobs start in this order)."""
    return [FP_ROW, *(f"{m}-w{b}-g{g}" for m in args.methods for b, g in args.configs)]


def rows_to_run(args: argparse.Namespace) -> list[str]:
    """The rows this run processes: --rows, checked against the table's rows, else all of them."""
    rows = row_names(args)
    if args.rows is None:
        return rows
    chosen = list(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))  # one job per row
    unknown = [r for r in chosen if r not in rows]
    if unknown or not chosen:
        raise SystemExit(f"smollm2_full_protocol: --rows {', '.join(unknown) or '(none)'} not among the rows of "
                         f"--methods x --configs: {', '.join(rows)}")
    return chosen


def batch_size(args: argparse.Namespace) -> int:
    """--batch-size, else by device. A GPU pass holds up to 16384 tokens, but 64 rows of
    HellaSwag's ~20-token endings fill 1280 of them, so a GPU row makes ~10x the passes it
    needs; 256 rows keep SmolLM2's read logits under 1 GB (not yet timed on a GPU)."""
    return args.batch_size or (64 if args.device == "cpu" else 256)


def _tag(limit: int) -> str:
    return f"L{limit}" if limit else "full"


def result_paths(args: argparse.Namespace, row: str) -> dict[str, Path]:
    """Every JSON of a row, under the names the per-part scripts read."""
    return {
        "short": args.out / f"{row}.eval-L{SHORT[0]}-N{SHORT[1]}.json",
        "full": args.out / f"{row}.eval-L2048-full.json",
        "tasks": args.out / f"{row}.tasks-{_tag(args.limit)}.json",
        "mmlu": args.out / f"{row}.mmlu{MMLU_SHOTS}-{_tag(args.mmlu_limit)}.json",
    }


def checkpoint_record(args: argparse.Namespace, row: str) -> Path:
    """OUT/ROW.checkpoint.json: the identity of the checkpoint the row's figures were measured on."""
    return args.out / f"{row}.checkpoint.json"


def recorded_identity(args: argparse.Namespace, row: str) -> Any:
    """The identity in ROW.checkpoint.json (see `files_fingerprint`), or None when not recorded."""
    path = checkpoint_record(args, row)
    return read_json(path).get("files") if path.is_file() else None


def record_identity(args: argparse.Namespace, row: str) -> None:
    """Note which checkpoint the row's figures come from, so that a later session, whose clone
    lacks the (git-ignored) checkpoint, can quantize it again and keep the figures if it is the same."""
    identity = files_fingerprint(args.out / row)
    if identity is not None:
        write_json_atomic(checkpoint_record(args, row), {"files": identity})


def row_plan(args: argparse.Namespace, exe: str, row: str,
             machine: dict[str, Any]) -> tuple[bool, list[tuple[str, list[str]]]]:
    """(whether the row starts over, (step name, command) for each step still to do, in order).

    No steps for a row with every figure (its checkpoint may be gone); every step, after
    discarding the row's figures, for a row quantized anew, one that another machine began
    and one with no record of its machine. A row this machine began whose checkpoint is gone
    but recorded (ROW.checkpoint.json) does not start over: it is quantized again, and
    `process_row` keeps its figures only if the new checkpoint is the same.
    """
    paths = result_paths(args, row)
    info_path = args.out / f"{row}.info.json"
    if all(p.is_file() for p in paths.values()) and (row == FP_ROW or info_path.is_file()):
        return False, []
    recorded = row_machine(args, row)
    began_elsewhere = recorded is None or not same_machine(recorded, machine)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    device = ["--device", args.device]
    source = args.model if row == FP_ROW else str(args.out / row)
    steps: list[tuple[str, list[str]]] = []
    fresh = began_elsewhere
    if row != FP_ROW:
        method, _, rest = row.partition("-w")
        bits, _, group = rest.partition("-g")
        checkpoint = args.out / row
        if began_elsewhere or not is_complete_checkpoint(checkpoint):
            steps.append(("quantize", [exe, "quantize", args.model, "--method", method, "--bits", bits, "--group-size",
                                       group, "--out", str(checkpoint), "--json",
                                       str(args.out / f"{row}.quantize.json"), "--no-progress", "--overwrite",
                                       *(["--resume"] if method in CALIBRATED else []), *device, *data]))
            fresh = fresh or recorded_identity(args, row) is None
        steps.append(("info", [exe, "info", str(checkpoint), "--json", str(info_path)]))
    kl = ["--kl-ref", "none"] if row == FP_ROW else []
    tasks = ["--ppl", "none", "--task-dtype", args.task_dtype, "--batch-size", str(batch_size(args))]
    evals = {
        "short": ["--ppl", "wikitext2", "--seq-len", SHORT[0], "--max-windows", SHORT[1], *kl],
        "full": ["--ppl", "wikitext2", "--seq-len", "2048", *kl],
        "tasks": [*tasks, "--tasks", ",".join(ZERO_SHOT), *(["--limit", str(args.limit)] if args.limit else [])],
        "mmlu": [*tasks, "--tasks", "mmlu", "--mmlu-shots", str(MMLU_SHOTS),
                 *(["--limit", str(args.mmlu_limit)] if args.mmlu_limit else [])],
    }
    for key, path in paths.items():
        if fresh or not path.is_file():
            steps.append((key, [exe, "eval", source, *evals[key], *device, *data, "--no-progress",
                                "--json", str(path)]))
    return fresh, steps


def discard_figures(args: argparse.Namespace, row: str) -> None:
    """Remove every measurement of a row's checkpoint (figures, journals of unfinished evaluations,
    sizes, its identity), so none of them is reported for (or resumed on) another checkpoint."""
    for path in result_paths(args, row).values():
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)
    for name in (f"{row}.info.json", f"{row}.checkpoint.json"):
        (args.out / name).unlink(missing_ok=True)


def checkpoint_matches(args: argparse.Namespace, row: str) -> bool:
    """Whether the row's checkpoint is the one its figures were measured on (or none is recorded)."""
    recorded = recorded_identity(args, row)
    return recorded is None or identity_json(files_fingerprint(args.out / row)) == recorded


def figures_dropped(args: argparse.Namespace, exe: str, row: str, machine: dict[str, Any],
                    why: str) -> list[tuple[str, list[str]]]:
    """Discard the figures of another checkpoint than the row's present one, say so, record the
    present one as the row's, and return the steps that measure it anew."""
    print(f"smollm2_full_protocol: note: {row}'s checkpoint {why} its figures were measured on; they are "
          "dropped and measured anew", flush=True)
    discard_figures(args, row)
    record_identity(args, row)
    return row_plan(args, exe, row, machine)[1]


def machine_changes(recorded: dict[str, Any] | None, here: dict[str, Any]) -> str:
    """What differs between the machine a row began on and this one, e.g. 'transformers 5.24.0 -> 5.25.0'."""
    if recorded is None:
        return ""
    return ", ".join(f"{k} {recorded.get(k)} -> {here[k]}" for k in ROW_MACHINE_KEYS if recorded.get(k) != here[k])


@dataclass(frozen=True)
class Unfinished:
    """A row the run did not finish: `failed` when a command failed, else the time budget stopped it."""

    row: str
    why: str
    failed: bool

    def __str__(self) -> str:
        return f"{self.row}: {self.why}"


def expected_seconds(row: str, device: str) -> int:
    """How long a row started afresh takes on `device` (EXPECTED_QUANTIZE_SECONDS): a CPU row's
    hours must not pass for a GPU row's minutes, or a budget too short for it would discard
    another machine's figures for nothing."""
    kind = "cpu" if device == "cpu" else "cuda"
    quantize = EXPECTED_QUANTIZE_SECONDS[kind]
    method = row.partition("-w")[0]
    return (0 if row == FP_ROW else quantize.get(method, max(quantize.values()))) + EXPECTED_EVAL_SECONDS[kind]


def process_row(args: argparse.Namespace, exe: str, row: str, machine: dict[str, Any],
                deadline: float | None = None) -> Unfinished | None:
    """Run a row's remaining steps; None when all succeeded, else why not.

    A row that starts over loses its earlier figures first, so no figure of one checkpoint
    (or machine) is ever reported for another; with a `deadline` (time.monotonic()) it
    starts only if its expected duration is left, so figures are not thrown away for a row
    that cannot finish. No step starts after `deadline`, and one still running then is killed.
    A row quantized again keeps its figures only if the checkpoint is the one they were
    measured on (its identity in ROW.checkpoint.json, which every quantization records).
    """
    fresh, steps = row_plan(args, exe, row, machine)
    if not fresh and row != FP_ROW and is_complete_checkpoint(args.out / row):
        if recorded_identity(args, row) is None:
            record_identity(args, row)  # a row begun before checkpoints were recorded
        elif not checkpoint_matches(args, row):  # e.g. quantized anew by hand, or figures pulled from elsewhere
            steps = figures_dropped(args, exe, row, machine, "is not the checkpoint")
    left = None if deadline is None else deadline - time.monotonic()
    expected = expected_seconds(row, args.device)
    if steps and left is not None and (left <= 0 or (fresh and left < expected)):
        return Unfinished(row, f"not started (time budget: {max(left, 0):.0f} s left, a fresh row expects "
                               f"{expected} s)" if fresh else "not started (time budget)", False)
    if fresh:
        recorded = row_machine(args, row)
        changes = machine_changes(recorded, machine)
        if changes and any(p.is_file() for p in result_paths(args, row).values()):
            print(f"smollm2_full_protocol: note: {row} began on another machine ({changes}); its figures are "
                  "dropped and it starts over", flush=True)
        if recorded is None or not same_machine(recorded, machine):  # its half-finished quantization too
            shutil.rmtree(args.out / f"{row}.partial", ignore_errors=True)
        discard_figures(args, row)
        (args.out / f"{row}.quantize.json").unlink(missing_ok=True)
        write_json_atomic(args.out / f"{row}.machine.json", machine)
    pending = list(steps)
    while pending:
        step, cmd = pending.pop(0)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return Unfinished(row, f"not finished (time budget; {step} and later steps not started)", False)
        try:
            run(cmd, args.out / "logs" / f"{row}.{step}.log", timeout=left)
        except OutOfTime:
            return Unfinished(row, f"not finished (time budget; {step} stopped)", False)
        except (SystemExit, OSError) as failure:
            return Unfinished(row, str(failure), True)
        if step != "quantize":
            continue
        if not fresh and not checkpoint_matches(args, row):
            pending = figures_dropped(args, exe, row, machine, "quantized again differs from the checkpoint")
        record_identity(args, row)
    return None


PROTOCOL_KEYS = ("model", "task_dtype", "limit", "mmlu_limit")  # one protocol per folder
# One machine per row. A virtual machine may name its CPU only "AMD EPYC" whatever its
# generation, so the vector unit torch uses is part of it: bfloat16 matmuls take other code
# paths without AVX-512 (torch's: 6-10x slower; since 2026-12-07 unibcq runs scoring passes
# there as float32 GEMMs of the bfloat16 values, see `unibcq.compute_dtype`).
ROW_MACHINE_KEYS = ("gpu", "cpu", "cpu_capability", "cpu_count", "torch", "transformers", "device")


def machine_record(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how rows run now: the protocol settings and this machine."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(args.device) if args.device != "cpu" and torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": args.device, "model": args.model, "task_dtype": args.task_dtype, "limit": args.limit,
            "mmlu_limit": args.mmlu_limit, "jobs": args.jobs, "threads": args.threads,
            "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "command": command_line()}


def row_machine(args: argparse.Namespace, row: str) -> dict[str, Any] | None:
    """Where a row ran (OUT/ROW.machine.json), or None for a row never started."""
    path = args.out / f"{row}.machine.json"
    return read_json(path) if path.is_file() else None


def identity_json(identity: Any) -> Any:
    """An identity as ROW.checkpoint.json reads back (tuples become lists), for comparison."""
    return json.loads(json.dumps(identity))


def same_machine(recorded: dict[str, Any], here: dict[str, Any]) -> bool:
    """Whether a row begun on the `recorded` machine may go on here."""
    return all(recorded.get(k) == here[k] for k in ROW_MACHINE_KEYS)


def continuation_rank(recorded: dict[str, Any] | None, here: dict[str, Any]) -> int:
    """0 for a row this machine continues, 1 for one never tried, 2 for one that starts over."""
    if recorded is None:
        return 1
    return 0 if same_machine(recorded, here) else 2


def claim_out(args: argparse.Namespace) -> None:
    """Record the protocol in OUT/machine.json, or refuse an OUT whose rows follow another one:
    the docs present a folder's rows as one table."""
    path = args.out / "machine.json"
    here = machine_record(args)
    if path.is_file():
        first = json.loads(path.read_text())
        changed = [k for k in PROTOCOL_KEYS if first.get(k) != here[k]]
        if changed:
            raise SystemExit(f"smollm2_full_protocol: {args.out} holds rows made with other {', '.join(changed)} "
                             f"({', '.join(str(first.get(k)) for k in changed)}); use another --out")
        return
    write_json_atomic(path, here)


def run_rows(args: argparse.Namespace, rows: Sequence[str]) -> tuple[list[Unfinished], float]:
    """Process every row, --jobs at a time, and return the unfinished rows and the wall time.

    Rows this machine began go first (their checkpoints exist and the rest of their figures
    are nearest to done), then rows never tried, then rows another machine began, which start
    over; within each kind the --methods order holds."""
    exe = args.unibcq or default_unibcq()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    claim_out(args)
    machine = machine_record(args)
    start = time.perf_counter()
    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else None
    ordered = sorted(rows, key=lambda row: continuation_rank(row_machine(args, row), machine))
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        outcomes = list(pool.map(lambda row: process_row(args, exe, row, machine, deadline), ordered))
    return [o for o in outcomes if o], time.perf_counter() - start


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row_summary(args: argparse.Namespace, row: str) -> dict[str, Any] | None:
    """Every figure of a row, or None when it has none yet ('-' marks a missing part)."""
    paths = result_paths(args, row)
    loaded = {key: read_json(path) for key, path in paths.items() if path.is_file()}
    if not loaded:
        return None
    info_path = args.out / f"{row}.info.json"
    info = read_json(info_path) if info_path.is_file() else {}
    quantize_path = args.out / f"{row}.quantize.json"
    short, full = loaded.get("short", {}), loaded.get("full", {})
    tasks = (row_figures(loaded["tasks"], loaded.get("mmlu"), args.task_dtype) if "tasks" in loaded else None)
    mmlu = loaded.get("mmlu", {}).get("tasks", {}).get("mmlu") if "mmlu" in loaded else None
    return {
        "bits": UNQUANTIZED_BITS if row == FP_ROW else info.get("bits_per_weight"),
        "short_ppl": short.get("ppl", {}).get("wikitext2"), "short_kl": short.get("kl_vs_ref"),
        "full_ppl": full.get("ppl", {}).get("wikitext2"), "full_kl": full.get("kl_vs_ref"),
        "tasks": tasks, "mmlu": mmlu,
        "quantize_s": read_json(quantize_path)["seconds"] if quantize_path.is_file() else None,
        "eval_s": sum(r.get("seconds", 0.0) for r in loaded.values()),
        "missing": [PART_NAMES[key] for key in paths if key not in loaded],
        "machine": row_machine(args, row),
    }


def summary_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| method | config | bits/weight | ppl 40 x 512 | KL 40 x 512 | ppl full test @ 2048 | KL full test | "
             "zero-shot mean | MMLU 5-shot | quantize s | eval s |", "|---|---|" + "---:|" * 9]
    for row, f in rows:
        tasks, mmlu = f["tasks"], f["mmlu"]
        mean = "-" if tasks is None else f"**{plus_minus(tasks['mean'], tasks['mean_stderr'])}**"
        mmlu_cell = "-" if mmlu is None else plus_minus(mmlu["acc"], mmlu["stderr"])
        lines.append(f"| {label(row)} | {_cell(f['bits'], '.3f')} | {_cell(f['short_ppl'], '.2f')} | "
                     f"{_cell(f['short_kl'], '.4f')} | {_cell(f['full_ppl'], '.2f')} | {_cell(f['full_kl'], '.4f')} | "
                     f"{mean} | {mmlu_cell} | {_cell(f['quantize_s'], '.0f')} | {f['eval_s']:.0f} |")
    return "\n".join(lines)


def describe_machine(machine: dict[str, Any]) -> str:
    """'one NVIDIA H100 80GB HBM3 GPU, 16 CPU cores (...), torch ..., 8 rows at a time ..., DATE'."""
    where = f"one {machine['gpu']} GPU" if machine.get("gpu") else "no GPU"
    cpu = ", ".join(str(part) for part in (machine["cpu"], machine.get("cpu_capability")) if part)
    return (f"{where}, {machine['cpu_count']} CPU cores ({cpu}), torch {machine['torch']}, "
            f"{machine['jobs']} rows at a time with {machine['threads'] or 'default'} CPU "
            f"thread{'' if machine['threads'] == 1 else 's'} each, "
            f"{machine['date']}")


def machines_note(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The machine and run command of the rows, or one line per machine and run naming its rows."""
    groups: dict[str, list[str]] = {}
    for row, figures in rows:
        machine = figures["machine"]
        where = "not recorded" if not machine else describe_machine(machine) + (
            f"; run as `{machine['command']}`" if machine.get("command") else "")
        groups.setdefault(where, []).append(row)
    if len(groups) == 1:
        return f"{next(iter(groups))}."
    return "".join(f"\n  - {where}: {', '.join(names)}." for where, names in groups.items())


def docs_section(args: argparse.Namespace, rows: Sequence[tuple[str, dict[str, Any]]],
                 summary: str, per_task: str, missing: Sequence[str]) -> str:
    sets = "full sets" if not args.limit and not args.mmlu_limit else "subsets (--limit / --mmlu-limit)"
    title = f"SmolLM2-135M-Instruct: every figure of every row ({sets})"
    return section_head(START_MARKER, title) + f"""

- **Machine:** {machines_note(rows)}
- **Checkpoints:** each quantized on the machine that measured its row (`--device`), not the
  main table's: a CPU row of a deterministic method repeats the main table's figures, while
  trained methods land elsewhere run to run and GPU arithmetic differs from the CPU's in the
  last bits. Rows accumulate over runs
  (`--rows`, `--time-budget`) in `{args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}`;
  the command above measures whatever is still missing.
- **Protocol:** WikiText-2 test perplexity on the main table's 40 x 512 windows and on the
  whole test set at 2048 tokens (float32, KL against the unquantized model); the zero-shot
  tasks and MMLU 5-shot as in the task sections above, scored in {args.task_dtype}. ± is one
  standard error. **quantize s** and **eval s** are wall and measuring times of rows that
  shared the machine, not speed figures.{pending_note(missing)}

{summary}

Per task (acc_norm where the task defines it, else acc):

{per_task}
{END_MARKER}"""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = row_names(args)
    unfinished: list[str] = []
    if not args.no_run:
        unfinished, seconds = run_rows(args, rows_to_run(args))
        print(f"all rows processed in {seconds / 60:.1f} min", flush=True)
    for reason in unfinished:
        print(f"UNFINISHED {reason}", flush=True)
    failed = any(reason.failed for reason in unfinished)
    summaries = [(row, s) for row in rows if (s := row_summary(args, row)) is not None]
    if not summaries:
        print("smollm2_full_protocol: no row has results yet", flush=True)
        return 1 if args.no_run or failed else 0
    measured = dict(summaries)
    missing = [row if row not in measured else f"{row} ({', '.join(measured[row]['missing'])})"
               for row in rows if row not in measured or measured[row]["missing"]]
    summary = summary_table(summaries)
    tasks = [(row, s["bits"], s["tasks"]) for row, s in summaries if s["tasks"] is not None]
    per_task = task_table(tasks, MMLU_SHOTS) if tasks else "(no task results yet)"
    print(summary, per_task, sep="\n\n")
    if args.write_docs:
        if not (args.out / "machine.json").is_file():
            raise SystemExit(f"smollm2_full_protocol: {args.out} has no machine.json; it was not made by this script")
        write_docs(args.docs, docs_section(args, summaries, summary, per_task, missing),
                   START_MARKER, END_MARKER)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
