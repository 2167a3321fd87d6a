"""SmolLM2-135M benchmark table: quantize with each method/config, evaluate, tabulate.

For every method in --methods and every ``bits:group_size`` config in --configs this runs

    unibcq quantize MODEL --method M --bits B --group-size G --out OUT/M-wB-gG --json ...
    unibcq info OUT/M-wB-gG --json ...
    unibcq eval OUT/M-wB-gG --ppl wikitext2 --seq-len L --max-windows N --json ...

plus one unquantized row (``unibcq eval MODEL --kl-ref none``), and prints a markdown
table of perplexity, KL divergence and top-1 agreement against the unquantized model,
honest bits per weight (codes + scales + offsets), checkpoint size and quantization time.

The run is resumable: a checkpoint directory that already exists is not re-quantized and
an eval JSON that already exists is not re-evaluated (delete them to redo a row).
With --write-docs the section between ``<!-- smollm2-table:start -->`` and
``<!-- smollm2-table:end -->`` in docs/BENCHMARKS.md is replaced (the file is created
when missing), together with the command line, date, machine and data protocol.

Example:
    UNIBCQ_DATA_DIR=/work/shared/datasets .venv/bin/python benchmarks/smollm2_table.py \\
        --out /tmp/bench --write-docs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from unibcq.report.render import cpu_model

REPO = Path(__file__).resolve().parent.parent
START_MARKER = "<!-- smollm2-table:start -->"
END_MARKER = "<!-- smollm2-table:end -->"
DOC_HEADER = """# Benchmarks

Every figure on this page was produced by the command shown with it; rerun that command to
reproduce or update the table.

