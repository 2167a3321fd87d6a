"""Command-line interface: a thin layer over the Python API.

Every user mistake surfaces as one `unibcq: error: ...` line on stderr and exit code 2;
results go to stdout as tables and, with --json, to a JSON file written atomically.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import torch
from safetensors import SafetensorError

from unibcq import __version__
from unibcq.atomic import check_writable, write_json_atomic
from unibcq.compute_dtype import COMPUTE_DTYPES, compute_dtype
from unibcq.devices import check_device
from unibcq.errors import UnibcqError
from unibcq.models.fingerprint import source_spec

if TYPE_CHECKING:
    from unibcq.config import QuantConfig
    from unibcq.eval.journal import EvalJournal
    from unibcq.eval.suite import EvalSettings
    from unibcq.report import CompareSettings

PRESET_HELP = "calibration-free methods ignore the calibration options"


def _parse_override(text: str) -> tuple[str, dict[str, int]]:
    """'PATTERN:bits=4,group_size=64' -> (PATTERN, {...})."""
    pattern, sep, assignments = text.rpartition(":")
    if not sep or not pattern:
        raise UnibcqError(f"--override {text!r}: expected PATTERN:bits=N[,group_size=G]")
    values: dict[str, int] = {}
    for item in assignments.split(","):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in ("bits", "group_size"):
            raise UnibcqError(f"--override {text!r}: settings are bits=N and group_size=G")
        if key.strip() in values:
            raise UnibcqError(f"--override {text!r}: {key.strip()} is given twice")
        try:
            values[key.strip()] = int(value)
        except ValueError as exc:
            raise UnibcqError(f"--override {text!r}: {key.strip()} must be an integer") from exc
    return pattern, values


def _parse_overrides(texts: Sequence[str]) -> dict[str, dict[str, int]]:
    """Every --override; one pattern given twice is refused rather than the later one winning."""
    overrides: dict[str, dict[str, int]] = {}
    for text in texts:
        pattern, values = _parse_override(text)
        if pattern in overrides:
            raise UnibcqError(f"--override {pattern!r} is given twice; put its settings in one flag, "
                              "e.g. PATTERN:bits=4,group_size=64")
        overrides[pattern] = values
    return overrides


NO_PROGRESS_HELP = "no progress bars (for logs and CI; the summary tables are still printed)"


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors every other unibcq error has (exit code 2, as before):
    the usage block argparse prints first buries the one line that says what is wrong. Flags
    are never abbreviated: `--sym` would set --symmetric past the note that names the flags a
    method ignores, and a later flag sharing the prefix would change its meaning."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"unibcq: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        """As argparse's, but unknown flags are reported by the innermost subcommand chosen,
        whose --help lists the flags it knows (the top-level help lists none)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self._chosen(parsed).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def _chosen(self, parsed: argparse.Namespace) -> "_Parser":
        """The innermost (sub)command parser that `parsed` went through."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)]._chosen(parsed)
        return self


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unibcq", description="Binary-coding quantization of causal LMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quantize_parser, _add_eval_parser, _add_compare_parser, _add_info_parser, _add_generate_parser,
                _add_bench_parser):
        add(sub)
    return parser


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """`unibcq quantize`: every method's settings (each flag's help names the methods that read it)."""
    q = sub.add_parser("quantize", help="quantize a model's decoder linear layers and save a checkpoint")
    q.add_argument("model", help="Hugging Face id, local model dir, .gguf file, or alias (smollm2-135m)")
    q.add_argument("--method", required=True,
                   help="rtn, bcq-greedy, bcq-refined, bcq-alternating, dyngroup (calibration-free); "
                        "gptq, gptq-bcq, uniquanf, flexround (calibrated)")
    q.add_argument("--bits", type=int, help="bits per weight code (default 3; dyngroup is 1-bit)")
    q.add_argument("--group-size", type=int,
                   help="input columns per group; -1 = per output channel (default 128; unused by dyngroup)")
    q.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    q.add_argument("--symmetric", action="store_true", help="rtn, gptq: symmetric grid")
    q.add_argument("--float-zero", dest="integer_zero", action="store_false",
                   help="rtn/gptq: real-valued zero point over the exact [min, max] (default: GPTQ's integer zero "
                        "point with 0 on the grid, which measured much better)")
    q.add_argument("--clip-search", action="store_true", help="rtn: per-group clipping search on an Lp error")
    q.add_argument("--no-offset", dest="offset", action="store_false", help="bcq-*: no per-group offset")
    q.add_argument("--iters", type=int, help="alternating BCQ rounds (bcq-alternating, gptq-bcq: 15; uniquanf init T: preset)")
    q.add_argument("--init", default="greedy+uniform", choices=["greedy", "greedy+uniform"], help="bcq-alternating start")
    q.add_argument("--override", action="append", default=[], metavar="PATTERN:bits=N[,group_size=G]",
                   help="per-layer settings for layers whose full name matches PATTERN (fnmatch, e.g. "
                        "'*.mlp.down_proj'; the first match wins; a pattern matching no layer is an error); "
                        "repeatable")
    q.add_argument("--algorithm", default="windowed", choices=["dp", "greedy", "windowed"], help="dyngroup solver")
    q.add_argument("--max-groups", type=int, default=32, help="dyngroup: groups per segment")
    q.add_argument("--lambda", dest="lam", type=float, default=0.75, help="dyngroup: penalty on small groups")
    q.add_argument("--raw-lambda", action="store_true", help="dyngroup: use --lambda unnormalised")
    q.add_argument("--window", type=int, default=256, help="dyngroup windowed: initial run length")
    q.add_argument("--granularity", default="matrix", help="dyngroup: matrix | row | block:N")
    q.add_argument("--dp-atom-size", type=int, default=1, help="dyngroup dp: cut only every N sorted weights")
    q.add_argument("--refine-sweeps", type=int, default=0,
                   help="dyngroup greedy/windowed: boundary-refinement sweeps after merging (0 = the paper's)")
    q.add_argument("--merge-rule", default="objective", choices=["objective", "paper"],
                   help="dyngroup greedy/windowed: merge the pair that raises the objective least and stop when "
                        "no merge lowers it (default), or the authors' rule: the pair whose merged group costs "
                        "least, down to exactly --max-groups (with --raw-lambda: the paper's setting)")
    q.add_argument("--workers", type=int, default=1, help="parallel worker processes for per-matrix methods")
    q.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="per-matrix methods: local worker processes, or Ray tasks on the cluster RAY_ADDRESS "
                        "names (else a local Ray instance with --workers CPUs); needs unibcq[ray]")
    q.add_argument("--max-memory", metavar="SIZE",
                   help="stay within SIZE (e.g. 8GiB) for models larger than memory: per-matrix methods stream "
                        "the weights one at a time from the model's safetensors files, calibrated methods read "
                        "each decoder block from them when its turn comes (and spill their calibration "
                        "activations to disk when the budget needs it)")
    q.add_argument("--spill-activations", action="store_true",
                   help="calibrated methods: keep the activations between blocks in files next to the output "
                        "instead of memory (automatic under --max-memory when they do not fit)")
    q.add_argument("--damp", type=float, default=0.01, help="gptq, gptq-bcq: Hessian damping, fraction of the mean diagonal")
    q.add_argument("--act-order", action="store_true", help="gptq, gptq-bcq: process columns by decreasing Hessian diagonal")
    q.add_argument("--true-sequential", action="store_true",
                   help="gptq, gptq-bcq: collect each layer's Hessian after the layers before it in its block are quantized "
                        "(AutoGPTQ's default; one calibration pass per group of layers sharing an input)")
    q.add_argument("--device", default="cpu", help="compute device for calibrated methods (cpu, cuda, cuda:N)")
    q.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (unties embeddings; per-matrix methods only)")
    q.add_argument("--calib", default="wikitext2", help=f"calibration text source ({PRESET_HELP})")
    q.add_argument("--calib-samples", type=int, help="calibration windows (preset: fast 32, paper 128)")
    q.add_argument("--seq-len", type=int, help="tokens per calibration window (preset: fast 256, paper 2048, "
                        "capped at the model's context; a value given past the context is refused)")
    q.add_argument("--preset", default="fast", help="calibrated methods: fast (CPU, default) or paper")
    q.add_argument("--epochs", type=int, help="uniquanf/flexround: passes over the calibration set per block")
    q.add_argument("--u-lr", type=float, help="uniquanf/flexround: learning rate of the mapping parameters")
    q.add_argument("--b-lr", type=float, help="uniquanf: learning rate of the BCQ alphas")
    q.add_argument("--remap-every", type=int, help="uniquanf: periodic re-mapping period p")
    q.add_argument("--grid-points", type=int, help="uniquanf: clipping ratios tried at init, G of them: i / G for i = G .. 1")
    q.add_argument("--batch-size", type=int, help="uniquanf/flexround: samples per step")
    q.add_argument("--input-prob", type=float, help="uniquanf/flexround: probability of taking a block input element from the quantized "
                        "stream rather than the FP one (QDrop's and the authors' meaning)")
    q.add_argument("--mapping", default="local", choices=["local", "global", "direct"],
                   help="uniquanf: re-mapping to value-neighbour levels (local), all levels every p steps "
                        "(global), or all levels every step (direct, for ablation)")
    q.add_argument("--shift", action="store_true", help="uniquanf: fit a BCQ shift beta at init (authors: off)")
    q.add_argument("--seed", type=int, default=0,
                   help="calibrated methods: seed of the calibration windows drawn and of reconstruction's "
                        "batches and input mixing (default 0)")
    q.add_argument("--data-dir", help="folder with the datasets (default: $UNIBCQ_DATA_DIR)")
    q.add_argument("--save-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the tensors left unquantized (embeddings, norms, biases) in the checkpoint; "
                        "auto = the dtype the model is published in (float32 for a GGUF)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    q.add_argument("--resume", action="store_true",
                   help="calibrated methods: continue a killed run from its last finished block (progress is "
                        "kept in OUT.partial until the checkpoint is written)")
    q.add_argument("--json", help="also write the per-layer summary as JSON here")
    q.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`unibcq eval`: perplexity, KL and tasks of a checkpoint or model."""
    e = sub.add_parser("eval", help="perplexity, KL divergence, top-1 agreement and benchmark tasks")
    e.add_argument("model", help="quantized checkpoint dir, or any MODEL accepted by quantize")
    e.add_argument("--kl-ref", help="reference model for KL (default: a checkpoint's source model; 'none' skips)")
    _add_eval_flags(e)
    e.add_argument("--json", help="write every printed figure to this JSON file; finished datasets, tasks and parts "
                                  "of tasks are kept in JSON.partial meanwhile, so a killed eval rerun resumes there")
    e.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """`unibcq compare`: methods x bit widths on one protocol, into a report."""
    c = sub.add_parser("compare", help="quantize with several methods and bit widths, evaluate all, write a report")
    c.add_argument("model", help="any MODEL accepted by quantize; also the KL reference")
    c.add_argument("--methods", required=True, help="comma-separated methods, e.g. rtn,gptq,bcq-alternating,uniquanf")
    c.add_argument("--bits", default="2,3,4", help="comma-separated bit widths (dyngroup always gets one 1-bit cell)")
    c.add_argument("--group-size", type=int, default=128, help="input columns per group; -1 = per output channel")
    c.add_argument("--out", required=True, help="report folder: checkpoints/, results/, report.md, plots")
    c.add_argument("--preset", default="fast", help="calibrated methods: fast (default) or paper")
    c.add_argument("--calib", default="wikitext2", help="calibration text (validation split of wikitext2/ptb, or a file)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and training (default 0)")
    c.add_argument("--workers", type=int, default=1, help="parallel worker processes for per-matrix methods")
    _add_eval_flags(c)
    c.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    """`unibcq info`: a checkpoint's method, bits and honest bits per weight."""
    i = sub.add_parser("info", help="method, bits and honest bits per weight of a checkpoint")
    i.add_argument("path", help="a unibcq checkpoint directory")
    i.add_argument("--json", help="also write the figures (and every layer's) as JSON here")
    i.add_argument("--layers", action="store_true", help="print the per-layer table")


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """`unibcq generate`: streamed generation with speed and memory."""
    g = sub.add_parser("generate", help="generate text from a checkpoint or model, streamed, with speed and memory")
    g.add_argument("model", help="quantized checkpoint dir, or any MODEL accepted by quantize")
    g.add_argument("--prompt", required=True, help="text to continue (the user message when --chat)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (default 64)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template as a user turn (default: on when the "
                        "tokenizer has a template)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples at this temperature (at least 1e-6), with the "
                        "top-k/top-p of the model's generation config, else transformers' defaults (top-k 50)")
    g.add_argument("--seed", type=int, help="seed for sampling (--temperature > 0)")
    g.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="float32", choices=tuple(COMPUTE_DTYPES),
                   help="what the unquantized tensors and activations compute in (packed weights stay packed; "
                        "bfloat16 is the usual choice on a GPU; on a CPU without torch's fast GEMM in that "
                        "dtype (bfloat16: no AVX-512; float16: no AVX512-FP16) a prompt of 32 tokens or more "
                        "runs its products as float32 GEMMs of the half-precision values, and decode steps "
                        "stay somewhat slower than in float32)")
    g.add_argument("--json", help="write the text and every printed figure to this JSON file")


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`unibcq bench`: the dynamic-grouping and kernel benchmarks."""
    b = sub.add_parser("bench", help="benchmarks that print tables")
    bench = b.add_subparsers(dest="bench", required=True)
    bd = bench.add_parser("dyngroup", help="dynamic-grouping solvers: seconds and objective on one core")
    bd.add_argument("--rows", type=int, default=4096, help="rows of the large random matrix (default 4096)")
    bd.add_argument("--cols", type=int, default=4096, help="columns of the large random matrix (default 4096)")
    bd.add_argument("--max-groups", type=int, default=32, help="groups per segment (default 32)")
    bd.add_argument("--lambda", dest="lam", type=float, default=0.75,
                    help="penalty on small groups, normalised (default 0.75)")
    bd.add_argument("--window", type=int, default=256, help="windowed solver's initial run length (default 256)")
    bd.add_argument("--with-greedy", action="store_true", help="also run plain greedy on the large matrix (minutes)")
    bd.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 matrix")
    bd.add_argument("--json", help="also write the table as JSON here")
    bk = bench.add_parser(
        "kernels", help="packed BCQ matmul backends vs dense fp32/bf16 matmul: time, speedup, effective GB/s",
        description="Times every bcq_matmul backend on RTN-quantized random weights next to the dense fp32 and "
                    "bf16 matmul of the same shape (median of --repeats after a warm-up; calls rotate over copies "
                    "of the weight larger than the caches, so each reads its weight from memory as a decode step "
                    "does), and reports effective bandwidth (stored weight bytes / seconds) next to the machine's "
                    "copy bandwidth. The default "
                    "grid (4096x4096 and SmolLM2-135M's 576x576, 192x576, 1536x576, 576x1536; bits 2 3 4; "
                    "batch 1 4 16 64; 3 repeats) takes a few minutes on one core; the 7B MLP shapes "
                    "(--shape 4096x11008 11008x4096) are left out because reference and bitplane take seconds per "
                    "call there at large batches. --json writes a list with one self-contained entry per "
                    "measurement (keys backend, shape, bits, group_size, batch, seconds, speedup_vs_fp32, gbps, "
                    "weight_bytes, bandwidth_gbps, threads, device, gpu, input_dtype, note). --device cuda times the same "
                    "grid on a GPU (the triton backend's home), each timed loop closed by a synchronisation; "
                    "small calls there are launch-bound, as an eager decode step is.")
    bk.add_argument("--shape", nargs="+", metavar="OUTxIN", help="weight shapes (default: see above)")
    bk.add_argument("--bits", nargs="+", type=int, help="bit widths (default 2 3 4)")
    bk.add_argument("--group-size", type=int, default=128, help="input columns per group; -1 = per output row")
    bk.add_argument("--batch", nargs="+", type=int, help="input rows per call (default 1 4 16 64)")
    bk.add_argument("--backends", help="comma-separated bcq_matmul backends (default: all but auto; one that raises "
                                         "on this machine is listed once as skipped)")
    bk.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement; the median is reported")
    bk.add_argument("--device", default="cpu", help="where the weights live and the calls run: cpu, cuda or cuda:N")
    bk.add_argument("--input-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the packed backends' input dtype (dense rows are timed in fp32 and bf16 either way)")
    bk.add_argument("--json", help="also write every measurement as JSON here (keys: see above)")
    bk.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    """The evaluation protocol's flags, identical for `eval` and `compare`."""
    parser.add_argument("--ppl", default="wikitext2",
                        help="comma-separated: wikitext2, wikitext2-gptq (GPTQ's exact string, 1%% more tokens), ptb, or "
                             ".txt/.jsonl files; 'none' skips perplexity")
    parser.add_argument("--seq-len", type=int, default=2048,
                        help="perplexity window length, capped at the model's context")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--data-dir", help="folder with the datasets (default: $UNIBCQ_DATA_DIR)")
    parser.add_argument("--tasks", help="comma-separated: piqa, arc_easy, arc_challenge, hellaswag, winogrande, "
                                        "boolq, openbookqa, lambada, mmlu, gsm8k, or all (the zero-shot ones "
                                        "present + mmlu)")
    parser.add_argument("--limit", type=int, help="--tasks: only the first N items of each task (MMLU: of each subject)")
    parser.add_argument("--mmlu-shots", type=int, default=5, help="MMLU exemplars from the dev split (0-5)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="--tasks: most scored sequences per forward pass (a pass also stops near 1024 "
                             "tokens on a CPU, 16384 on a GPU)")
    parser.add_argument("--task-dtype", default="float32", choices=tuple(COMPUTE_DTYPES),
                        help="--tasks: dtype the model scores in (bfloat16: 1.2-1.8x faster on a CPU with "
                             "AVX512-BF16 in our runs, and on GPUs; on a CPU without AVX-512 its products run "
                             "as float32 GEMMs of the bfloat16 values); perplexity and KL always run in float32")
    parser.add_argument("--chat-template", action="store_true",
                        help="gsm8k: render the 8-shot prompt as a multi-turn chat with the tokenizer's template "
                             "(instruct models; lm-eval's --apply_chat_template --fewshot_as_multiturn)")
    parser.add_argument("--device", default="cpu",
                        help="where the models run: cpu, cuda or cuda:N (compare: also where calibrated methods "
                             "quantize)")


def _eval_settings(args: argparse.Namespace):
    from unibcq.eval.suite import EvalSettings

    return EvalSettings.from_flags(args.ppl, args.tasks, seq_len=args.seq_len, max_windows=args.max_windows,
                                   limit=args.limit, mmlu_shots=args.mmlu_shots, batch_size=args.batch_size,
                                   task_dtype=args.task_dtype, data_dir=args.data_dir,
                                   chat_template=args.chat_template)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UnibcqError(f"{flag} takes comma-separated integers, got {text!r}") from None


# quantize flags -> the QuantConfig setting each one sets (methods.registry.SETTING_READERS says who reads it)
SETTING_FLAGS = {
    "--symmetric": "symmetric", "--float-zero": "integer_zero", "--clip-search": "clip_search", "--no-offset": "offset",
    "--iters": "iters", "--init": "init", "--algorithm": "algorithm", "--max-groups": "max_groups", "--lambda": "lam",
    "--raw-lambda": "normalize_lambda", "--window": "window", "--granularity": "granularity",
    "--dp-atom-size": "dp_atom_size", "--refine-sweeps": "refine_sweeps", "--merge-rule": "merge_rule",
    "--damp": "damp", "--calib": "calib", "--calib-samples": "calib_samples", "--seq-len": "calib_seq_len",
    "--seed": "seed", "--epochs": "epochs", "--u-lr": "u_lr", "--batch-size": "batch_size",
    "--input-prob": "input_prob", "--b-lr": "b_lr", "--remap-every": "remap_every", "--grid-points": "grid_points",
    "--mapping": "mapping", "--shift": "shift",
}


def flag_methods() -> dict[str, tuple[str, ...]]:
    """quantize flags -> the methods that read them (--act-order and --true-sequential, refused
    outside GPTQ, are not among them)."""
    from unibcq.methods.registry import CALIBRATED, METHODS, PER_MATRIX_METHODS, SETTING_READERS

    return {
        **{flag: SETTING_READERS[setting] for flag, setting in SETTING_FLAGS.items()},
        **{flag: tuple(sorted(CALIBRATED)) for flag in ("--preset", "--resume")},
        **{flag: tuple(PER_MATRIX_METHODS) for flag in ("--workers", "--backend")},
        "--group-size": tuple(method for method in METHODS if method != "dyngroup"),
    }


def unread_flags(method: str, argv: Sequence[str]) -> list[str]:
    """The flags given in `argv` that `method` never reads. They are reported, not refused:
    scripts pass one flag set to every method they loop over."""
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return [flag for flag, methods in flag_methods().items() if flag in given and method not in methods]


def _check_workers(workers: int, backend: str = "local") -> None:
    """Refuse a worker count below 1 before any work (compare would otherwise find out only at its
    first quantized cell, after evaluating the unquantized model); note one above the CPUs, whose
    local processes only take turns (and each holds its own copies)."""
    if workers < 1:
        raise UnibcqError(f"--workers must be an integer >= 1, got {workers}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:  # before the model loads, not after
        raise UnibcqError("--backend ray needs Ray: pip install 'unibcq[ray]'")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if backend == "local" and workers > cpus:
        print(f"unibcq: note: --workers {workers} exceeds the {cpus} CPUs this process may use; the extra "
              "workers only take turns and slow the run", file=sys.stderr)


def _quant_config(args: argparse.Namespace) -> QuantConfig:
    """The validated config that quantize's flags and --preset describe; flags the method does
    not read are named in a note, since a user who passed them expected an effect."""
    from unibcq.config import QuantConfig
    from unibcq.methods import METHODS
    from unibcq.methods.presets import apply_preset, preset_values

    unread = unread_flags(args.method, getattr(args, "argv", [])) if args.method in METHODS else []
    if unread:
        print(f"unibcq: note: {args.method} does not read {', '.join(unread)}; ignored", file=sys.stderr)
    preset = preset_values(args.preset, {
        "calib_samples": args.calib_samples, "seq_len": args.seq_len, "epochs": args.epochs, "u_lr": args.u_lr,
        "b_lr": args.b_lr, "remap_every": args.remap_every, "grid_points": args.grid_points,
        "batch_size": args.batch_size, "input_prob": args.input_prob, "iters": args.iters,
    })
    return apply_preset(QuantConfig(
        method=args.method, bits=args.bits, group_size=args.group_size,
        symmetric=args.symmetric, clip_search=args.clip_search, integer_zero=args.integer_zero, offset=args.offset,
        iters=args.iters if args.iters is not None else 15,
        init=args.init, include_lm_head=args.quantize_lm_head,
        overrides=_parse_overrides(args.override), seed=args.seed,
        algorithm=args.algorithm, max_groups=args.max_groups, lam=args.lam, window=args.window,
        granularity=args.granularity, normalize_lambda=not args.raw_lambda, dp_atom_size=args.dp_atom_size,
        refine_sweeps=args.refine_sweeps, merge_rule=args.merge_rule, damp=args.damp, act_order=args.act_order,
        true_sequential=args.true_sequential,
        mapping=args.mapping, shift=args.shift,
    ), preset, args.calib).validate()


def cmd_quantize(args: argparse.Namespace) -> None:
    from unibcq.checkpoint import check_output_dir, save_checkpoint
    from unibcq.data import calibration_windows
    from unibcq.data.sources import CALIB, check_source
    from unibcq.methods import CALIBRATED, quantize_model
    from unibcq.models import load_model, load_tokenizer, resolve_model

    from unibcq.memory import MemoryCap, MemoryCapExceeded
    from unibcq.methods.presets import cap_calibration_length
    from unibcq.methods.run_state import RunState, state_dir_for
    from unibcq.methods.streaming import parse_memory
    from unibcq.models.loading import check_supported, context_window_of

    _check_workers(args.workers, args.backend)
    budget = parse_memory(args.max_memory) if args.max_memory is not None else None  # "" too: not no budget
    config = _quant_config(args)
    calibrated = config.method in CALIBRATED
    if args.spill_activations and not calibrated:
        raise UnibcqError(f"--spill-activations is for calibrated methods; {config.method} keeps no activations")
    if check_device(args.device).type != "cpu" and not calibrated:
        more = "" if args.max_memory is not None else " (--workers N for more cores)"
        print(f"unibcq: note: {config.method} quantizes each matrix on the CPU{more}; "
              f"--device {args.device} places calibrated methods' blocks", file=sys.stderr)
    out = Path(args.out).expanduser()  # --out=~/x reaches us unexpanded
    check_output_dir(out, args.overwrite, args.model)
    source = resolve_model(args.model)
    save_dtype = _save_dtype(args)
    if args.max_memory is not None and not calibrated:
        return _quantize_streaming(args, config, source, out, save_dtype, budget)  # checks the architecture itself
    check_supported(args.model)
    if calibrated:  # a missing calibration file or unreachable dataset, before the model loads
        check_source(args.calib, CALIB, args.data_dir)
    # Before the memory estimate, which depends on it; an explicit --seq-len past the context is refused instead.
    replaced = (cap_calibration_length(config, context_window_of(args.model))
                if calibrated and args.seq_len is None else None)
    if replaced is not None:
        print(f"unibcq: note: the preset's {replaced}-token calibration windows exceed the model's context; "
              f"using {config.calib_seq_len}", file=sys.stderr)
    start = time.perf_counter()
    model, onload, spill = _onload_within_budget(config, source, budget) if budget is not None else (
        load_model(args.model), None, False)
    spill = spill or args.spill_activations
    tokenizer = load_tokenizer(args.model)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    windows = (calibration_windows(tokenizer, args.calib, config.calib_samples, config.calib_seq_len, args.seed,
                                   args.data_dir) if calibrated else None)
    state_dir = state_dir_for(out) if calibrated else None
    earlier_seconds = RunState.committed_seconds(state_dir) if calibrated and args.resume else 0.0
    cap = MemoryCap(budget) if budget is not None else None
    try:
        if cap is not None:
            cap.check("loading the model and the calibration text")
        records = quantize_model(model, config, windows, show_progress=not args.no_progress, workers=args.workers,
                                 device=args.device, state_dir=state_dir, resume=args.resume, backend=args.backend,
                                 onload=onload, spill_activations=spill, memory_cap=cap)
    except MemoryCapExceeded as exc:
        raise UnibcqError(f"{exc}; the finished blocks are kept in {state_dir}: rerun with --resume and a larger "
                          "--max-memory, fewer --calib-samples, a shorter --seq-len or --spill-activations") from exc
    seconds = time.perf_counter() - start + (earlier_seconds if calibrated else 0.0)
    save_checkpoint(model, out, config, source_spec(args.model), tokenizer, overwrite=args.overwrite,
                    extra={"quantize_seconds": round(seconds, 3)}, dtype=save_dtype)
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    _report_quantize(args, config, records, out, f"in {seconds:.1f} s (load {load_seconds:.1f} s)", seconds, {})


def _save_dtype(args: argparse.Namespace) -> torch.dtype:
    """--save-dtype as a torch dtype; `auto` reads the source's config, before any weight loads."""
    from unibcq.checkpoint import DENSE_DTYPES
    from unibcq.models.loading import declared_dtype

    return declared_dtype(args.model) if args.save_dtype == "auto" else DENSE_DTYPES[args.save_dtype]


def _report_quantize(args: argparse.Namespace, config, records, out: Path, timing: str, seconds: float,
                     extra: dict[str, Any]) -> None:
    """The per-layer summary table, the closing line and the --json report of a quantize run."""
    from unibcq.checkpoint import checkpoint_info
    from unibcq.progress import print_table

    peak_mib = peak_rss_mib()
    info = checkpoint_info(out)
    if config.method == "dyngroup":
        print_table(
            f"dyngroup {config.algorithm} G<={config.max_groups} lambda {config.lam} ({config.granularity})",
            ["layer", "groups", "bits paper", "bits fixed", "bits entropy", "bits stored", "rel. error", "seconds"],
            [(r.name, layer_groups(r), r.accounting["bits_per_weight_paper"], r.accounting["bits_per_weight_fixed"],
              r.accounting["bits_per_weight_entropy"], r.bits_per_weight, r.rel_error, _or_dash(r.seconds))
             for r in records],
        )
    else:
        print_table(
            f"{config.method} w{config.bits} g{config.group_size}",
            ["layer", "bits", "group", "bits/weight", "rel. error", "seconds"],
            [(r.name, r.bits, r.group_size, r.bits_per_weight, r.rel_error, _or_dash(r.seconds)) for r in records],
        )
    mean_err = sum(r.rel_error * r.numel for r in records) / sum(r.numel for r in records)
    budget = f" of a {extra['max_memory_mib']:.0f} MiB budget" if "max_memory_mib" in extra else ""
    print(
        f"quantized {len(records)} layers ({info.quantized_params:,} weights) {timing}; "
        f"{info.bits_per_weight:.3f} bits/weight; weighted rel. error {mean_err:.4f}; "
        f"checkpoint {info.file_bytes / 2**20:.1f} MiB -> {out}; peak memory {peak_mib:.0f} MiB{budget}"
    )
    if args.json:
        write_json_atomic(args.json, {
            "out": str(out), "config": config.recorded(), "seconds": seconds,
            "bits_per_weight": info.bits_per_weight, "file_bytes": info.file_bytes, "peak_rss_mib": peak_mib,
            **extra, "layers": [vars(r) for r in records],
        }, portable=True)


def _onload_within_budget(config, source, budget: int):
    """(model with its blocks left on disk, block loader, spill activations?) once the budget is checked.

    Activations are spilled to disk only when they are what makes the run exceed the budget.
    """
    from unibcq.methods.onload import memory_estimate, onload_model
    from unibcq.models.loading import snapshot_dir

    model, onload = onload_model(snapshot_dir(source))
    workload = (config.method, config.calib_samples, config.calib_seq_len, config.bits)
    needed = memory_estimate(model, *workload, batch_size=config.batch_size)
    if needed <= budget:
        return model, onload, False
    spilled = memory_estimate(model, *workload, spill=True, batch_size=config.batch_size)
    if spilled > budget:
        raise UnibcqError(
            f"--max-memory {budget / 2**30:.2f} GiB is too small for {config.method} on this model: one block's "
            f"training state and the packed output need about {spilled / 2**30:.2f} GiB even with the "
            "calibration activations on disk; raise it or use fewer --calib-samples / a shorter --seq-len"
        )
    print(f"unibcq: note: calibration activations go to disk ({(needed - spilled) / 2**30:.2f} GiB less in memory) "
          f"to stay within --max-memory {budget / 2**30:.2f} GiB", file=sys.stderr)
    return model, onload, True


def _quantize_streaming(args: argparse.Namespace, config, source, out: Path, save_dtype: torch.dtype,
                        budget: int) -> None:
    """`quantize --max-memory`: the streaming path for models larger than memory."""
    from unibcq.methods.streaming import quantize_streaming
    from unibcq.models.loading import snapshot_dir

    if args.workers != 1 or args.backend != "local":
        raise UnibcqError("--max-memory runs one weight at a time in this process; drop --workers and --backend")
    start = time.perf_counter()
    records = quantize_streaming(snapshot_dir(source), out, config, source_spec(args.model), budget,
                                 overwrite=args.overwrite, show_progress=not args.no_progress, dtype=save_dtype)
    seconds = time.perf_counter() - start
    _report_quantize(args, config, records, out, f"streamed in {seconds:.1f} s", seconds,
                     {"max_memory_mib": budget / 2**20})


def peak_rss_mib() -> float:
    """Peak resident memory of this process or its largest worker, in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


def layer_groups(record) -> int:
    """Groups of a dyngroup layer, recovered from its paper-count bits (1 + 16 G / N)."""
    return round((record.accounting["bits_per_weight_paper"] - 1) * record.numel / 16)


def _load_for_eval(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, bits_per_weight, default KL reference) for a checkpoint or a model,
    its unquantized tensors in `dtype`."""
    from unibcq.checkpoint import (
        QUANT_KEY, checkpoint_info, has_unibcq_weights, is_checkpoint, load_checkpoint, read_config,
    )
    from unibcq.finite import refuse_nonfinite_model
    from unibcq.models import load_model, load_tokenizer
    from unibcq.models.loading import declared_dtype

    # A checkpoint whose config.json is damaged is still recognised by its weights' header,
    # so the checkpoint loader reports what is wrong with it.
    if is_checkpoint(spec) or has_unibcq_weights(spec):
        source = read_config(spec)[QUANT_KEY].get("source_model")
        # Evaluation computes in float32 like the reference model, whatever the checkpoint stores.
        model = load_checkpoint(spec, dtype=dtype)
        has_tokenizer = (Path(spec) / "tokenizer_config.json").is_file()
        if not has_tokenizer and not source:
            raise UnibcqError(f"{spec} has no tokenizer and no source model to take one from")
        try:
            tokenizer = load_tokenizer(spec if has_tokenizer else source)
        except UnibcqError as err:
            if has_tokenizer:
                raise
            raise UnibcqError(f"{spec} holds no tokenizer, and its recorded source model {source!r}, which would "
                              f"supply one, cannot be loaded ({err}); save the tokenizer into the checkpoint "
                              "(tokenizer.save_pretrained(DIR))") from None
        return model, tokenizer, checkpoint_info(spec).bits_per_weight, source
    model = refuse_nonfinite_model(load_model(spec, dtype), spec)
    bits = float(torch.finfo(declared_dtype(spec)).bits)  # as published (a bfloat16 model is 16), not as computed
    return model, load_tokenizer(spec), bits, None


def _note_a_changed_source(checkpoint: str, source: str) -> None:
    """KL against the checkpoint's source model only means something if those are still the
    weights it was quantized from; a path holds no identity, so its files' record is compared."""
    from unibcq.checkpoint import QUANT_KEY, read_config
    from unibcq.models.fingerprint import files_fingerprint

    stored = read_config(checkpoint)[QUANT_KEY].get("source_files")
    now = files_fingerprint(source)
    if stored is not None and now is not None and json.loads(json.dumps(now)) != stored:
        print(f"unibcq: note: the files of {source}, the default KL reference, changed (size or modification "
              "time) since this checkpoint was quantized from them; KL compares against what is there now",
              file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    from unibcq.eval.suite import evaluate_suite
    from unibcq.eval.tasks import SUMMARY_COLUMNS, summary_rows
    from unibcq.finite import refuse_nonfinite_model
    from unibcq.models import load_model
    from unibcq.models.architectures import context_window
    from unibcq.progress import print_table

    settings = _eval_settings(args)
    if not settings.datasets and args.kl_ref is not None and args.kl_ref.lower() != "none":
        raise UnibcqError("--kl-ref applies to perplexity (KL is measured on its windows), and --ppl none skips it")
    settings.check()
    device = check_device(args.device)
    model, tokenizer, bits, default_ref = _load_for_eval(args.model)
    ref_spec = default_ref if args.kl_ref is None else (None if args.kl_ref.lower() == "none" else args.kl_ref)
    ref_spec = ref_spec if settings.datasets else None  # KL is measured on the perplexity windows only
    if ref_spec and args.kl_ref is None and Path(ref_spec).is_absolute() and not Path(ref_spec).exists():
        raise UnibcqError(f"the checkpoint's source model {ref_spec}, the default KL reference, is gone; pass "
                          "--kl-ref MODEL (where it is now) or --kl-ref none")
    if ref_spec and ref_spec == default_ref:
        _note_a_changed_source(args.model, ref_spec)
    try:
        ref_dtype = (_reference_dtype(ref_spec, device, _journal_reference_dtype(args, settings, ref_spec))
                     if ref_spec else None)
        ref_model = refuse_nonfinite_model(load_model(ref_spec, ref_dtype), ref_spec).to(device) if ref_spec else None
    except UnibcqError as err:
        if args.kl_ref is not None or not ref_spec:
            raise
        raise UnibcqError(f"the checkpoint's recorded source model {ref_spec!r}, the default KL reference, cannot "
                          f"be loaded ({err}); pass --kl-ref MODEL or --kl-ref none") from None
    if ref_model is not None:
        ours, theirs = (m.get_output_embeddings().out_features for m in (model, ref_model))
        if ours != theirs:
            raise UnibcqError(f"the KL reference {ref_spec} predicts {theirs} tokens and {args.model} {ours}: KL needs "
                              "the same vocabulary; pass the model it was quantized from, or --kl-ref none")
    # Windows fit both the model and its KL reference; capped before the journal is keyed.
    contexts = {whose: context_window(getattr(m, "config", None))
                for whose, m in (("model's", model), ("KL reference's", ref_model)) if m is not None}
    known = {whose: c for whose, c in contexts.items() if c is not None}
    whose = min(known, key=known.get) if known else None
    capped = settings.capped_to(known[whose] if whose else None)
    if capped is not settings:
        print(f"unibcq: note: the {whose} context holds {capped.seq_len} positions; perplexity windows are capped "
              f"there (--seq-len {settings.seq_len})", file=sys.stderr)
        settings = capped
    model.to(device)
    journal = _eval_journal(args, settings, ref_spec, ref_dtype)
    measured = evaluate_suite(model, tokenizer, settings, ref_model, show_progress=not args.no_progress,
                              journal=journal)
    report = {"model": args.model, "ref_model": ref_spec, "ref_dtype": ref_dtype and str(ref_dtype).removeprefix("torch."),
              "bits_per_weight": bits, **measured,
              "settings": settings.record() | {"data_dir": settings.journal_key()["data_dir"], "device": args.device}}
    tasks = report["tasks"]
    per_ref = {key: report[key] or {} for key in ("ref_ppl", "kl", "top1")}
    rows = [(name, report["windows"][name], report["tokens"][name], ppl,
             *(_or_dash(per_ref[key].get(name)) for key in ("ref_ppl", "kl", "top1")))
            for name, ppl in report["ppl"].items()]
    if rows:
        print_table(f"{args.model} (seq_len {report['seq_len']}, {bits:.3f} bits/weight)",
                    ["dataset", "windows", "tokens", "ppl", "ref ppl", "KL vs ref", "top-1 agree"], rows)
    if tasks is not None:
        print_table(f"{args.model} tasks (limit {args.limit or 'none'}, {bits:.3f} bits/weight)",
                    SUMMARY_COLUMNS, summary_rows(tasks))
    if args.json:
        write_json_atomic(args.json, report, portable=True)
    if journal is not None:
        journal.remove()


# Share of the available memory the KL reference may take in float32 (the rest is for the
# activations, the logits of a window and the quantized model's dense cache).
REFERENCE_MEMORY_SHARE = 0.8


def _reference_dtype(ref_spec: str, device: torch.device, earlier: torch.dtype | None = None) -> torch.dtype:
    """float32 when the KL reference fits in memory that way; else the 16-bit dtype it is
    published in (a 7B reference is 27 GB in float32, 13.5 GB as published); else an error
    before anything loads, rather than a process killed for memory half-way. Memory is the
    host's, and the GPU's too with --device cuda. `earlier` (the dtype an interrupted run of
    the same evaluation used) is kept when it fits, so its finished pieces stay valid."""
    from unibcq import memory
    from unibcq.models.loading import declared_dtype, float32_bytes

    needed = float32_bytes(ref_spec)
    places = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    free = [memory.available_memory_bytes(place) for place in places]
    available = min((f for f in free if f is not None), default=None)
    if needed is None or available is None:
        return earlier or torch.float32
    room = available * REFERENCE_MEMORY_SHARE
    published = declared_dtype(ref_spec)
    halved = published != torch.float32 and needed // 2 <= room
    if earlier is not None and (needed <= room or (earlier == published and halved)):
        return earlier
    if needed <= room:
        return torch.float32
    gib = f"{needed / 2**30:.1f} GiB in float32 and {available / 2**30:.1f} GiB is available"
    if halved:
        print(f"unibcq: note: the KL reference {ref_spec} needs {gib}; it runs in "
              f"{str(published).removeprefix('torch.')}, as published", file=sys.stderr)
        return published
    raise UnibcqError(f"the KL reference {ref_spec} needs {gib}; pass --kl-ref none to measure perplexity "
                      "alone, or a reference model that fits")


def _journal_key(args: argparse.Namespace, settings: EvalSettings, ref_spec: str | None,
                 ref_dtype: torch.dtype | None) -> dict[str, Any]:
    """What an evaluation's finished pieces depend on (see `EvalJournal`)."""
    from unibcq.models.fingerprint import files_fingerprint

    key = settings.journal_key() | {
        "model": source_spec(args.model), "model_files": files_fingerprint(args.model),
        "kl_ref": ref_spec and source_spec(ref_spec), "kl_ref_files": ref_spec and files_fingerprint(ref_spec)}
    if ref_dtype not in (None, torch.float32):  # a float32 reference keeps the key journals always had
        key["kl_ref_dtype"] = str(ref_dtype)
    return key


def _journal_reference_dtype(args: argparse.Namespace, settings: EvalSettings, ref_spec: str) -> torch.dtype | None:
    """The reference dtype an interrupted run of this same evaluation used, if one left a journal."""
    from unibcq.eval.journal import EvalJournal

    if not args.json:
        return None
    stored = EvalJournal.stored_protocol(Path(f"{args.json}.partial"))
    if stored is None:
        return None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if stored == json.loads(json.dumps(_journal_key(args, settings, ref_spec, dtype), default=str)):
            return dtype
    return None


def _eval_journal(args: argparse.Namespace, settings: EvalSettings, ref_spec: str | None,
                  ref_dtype: torch.dtype | None) -> EvalJournal | None:
    """With --json PATH, finished pieces go to PATH.partial so a killed eval resumes there."""
    from unibcq.eval.journal import EvalJournal

    if not args.json:
        return None
    return EvalJournal(Path(f"{args.json}.partial"), _journal_key(args, settings, ref_spec, ref_dtype))


def _or_dash(value: Any) -> Any:
    return "-" if value is None else value


def cmd_compare(args: argparse.Namespace) -> None:
    import shlex

    from unibcq.models import resolve_model
    from unibcq.progress import print_table
    from unibcq.report import CompareSettings, run_compare
    from unibcq.report.render import dataset_label, task_names, zero_shot_mean

    _check_workers(args.workers)
    settings = CompareSettings(
        model=args.model, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        bits=_int_list(args.bits, "--bits"), group_size=args.group_size, out=Path(args.out),
        evaluation=_eval_settings(args), preset=args.preset, calib=args.calib, seed=args.seed, workers=args.workers,
        device=args.device, command=shlex.join(["unibcq", *map(str, args.argv)]),
    )
    check_device(args.device)
    resolve_model(args.model)
    results = run_compare(settings, show_progress=not args.no_progress)
    _note_unreported_checkpoints(settings)
    first = settings.evaluation.datasets[0] if settings.evaluation.datasets else None
    tasks = task_names(results)
    print_table(f"{args.model}: methods compared (report: {settings.out / 'report.md'})",
                ["name", "bits/weight", f"ppl {dataset_label(first) if first else '-'}", "KL vs FP", "zero-shot mean",
                 *(["mmlu"] if "mmlu" in tasks else [])],
                [(r["name"], r["bits_per_weight"], _or_dash(r["ppl"].get(first)), _or_dash(r.get("kl_vs_ref")),
                  _or_dash(zero_shot_mean(r)),
                  *([_or_dash(((r.get("tasks") or {}).get("mmlu") or {}).get("acc"))] if "mmlu" in tasks else []))
                 for r in results])


def _note_unreported_checkpoints(settings: CompareSettings) -> None:
    """A reused --out folder can hold checkpoints this report does not include; say which, and
    whose, since they take disk space and `compare` never deletes a user's checkpoints."""
    from unibcq.report.compare import plan_cells, unreported_checkpoints

    cells = plan_cells(settings.methods, settings.bits, settings.group_size)
    left = unreported_checkpoints(settings.out, cells)
    if left:
        names = ", ".join(name if source == settings.model else f"{name} (of {source})" for name, source in left)
        print(f"unibcq: note: {settings.out / 'checkpoints'} also holds checkpoints this report leaves out: {names}; "
              "delete them if they are not needed", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    from unibcq.checkpoint import QUANT_KEY, checkpoint_info, read_config
    from unibcq.progress import print_table

    info = checkpoint_info(args.path)
    qcfg = read_config(args.path)[QUANT_KEY]
    report = info.to_dict() | {"source_model": qcfg.get("source_model"), "quantize_seconds": qcfg.get("quantize_seconds")}
    if args.layers:
        print_table("layers", ["layer", "bits", "group", "bits/weight", "bytes"],
                    [(n, s.get("bits", "-"), s.get("group_size", s.get("granularity", "-")), s["bits_per_weight"],
                      s["bytes"]) for n, s in info.layers.items()])
    print_table(str(args.path), ["metric", "value"], [
        ("method", info.method), ("bits", info.bits),
        ("group_size", "dynamic (unstructured groups)" if info.method == "dyngroup" else info.group_size),
        ("bits_per_weight (what the file stores: codes + scales + offsets + indices)", info.bits_per_weight),
        *[(f"{k} (paper: no index)" if k.endswith("paper") else k, v) for k, v in info.accounting().items()],
        ("quantized_params", f"{info.quantized_params:,}"), ("quantized MiB", info.quantized_bytes / 2**20),
        ("dense (unquantized) params", f"{info.dense_params:,}"), ("dense MiB", info.dense_bytes / 2**20),
        ("dense dtype", info.dense_dtype),
        ("file MiB", info.file_bytes / 2**20), ("source_model", report["source_model"]),
    ])
    if args.json:
        write_json_atomic(args.json, report, portable=True)


def cmd_generate(args: argparse.Namespace) -> None:
    from unibcq.generate import check_generation_options, generate_text

    check_generation_options(args.max_new_tokens, args.temperature)
    device, dtype = check_device(args.device), compute_dtype(args.dtype, "--dtype")
    model, tokenizer, bits, _ = _load_for_eval(args.model, dtype)
    model.to(device)
    result = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, chat=args.chat,
                           temperature=args.temperature, seed=args.seed, on_text=_write_stdout)
    print(result.summary())
    if result.max_new_tokens < args.max_new_tokens:
        print(f"unibcq: note: the model's context window ends {result.max_new_tokens} tokens after the prompt; "
              f"--max-new-tokens {args.max_new_tokens} was capped there", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "prompt": args.prompt, "bits_per_weight": bits,
                                      "requested_max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                      "seed": args.seed, "device": str(device), "dtype": args.dtype,
                                      **result.to_dict()}, portable=True)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_bench(args: argparse.Namespace) -> None:
    {"dyngroup": _bench_dyngroup, "kernels": _bench_kernels}[args.bench](args)


def _parse_shape(text: str) -> tuple[int, int]:
    """'4096x11008' -> (4096, 11008)."""
    out_features, sep, in_features = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(out_features), int(in_features)
    except ValueError:
        raise UnibcqError(f"--shape {text!r}: expected OUTxIN, e.g. 4096x11008") from None


def _bench_kernels(args: argparse.Namespace) -> None:
    from unibcq.bench import kernels
    from unibcq.progress import print_table

    shapes = [_parse_shape(s) for s in args.shape] if args.shape else list(kernels.DEFAULT_SHAPES)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    device = check_device(args.device)
    entries = kernels.benchmark_kernels(shapes, args.bits or kernels.DEFAULT_BITS,
                                        args.batch or kernels.DEFAULT_BATCHES, args.group_size, backends,
                                        args.repeats, show_progress=not args.no_progress, device=device,
                                        input_dtype=getattr(torch, args.input_dtype))
    order = {shape: i for i, shape in enumerate(dict.fromkeys(tuple(e["shape"]) for e in entries))}
    timed = sorted((e for e in entries if e["seconds"] is not None),
                   key=lambda e: (order[tuple(e["shape"])], e["batch"], e["bits"] or 0))
    bandwidth = entries[0]["bandwidth_gbps"]
    print_table(
        f"bcq_matmul backends vs dense ({device.type}, threads {entries[0]['threads']}, group {args.group_size}, "
        f"{args.input_dtype} inputs, copy bandwidth {bandwidth:.1f} GB/s)",
        ["shape", "batch", "bits", "backend", "ms", "vs fp32", "GB/s", "% of copy"],
        [("x".join(map(str, e["shape"])), e["batch"], e["bits"] or "-", e["backend"], e["seconds"] * 1e3,
          _or_dash(e["speedup_vs_fp32"]), e["gbps"], 100 * e["gbps"] / bandwidth) for e in timed])
    # A backend that cannot run here (e.g. triton without a GPU) is named once, not on every row.
    skipped: dict[tuple[str, str], int] = {}
    for e in entries:
        if e["note"]:
            skipped[e["backend"], e["note"]] = skipped.get((e["backend"], e["note"]), 0) + 1
    for (backend, note), count in skipped.items():
        print(f"{backend}: {note} ({count} of the measurements)")
    if args.json:
        write_json_atomic(args.json, entries, portable=True)


def _bench_dyngroup(args: argparse.Namespace) -> None:
    from unibcq.bench.dyngroup import benchmark_dyngroup
    from unibcq.progress import print_table

    if args.rows < 1 or args.cols < 1:
        raise UnibcqError("--rows and --cols must be >= 1")
    entries = benchmark_dyngroup(args.rows, args.cols, args.max_groups, args.lam, args.window,
                                 args.with_greedy, not args.no_real)
    print_table("dyngroup solvers (1 thread)", ["matrix", "algorithm", "dp atoms", "seconds", "objective",
                                                 "groups", "vs dp"],
                [(e["matrix"], e["algorithm"], e["dp_atom_size"] or "-", e["seconds"], e["objective"], e["groups"],
                  e["ratio_to_dp"]) for e in entries])
    if args.json:
        write_json_atomic(args.json, entries, portable=True)


def _model_files(folder: Path) -> set[str]:
    """The names in a model or checkpoint folder that loading reads: its manifest's list where it
    has one, else weights, configs and tokenizer files (reports kept beside them are not)."""
    from unibcq.checkpoint import MANIFEST_FILE, listed_files
    from unibcq.models.fingerprint import MODEL_FILE_NAMES, MODEL_FILE_SUFFIXES

    names = {MANIFEST_FILE, "generation_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "chat_template.jinja", "model.safetensors.index.json"}
    names |= listed_files(folder) or set()
    for path in folder.iterdir():
        if path.suffix in MODEL_FILE_SUFFIXES or path.name in MODEL_FILE_NAMES or path.name.startswith("tokenizer"):
            names.add(path.name)
    return names


def _refuse_json_over_inputs(args: argparse.Namespace) -> None:
    """--json must not replace a file the command reads (a data file, a model's weights, config or
    manifest), nor land inside the --out folder being written, whose files it would clobber."""
    from unibcq.checkpoint import QUANT_KEY, is_checkpoint, read_config

    read = [getattr(args, name, None) for name in ("model", "path", "kl_ref", "calib")]
    read += (getattr(args, "ppl", None) or "").split(",")
    for checkpoint in [name for name in read[:2] if name and is_checkpoint(name)]:
        try:  # the default KL reference, and the tokenizer source of a checkpoint without one
            read.append(read_config(checkpoint)[QUANT_KEY].get("source_model"))
        except UnibcqError:
            pass
    paths = [Path(name).expanduser().resolve() for name in read if name and name != "none"]
    target = Path(args.json).expanduser().resolve()
    out = Path(args.out).expanduser().resolve() if getattr(args, "out", None) else None
    clash = next((path for path in paths if path == target), None)
    if clash is None and out is not None and (out == target or out in target.parents):
        clash = out
    folder = target.parent
    if clash is None and folder in paths and folder.is_dir() and target.name in _model_files(folder):
        clash = target
    if clash is not None:
        raise UnibcqError(f"--json {args.json} would overwrite {clash}, which this command reads or writes; "
                          "choose another path")


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "info": cmd_info,
            "generate": cmd_generate, "bench": cmd_bench}


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """`kill` and `timeout` send SIGTERM, which would end the process without unwinding: temporary
    folders would stay behind. Raised as an interrupt, it runs every cleanup that Ctrl-C runs."""
    raise KeyboardInterrupt("SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return _main(argv)
    finally:
        if previous is not None:  # None: a handler installed outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    import transformers
    from huggingface_hub.utils import logging as hub_logging

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Offline, a Hub id is retried with a warning a line; what failed is said once, in our error.
    hub_logging.set_verbosity_error()
    try:
        if getattr(args, "json", None):
            check_writable(args.json, "--json")
            _refuse_json_over_inputs(args)
        if args.command in ("quantize", "compare"):
            check_writable(args.out, "--out", directory=True)
        COMMANDS[args.command](args)
    except UnibcqError as exc:
        print(f"unibcq: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:
        # The machine refused a read or write (disk full, no permission, a file vanished): one line,
        # not a traceback. Atomic writes have removed their temporaries by now.
        print(f"unibcq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        from unibcq.methods import CALIBRATED

        terminated = exc.args == ("SIGTERM",)
        resumable = args.command == "quantize" and args.method in CALIBRATED
        print(f"unibcq: {'terminated' if terminated else 'interrupted'}"
              + ("; the same command with --resume continues from the last finished block" if resumable else ""),
              file=sys.stderr)
        return 143 if terminated else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
