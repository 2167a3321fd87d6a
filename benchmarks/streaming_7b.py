"""Quantize a model larger than this machine's memory: a synthetic Llama, streamed or onloaded.

Writes a Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32 layers, vocab 32000) with
random fp16 weights as sharded safetensors (~13.5 GB; its fp32 form would be ~27 GB), then
runs `unibcq quantize ... --max-memory BUDGET` on it for each method and reports the
process's peak resident memory against the budget. Per-matrix methods stream one weight at
a time; calibrated ones (gptq, uniquanf, ...) read one decoder block at a time and take
calibration text through `--calib-args`, so the model gets a real tokenizer (`--tokenizer`,
whose vocabulary size it adopts). Nothing here is committed: the model and the checkpoints
live under --work.

    .venv/bin/python benchmarks/streaming_7b.py --work /tmp/s7b --budget 6GiB --methods rtn
    UNIBCQ_DATA_DIR=../shared/datasets .venv/bin/python benchmarks/streaming_7b.py --work /tmp/s2b \
        --layers 16 --hidden 2048 --intermediate 5504 --tokenizer smollm2-135m --budget 3GiB \
        --methods uniquanf --calib-args "--calib-samples 8 --seq-len 128 --epochs 1"

`--layers`, `--hidden` and `--intermediate` shrink the model for a quicker run.
`--eval-tokens N` then evaluates each checkpoint in a fresh process (perplexity of one
window of N random token ids, float32 compute, the way `unibcq eval` loads it) and reports
that process's peak memory: the packed model plus the dense copies of as many layers as
half the available memory holds. `--reuse` keeps checkpoints a previous run wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from unibcq.progress import print_table

SHARD_BYTES = 2 * 2**30


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                       max_position_embeddings=4096, dtype="float16", tie_word_embeddings=False)


def tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, m = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}.mlp.gate_proj.weight"] = (m, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (m, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, m)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def write_model(folder: Path, cfg: LlamaConfig, tokenizer=None, seed: int = 0) -> Path:
    """Random fp16 weights (std 0.02, norms 1) in ~2 GB shards, one shard in memory at a time."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map, held, files = {}, 0, []

    def flush() -> None:
        name = f"shard-{len(files):05d}.safetensors"
        save_file(shards[0], str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shards[0]})
        shards[0] = {}

    for key, shape in tensor_shapes(cfg).items():
        tensor = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02).half()
        if shards[0] and held + tensor.numel() * 2 > SHARD_BYTES:
            flush()
            held = 0
        shards[0][key] = tensor
        held += tensor.numel() * 2
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the synthetic model and the checkpoints")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--tokenizer", help="copy this model's tokenizer (any unibcq MODEL) and use its vocabulary")
    parser.add_argument("--calib-args", default="", help="extra quantize flags for calibrated methods")
    parser.add_argument("--budget", default="6GiB")
    parser.add_argument("--methods", default="rtn")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=0, help="evaluate each checkpoint on N tokens (0: skip)")
    parser.add_argument("--reuse", action="store_true", help="keep checkpoints (and reports) a previous run wrote")
    parser.add_argument("--evaluate", help=argparse.SUPPRESS)  # the child process of --eval-tokens
    args = parser.parse_args()
    if args.evaluate:
        return evaluate_checkpoint(Path(args.evaluate), args.eval_tokens)
    work = Path(args.work)
    start = time.perf_counter()
    tokenizer = None
    vocab = 32000
    if args.tokenizer:
        from unibcq.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        vocab = len(tokenizer)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, vocab)
    name = f"llama-h{args.hidden}-m{args.intermediate}-{args.layers}l-v{vocab}"
    model_dir = write_model(work / name, cfg, tokenizer)
    print(f"synthetic model: {model_dir} ({sum(f.stat().st_size for f in model_dir.glob('*.safetensors')) / 2**30:.1f}"
          f" GiB fp16, written in {time.perf_counter() - start:.0f} s)")
    rows = []
    for method in args.methods.split(","):
        out = work / f"{method}-w{args.bits}g{args.group_size}"
        report = work / f"{method}.json"
        cmd = [sys.executable, "-m", "unibcq.cli", "quantize", str(model_dir), "--method", method, "--bits",
               str(args.bits), "--group-size", str(args.group_size), "--max-memory", args.budget, "--out", str(out),
               "--overwrite", "--no-progress", "--json", str(report), *shlex.split(args.calib_args)]
        start = time.perf_counter()
        if not (args.reuse and report.is_file() and (out / "config.json").is_file()):
            subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - start
        data = json.loads(report.read_text())
        if args.reuse:
            seconds = data["seconds"]
        row = (method, args.layers, args.budget, f"{data['peak_rss_mib']:.0f}", f"{data['bits_per_weight']:.3f}",
               f"{data['file_bytes'] / 2**30:.2f}", f"{seconds:.0f}")
        if args.eval_tokens:
            child = subprocess.run([sys.executable, __file__, "--work", str(work), "--evaluate", str(out),
                                    "--eval-tokens", str(args.eval_tokens)], check=True, capture_output=True, text=True)
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            row += (f"{measured['ppl']:.1f}", f"{measured['available_gib']:.1f}", f"{measured['peak_rss_mib']:.0f}",
                    f"{measured['seconds']:.0f}")
        rows.append(row)
    params = sum(math.prod(shape) for shape in tensor_shapes(cfg).values())
    columns = ["method", "layers", "budget", "peak RSS MiB", "bits/weight", "checkpoint GiB", "seconds"]
    if args.eval_tokens:
        columns += [f"eval ppl ({args.eval_tokens} tokens)", "eval: available GiB", "eval peak RSS MiB", "eval s"]
    print_table(f"quantization within a memory budget: {name} ({params / 1e9:.2f} B params, "
                f"{params * 4 / 2**30:.1f} GiB as fp32)", columns, rows)


def evaluate_checkpoint(path: Path, tokens: int) -> None:
    """Load `path` as `unibcq eval` does and score one window of random ids; print a JSON line."""
    import resource

    from unibcq import load
    from unibcq.eval import evaluate_windows
    from unibcq.memory import available_memory_bytes

    available = available_memory_bytes(torch.device("cpu")) or 0
    start = time.perf_counter()
    model = load(path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    stats = evaluate_windows(model, ids, seq_len=tokens, max_windows=1, show_progress=False)
    print(json.dumps({"ppl": stats.ppl, "seconds": time.perf_counter() - start, "available_gib": available / 2**30,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
