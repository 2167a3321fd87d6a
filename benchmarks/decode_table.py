"""End-to-end decode speed and memory: a full-precision model vs its quantized checkpoints.

Every row runs in a fresh subprocess, so its resident memory is its own: load the model (the
full-precision --model, default smollm2-135m, or a checkpoint given with --checkpoints), run
one short warm-up generation (numba compilation, caches, allocator growth), then
`unibcq.generate.generate_text` with a fixed prompt, greedy, --max-new-tokens new tokens
(default 64, end-of-sequence ignored so every row decodes the same number of steps).
The table shows decode tokens/s (first to last new token), prefill seconds, the model's
parameters + buffers as stored, and process RSS right after the imports and after
generating. Nothing is quantized here; make checkpoints with `unibcq quantize` first.

Threads: torch's intra-op thread count (set it with OMP_NUM_THREADS); the CPU bit-plane
GEMV sizes numba's own pool to the same count, so both run on the same threads.

Example:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_table.py \\
        --checkpoints /tmp/bench/rtn-w4-g-1 /tmp/bench/rtn-w3-g128 /tmp/bench/rtn-w2-g128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PROMPT = "Explain in a few sentences why the sky is blue."
DEFAULT_MODEL = "smollm2-135m"
WARMUP_TOKENS = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"full-precision model for the reference row (default {DEFAULT_MODEL}; 'none' skips it)")
    p.add_argument("--checkpoints", nargs="*", default=[], type=Path, help="quantized checkpoint directories")
    p.add_argument("--prompt", default=PROMPT, help="prompt (chat template applied when the tokenizer has one)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list here")
    # Internal: measure one model (a checkpoint with --worker-quantized) and write its row to --worker-out.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-quantized", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


def measure(spec: str, quantized: bool, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """Load one model in this process, warm up, generate once; the row as a dict."""
    import torch
    import transformers

    import unibcq
    from unibcq.generate import generate_text
    from unibcq.memory import resident_memory_bytes

    transformers.utils.logging.set_verbosity_error()
    rss_imports = resident_memory_bytes()  # torch, transformers and unibcq loaded; no model yet
    model = unibcq.load(spec) if quantized else unibcq.load_model(spec)
    tokenizer = unibcq.load_tokenizer(spec)
    bits = unibcq.checkpoint_info(spec).bits_per_weight if quantized else 32.0
    generate_text(model, tokenizer, prompt, WARMUP_TOKENS, ignore_eos=True)
    result = generate_text(model, tokenizer, prompt, max_new_tokens, ignore_eos=True)
    return {"model": spec, "bits_per_weight": bits, "rss_imports_bytes": rss_imports,
            "threads": torch.get_num_threads(), **result.to_dict()}


def run_worker(spec: str, quantized: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Measure `spec` in a fresh interpreter so RSS reflects that model alone."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--worker", spec, "--worker-out", str(out), "--prompt", args.prompt,
               "--max-new-tokens", str(args.max_new_tokens), *(["--worker-quantized"] if quantized else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"decode_table: measuring {spec} failed: {tail}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        row = measure(args.worker, args.worker_quantized, args.prompt, args.max_new_tokens)
        args.worker_out.write_text(json.dumps(row))
        return 0
    from unibcq.checkpoint import is_checkpoint
    from unibcq.progress import print_table

    for path in args.checkpoints:
        if not is_checkpoint(path):
            raise SystemExit(f"decode_table: {path} is not a unibcq checkpoint (quantize it with unibcq quantize)")
    if args.max_new_tokens < 2:
        raise SystemExit("decode_table: --max-new-tokens must be >= 2 to time any decode step")
    specs = ([(args.model, False)] if args.model.lower() != "none" else []) + [(str(p), True) for p in args.checkpoints]
    if not specs:
        raise SystemExit("decode_table: nothing to measure; give --checkpoints or a --model")
    rows = []
    for spec, quantized in specs:
        print(f"measuring {spec} ...", file=sys.stderr, flush=True)
        rows.append(run_worker(spec, quantized, args))
    reference = rows[0]["decode_tokens_per_second"] if not specs[0][1] else None
    mib = 2**20
    print_table(
        f"decode, {args.max_new_tokens} new tokens, greedy; prompt {rows[0]['prompt_tokens']} tokens",
        ["model", "bits/weight", "decode tok/s", "vs FP", "prefill s", "model MiB", "RSS MiB", "RSS imports MiB",
         "threads", "text"],
        [(Path(r["model"]).name if r["model"] != args.model else r["model"], r["bits_per_weight"],
          r["decode_tokens_per_second"],
          r["decode_tokens_per_second"] / reference if reference else "-", r["prefill_seconds"],
          r["model_bytes"] / mib, r["rss_bytes"] / mib if r["rss_bytes"] else "-",
          r["rss_imports_bytes"] / mib if r["rss_imports_bytes"] else "-",
          r["threads"], " ".join(r["text"].split())[:28]) for r in rows],
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
