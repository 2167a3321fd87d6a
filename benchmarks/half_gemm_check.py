"""How far bfloat16 scoring with float32 GEMMs lies from torch's bfloat16 and from float32.

Scores 16 x 128 tokens of WikiText-2 test with SmolLM2-135M in float32, in bfloat16 with
torch's products, and in bfloat16 under `half_linear_in_float32`, and prints each run's mean
NLL, the mean |difference| of per-token log-probabilities between runs and top-1 agreement.
Where torch has a fast bfloat16 GEMM (`native_half_gemm`) the last two runs are the same.

    UNIBCQ_DATA_DIR=../shared/datasets .venv/bin/python benchmarks/half_gemm_check.py
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from unibcq import load_model, load_tokenizer
from unibcq.compute_dtype import half_linear_in_float32
from unibcq.data.sources import eval_token_ids


def main() -> None:
    torch.set_num_threads(1)
    ids = eval_token_ids(load_tokenizer("smollm2-135m"), "wikitext2")[: 16 * 128].reshape(16, 128)
    model = load_model("smollm2-135m").eval()
    runs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name in ("float32", "bfloat16 torch", "bfloat16 float32-GEMM"):
            if name != "float32":
                model.to(torch.bfloat16)
            start = time.perf_counter()
            with half_linear_in_float32(model) if name.endswith("GEMM") else nullcontext():
                logits = model(ids).logits
            runs[name] = torch.log_softmax(logits.float(), -1)
            nll = -runs[name][:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
            print(f"{name:24s} mean NLL {nll:.5f}  {time.perf_counter() - start:.1f} s")
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = (runs[a] - runs[b]).abs().mean().item()
            agree = (runs[a].argmax(-1) == runs[b].argmax(-1)).float().mean().item()
            print(f"{a} vs {b}: mean |d log p| {diff:.4f}, top-1 agreement {agree:.4f}")


if __name__ == "__main__":
    main()