"""


@dataclass
class Row:
    """One line of the table; None means "not applicable"."""

    method: str
    bits: int | None
    group_size: int | None
    bits_per_weight: float | None
    ppl: float
    kl_vs_fp: float | None
    top1: float | None
    checkpoint_mb: float | None
    quant_seconds: float | None
    weighted_rel_error: float | None = None


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'4:-1,3:128' -> [(4, -1), (3, 128)]."""
    configs: list[tuple[int, int]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        bits, sep, group = item.partition(":")
        try:
            if not sep:
                raise ValueError
            configs.append((int(bits), int(group)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"config {item!r}: expected BITS:GROUP_SIZE, e.g. 3:128") from None
    if not configs:
        raise argparse.ArgumentTypeError("--configs is empty")
    return configs


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise argparse.ArgumentTypeError("--methods is empty")
    return methods


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'e4=--epochs 4' -> ('e4', ['--epochs', '4'])."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=FLAGS, e.g. e4='--epochs 4'")
    return name, shlex.split(flags)


def split_method(spec: str, variants: dict[str, list[str]]) -> tuple[str, list[str]]:
    """'uniquanf+e4' -> ('uniquanf', the flags of variant e4); a bare method has no extra flags."""
    method, _, variant = spec.partition("+")
    if not variant:
        return method, []
    if variant not in variants:
        raise SystemExit(f"smollm2_table: method {spec!r} names variant {variant!r}; declare it with --variant")
    return method, variants[variant]


def default_unibcq() -> str:
    """The project's venv CLI, else the one next to this interpreter, else PATH."""
    for candidate in (REPO / ".venv" / "bin" / "unibcq", Path(sys.executable).parent / "unibcq"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("unibcq")
    if not found:
        raise SystemExit("smollm2_table: cannot find the unibcq CLI; pass --unibcq")
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for checkpoints, JSONs and logs (reused on rerun)")
    p.add_argument("--model", default="smollm2-135m", help="model alias / path given to unibcq")
    p.add_argument("--methods", type=parse_methods, default=parse_methods("rtn,bcq-alternating"),
                   help="comma-separated methods (default: rtn,bcq-alternating); METHOD+VARIANT adds the "
                        "quantize flags of a --variant, e.g. uniquanf+e4")
    p.add_argument("--variant", type=parse_variant, action="append", default=[],
                   help="NAME=FLAGS: extra quantize flags for METHOD+NAME rows, e.g. e4='--epochs 4' (repeatable)")
    p.add_argument("--configs", type=parse_configs, default=parse_configs("4:-1,3:128,2:128"),
                   help="comma-separated BITS:GROUP_SIZE; group -1 = per output channel (default: 4:-1,3:128,2:128)")
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window length in tokens (default: 512)")
    p.add_argument("--max-windows", type=int, default=40, help="evaluate the first N windows (default: 40)")
    p.add_argument("--data-dir", help="passed to unibcq (default: $UNIBCQ_DATA_DIR)")
    p.add_argument("--unibcq", default=None, help="path of the unibcq CLI (default: the repo's .venv)")
    p.add_argument("--write-docs", action="store_true", help="update the table section of --docs")
    p.add_argument("--no-run", action="store_true", help="only tabulate rows whose evaluation already exists")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    return p


def machine_description(out: Path, measuring: bool) -> str:
    """'N CPU cores, CPU' of the machine that measured OUT's rows: this one when it measures
    (recorded in OUT/host.json), else the recorded one, so that a --no-run regeneration on
    another machine does not describe itself."""
    path = out / "host.json"
    if measuring:
        path.write_text(json.dumps({"cpu_count": os.cpu_count(), "cpu": cpu_model()}))
    if not path.is_file():
        return "machine not recorded"
    host = read_json(path)
    return f"{host['cpu_count']} CPU cores, {host['cpu']}"


class OutOfTime(Exception):
    """A command was stopped because the run's time budget ended (not a failure of the command)."""


def run(cmd: list[str], log: Path, timeout: float | None = None) -> None:
    """Run one unibcq command, logging its output; raise with the log's tail on failure, or
    OutOfTime when it is still running after `timeout` seconds (it is killed then)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  -> stopped at the time budget after {time.perf_counter() - start:.1f} s (log: {log})", flush=True)
            raise OutOfTime(shlex.join(cmd)) from None
    print(f"  -> exit {proc.returncode} after {time.perf_counter() - start:.1f} s (log: {log})", flush=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(f"smollm2_table: command failed (exit {proc.returncode}):\n" + "\n".join(tail))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def is_complete_checkpoint(path: Path) -> bool:
    """Checkpoints are written atomically, so config + weights present means complete."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def common_flags(args: argparse.Namespace) -> list[str]:
    return ["--data-dir", args.data_dir] if args.data_dir else []


def eval_flags(args: argparse.Namespace) -> list[str]:
    return ["--ppl", "wikitext2", "--seq-len", str(args.seq_len), "--max-windows", str(args.max_windows),
            "--no-progress", *common_flags(args)]


def fp_row(args: argparse.Namespace, exe: str) -> Row:
    eval_json = args.out / f"fp.eval-L{args.seq_len}-N{args.max_windows}.json"
    if not eval_json.is_file():
        if args.no_run:
            raise SystemExit(f"smollm2_table: --no-run, and {eval_json} is missing: nothing to tabulate")
        run([exe, "eval", args.model, "--kl-ref", "none", *eval_flags(args), "--json", str(eval_json)],
            args.out / "logs" / "fp.eval.log")
    ev = read_json(eval_json)
    return Row(method=f"unquantized ({ev['bits_per_weight']:.0f}-bit float)", bits=None, group_size=None,
               bits_per_weight=ev["bits_per_weight"], ppl=ev["ppl"]["wikitext2"], kl_vs_fp=None, top1=None,
               checkpoint_mb=None, quant_seconds=None)


def row_paths(args: argparse.Namespace, spec: str, bits: int, group: int) -> dict[str, Path]:
    """A row's checkpoint and JSONs."""
    name = f"{spec}-w{bits}-g{group}"
    return {"checkpoint": args.out / name, "quantize": args.out / f"{name}.quantize.json",
            "info": args.out / f"{name}.info.json",
            "eval": args.out / f"{name}.eval-L{args.seq_len}-N{args.max_windows}.json"}


def measure_row(args: argparse.Namespace, exe: str, spec: str, bits: int, group: int) -> None:
    """Quantize (unless the checkpoint exists), size and evaluate (unless measured) one row."""
    method, extra = split_method(spec, dict(args.variant))
    paths = row_paths(args, spec, bits, group)
    ckpt, logs = paths["checkpoint"], args.out / "logs"
    name = ckpt.name
    if not is_complete_checkpoint(ckpt):
        if ckpt.exists():
            raise SystemExit(f"smollm2_table: {ckpt} exists but is not a complete checkpoint; remove it")
        run([exe, "quantize", args.model, "--method", method, "--bits", str(bits), "--group-size", str(group),
             "--out", str(ckpt), "--json", str(paths["quantize"]), "--no-progress", *extra, *common_flags(args)],
            logs / f"{name}.quantize.log")
    else:
        print(f"= {ckpt} exists; not re-quantizing", flush=True)
    run([exe, "info", str(ckpt), "--json", str(paths["info"])], logs / f"{name}.info.log")
    if not paths["eval"].is_file():
        run([exe, "eval", str(ckpt), *eval_flags(args), "--json", str(paths["eval"])], logs / f"{name}.eval.log")
    else:
        print(f"= {paths['eval']} exists; not re-evaluating", flush=True)


def quant_row(args: argparse.Namespace, spec: str, bits: int, group: int) -> Row:
    """A row's figures, from its JSONs."""
    method, extra = split_method(spec, dict(args.variant))
    paths = row_paths(args, spec, bits, group)
    quant_json = paths["quantize"]
    info, ev = read_json(paths["info"]), read_json(paths["eval"])
    seconds = info.get("quantize_seconds")
    rel_error = None
    if quant_json.is_file():
        qj = read_json(quant_json)
        seconds = qj["seconds"]
        layers = qj.get("layers", [])
        numel = sum(layer["numel"] for layer in layers)
        if numel:
            rel_error = sum(layer["rel_error"] * layer["numel"] for layer in layers) / numel
    label = f"{method} ({shlex.join(extra)})" if extra else method
    return Row(method=label, bits=bits, group_size=group, bits_per_weight=info["bits_per_weight"],
               ppl=ev["ppl"]["wikitext2"], kl_vs_fp=ev["kl_vs_ref"], top1=ev["top1_agreement"],
               checkpoint_mb=info["file_bytes"] / 1e6, quant_seconds=seconds, weighted_rel_error=rel_error)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| method | bits | group | bits/weight | ppl | KL vs FP | top-1 | checkpoint MB | quant s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        group = "-" if r.group_size is None else ("per-channel" if r.group_size == -1 else str(r.group_size))
        top1 = "-" if r.top1 is None else f"{100 * r.top1:.1f}%"
        lines.append(
            f"| {r.method} | {_fmt(r.bits, 'd')} | {group} | {_fmt(r.bits_per_weight, '.3f')} | {r.ppl:.2f} | "
            f"{_fmt(r.kl_vs_fp, '.4f')} | {top1} | {_fmt(r.checkpoint_mb, '.1f')} | {_fmt(r.quant_seconds, '.1f')} |"
        )
    return "\n".join(lines)


def command_line() -> str:
    env = os.environ.get("UNIBCQ_DATA_DIR")
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    prefix = f"UNIBCQ_DATA_DIR={shlex.quote(env)} " if env else ""
    # --no-run only re-tabulates; the command that produces the figures is the same without it.
    return prefix + shlex.join([str(exe), str(script), *(a for a in sys.argv[1:] if a != "--no-run")])


def section_head(start_marker: str, title: str, command: str | None = None) -> str:
    """A generated docs section's opening: marker, title, provenance and the command that made it
    (`command` when the figures were made elsewhere, e.g. on a GPU machine, and only tabulated here)."""
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""{start_marker}
## {title}

_Generated by `benchmarks/{Path(sys.argv[0]).name}` on {date}; do not edit between the markers._

```sh
{command or command_line()}
```"""


def docs_section(args: argparse.Namespace, rows: Sequence[Row], total_seconds: float) -> str:
    return section_head(START_MARKER, "SmolLM2-135M-Instruct: every method at w4 per-channel, w3 g128, w2 g128") + f"""

- **Machine:** {machine_description(args.out, not args.no_run)}, no GPU; whole run {total_seconds / 60:.1f} min
  (including the resumed/skipped steps' bookkeeping). Timings are noisy: the machine was shared
  with other work (test suites) while this ran.
- **Model:** `{args.model}`, SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF; the
  "unquantized" row and the KL / top-1 reference are that dequantized model. Because its
  weights already sit on a 4-bit group-32 grid, 4-bit group-32 would be unrealistically good,
  hence per-channel and group-128 configs. `lm_head` / embeddings stay unquantized.
- **Data protocol:** WikiText-2 raw test split (`wikitext-2-raw/wiki.test.raw`); non-empty
  lines joined with `"\\n\\n"` and tokenized once; the first {args.max_windows} non-overlapping
  windows of {args.seq_len} tokens, each scored independently (ppl = exp of the mean NLL over
  {args.seq_len - 1} predicted tokens per window). KL is KL(P_FP || P_quant) per token, mean;
  top-1 is how often both models' argmax next token agree, on the same windows.
- **Methods:** default options throughout. Calibration-free: `rtn` (asymmetric min/max grid,
  integer zero point) and `bcq-alternating` (offset on, 15 rounds, greedy+uniform init).
  Calibrated (`gptq`, `gptq-bcq`, `flexround`, `uniquanf`): the fast preset's 32 windows of
  256 tokens from the WikiText-2 *validation* split (never the test text), seed 0; GPTQ damping
  1% of the mean Hessian diagonal, no act-order; FlexRound / UniQuanF 2 epochs per block.
  A row labelled `method (FLAGS)` was quantized with those extra flags (e.g. `--epochs 4`).
- **bits/weight** is honest: packed codes + scales + offsets of the quantized linear layers,
  divided by their weight count. **checkpoint MB** is `model.safetensors` in 10^6 bytes,
  including the unquantized embeddings and norms. **quant s** is the quantization time only
  (not loading or saving).

{markdown_table(rows)}
{END_MARKER}"""


def write_docs(path: Path, section: str, start_marker: str = START_MARKER, end_marker: str = END_MARKER) -> None:
    """Replace the section between the markers (or append it) in `path`, atomically."""
    text = path.read_text() if path.is_file() else DOC_HEADER
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + section + text[end + len(end_marker):]
    elif start == -1 and end == -1:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        raise SystemExit(f"{path} has unbalanced {start_marker} / {end_marker} markers")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"updated {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exe = args.unibcq or default_unibcq()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [fp_row(args, exe)]
    for method in args.methods:
        for bits, group in args.configs:
            if not args.no_run:
                measure_row(args, exe, method, bits, group)
            paths = row_paths(args, method, bits, group)
            if paths["info"].is_file() and paths["eval"].is_file():  # --no-run tabulates what was measured
                rows.append(quant_row(args, method, bits, group))
    total = time.perf_counter() - start
    (args.out / "summary.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print()
    print(markdown_table(rows))
    print(f"\ntotal {total:.1f} s")
    if args.write_docs:
        write_docs(args.docs, docs_section(args, rows, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
