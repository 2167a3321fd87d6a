"""Weight error vs output error of quantized checkpoints: why lower MSE can mean worse perplexity.

For each checkpoint (all quantized from the same source model) and every quantized linear
layer this measures, on calibration windows that are not the evaluation text,

    weight error  ||W - Q||_F / ||W||_F
    output error  ||(W - Q) X||_F / ||W X||_F      (X: the layer's real inputs)

where X comes from the full-precision model (hooks on every linear layer). A method that
lowers the weight error but raises the output error spends its accuracy on weights the
activations do not care about, and loses the large weights that meet large activations.

Example:
    UNIBCQ_DATA_DIR=/work/shared/datasets .venv/bin/python benchmarks/output_error.py \\
        /tmp/bench/rtn-w3-g128 /tmp/bench/bcq-alternating-w3-g128
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from unibcq.checkpoint import QUANT_KEY, load_checkpoint, quantized_layers, read_config
from unibcq.data import calibration_windows
from unibcq.models import load_model, load_tokenizer
from unibcq.progress import print_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--calib", default="wikitext2")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--worst", type=int, default=8, help="also list the N layers where the methods differ most")
    args = parser.parse_args(argv)

    source = read_config(args.checkpoints[0])[QUANT_KEY]["source_model"]
    model, tokenizer = load_model(source), load_tokenizer(source)
    dense = {}
    for ckpt in args.checkpoints:
        layers = quantized_layers(load_checkpoint(ckpt))
        dense[ckpt.name] = {name: m.weight_tensor().dequantize() for name, m in layers.items()}
    names = list(next(iter(dense.values())))
    out_err: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            ref = x @ module.weight.float().T
            for ckpt, weights in dense.items():
                acc = out_err[ckpt][name]
                acc[0] += float((x @ (module.weight.float() - weights[name]).T).pow(2).sum())
                acc[1] += float(ref.pow(2).sum())
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    windows = calibration_windows(tokenizer, args.calib, args.samples, args.seq_len, seed=0)
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0))
    for handle in handles:
        handle.remove()

    rows, per_layer = [], {}
    for ckpt, weights in dense.items():
        w_num = w_den = o_sum = 0.0
        for name in names:
            w = model.get_submodule(name).weight.detach().float()
            w_num += float((w - weights[name]).pow(2).sum())
            w_den += float(w.pow(2).sum())
            num, den = out_err[ckpt][name]
            per_layer.setdefault(name, {})[ckpt] = (num / den) ** 0.5
            o_sum += (num / den) ** 0.5
        rows.append((ckpt, (w_num / w_den) ** 0.5, o_sum / len(names)))
    print_table(f"weight vs output error on {args.samples} x {args.seq_len} {args.calib} calibration tokens",
                ["checkpoint", "weight rel. error (all layers)", "output rel. error (mean over layers)"], rows)
    if len(dense) >= 2 and args.worst:
        a, b = list(dense)[:2]
        spread = sorted(names, key=lambda n: per_layer[n][b] - per_layer[n][a], reverse=True)[: args.worst]
        print_table(f"layers where {b} loses most to {a} (output rel. error)", ["layer", a, b],
                    [(n, per_layer[n][a], per_layer[n][b]) for n in spread])
    return 0


if __name__ == "__main__":
    sys.exit(main())
