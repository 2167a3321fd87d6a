"""The CLI on a CUDA GPU agrees with the CPU: quantization of calibrated methods, eval, compare.

Skipped where no GPU exists (CI never has one); the Triton kernel tests in
tests/test_kernels_triton.py also switch to CUDA tensors there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_cli import run
from unibcq.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _write_tasks(root: Path) -> Path:
    """PIQA (12 items) and one MMLU subject (6 questions) in the tiny model's vocabulary."""
    import csv

    (root / "zeroshot/piqa").mkdir(parents=True)
    (root / "zeroshot/piqa/valid.jsonl").write_text("".join(
        json.dumps({"goal": f"w{i} w{i + 1} ?", "sol1": f"w{i + 2} w{i + 3}", "sol2": f"w{i + 4}"}) + "\n"
        for i in range(12)))
    (root / "zeroshot/piqa/valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(12)))
    for split, count in (("dev", 1), ("test", 6)):
        (root / f"mmlu/{split}").mkdir(parents=True)
        with (root / f"mmlu/{split}/biology_{split}.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([[f"w{10 + i} w{20 + i} ?", "w2", "w3", "w4", "w5", "ABCD"[i % 4]]
                                          for i in range(count)])
    return root


def _eval_json(capsys, tmp_path: Path, model: Path, corpus: Path, device: str, *extra: str) -> dict:
    path = tmp_path / f"{model.name}-{device}.json"
    code, _, err = run(capsys, "eval", model, "--ppl", corpus, "--seq-len", "32", "--device", device,
                       "--no-progress", "--json", path, *extra)
    assert code == 0, err
    return json.loads(path.read_text())


@pytest.mark.parametrize("method", ["gptq", "gptq-bcq", "uniquanf", "flexround"])
def test_calibrated_methods_quantize_on_the_gpu_as_on_the_cpu(capsys, tmp_path, tiny_model_dir, corpus_file, method):
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{method}-{device}"
        code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", method, "--bits", "3", "--group-size", "32",
                           "--calib", corpus_file, "--calib-samples", "4", "--seq-len", "32", "--epochs", "1",
                           "--device", device, "--out", out, "--no-progress")
        assert code == 0, err
        assert "quantizes each matrix on the CPU" not in err
        assert all(not t.is_cuda for t in load_checkpoint(out).state_dict().values())  # saved from the CPU
        results[device] = _eval_json(capsys, tmp_path, out, corpus_file, "cpu")
    cpu, gpu = results["cpu"]["ppl"][str(corpus_file)], results["cuda"]["ppl"][str(corpus_file)]
    assert math.isfinite(gpu) and gpu == pytest.approx(cpu, rel=0.05)  # same algorithm, other rounding


def test_per_matrix_methods_say_they_run_on_the_cpu(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", "3", "--group-size", "32",
                       "--device", "cuda", "--out", tmp_path / "rtn", "--no-progress")
    assert code == 0, err
    assert "rtn quantizes each matrix on the CPU" in err


def test_eval_on_the_gpu_matches_the_cpu(capsys, tmp_path, tiny_model_dir, corpus_file):
    data_dir = _write_tasks(tmp_path / "data")
    out = tmp_path / "rtn"
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", "3", "--group-size", "32",
                       "--out", out, "--no-progress")
    assert code == 0, err
    tasks = ("--tasks", "piqa,mmlu", "--mmlu-shots", "1", "--data-dir", data_dir)
    cpu = _eval_json(capsys, tmp_path, out, corpus_file, "cpu", *tasks)
    gpu = _eval_json(capsys, tmp_path, out, corpus_file, "cuda", *tasks)
    key = str(corpus_file)
    assert gpu["ppl"][key] == pytest.approx(cpu["ppl"][key], rel=1e-4)
    assert gpu["kl_vs_ref"] == pytest.approx(cpu["kl_vs_ref"], abs=1e-5)
    for task in ("piqa", "mmlu"):
        assert gpu["tasks"][task]["acc"] == pytest.approx(cpu["tasks"][task]["acc"], abs=0.2)


def test_compare_quantizes_and_evaluates_on_the_gpu(capsys, tmp_path, tiny_model_dir, corpus_file):
    out = tmp_path / "report"
    code, _, err = run(capsys, "compare", tiny_model_dir, "--methods", "rtn,gptq", "--bits", "3", "--group-size",
                       "32", "--calib", corpus_file, "--ppl", corpus_file, "--seq-len", "32", "--device", "cuda",
                       "--out", out, "--no-progress")
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "gptq" in report and torch.cuda.get_device_name() in report


def test_bench_kernels_times_the_triton_kernels_on_the_gpu(capsys, tmp_path):
    out = tmp_path / "k.json"
    code, stdout, err = run(capsys, "bench", "kernels", "--shape", "256x512", "--bits", "2", "3", "--batch", "1", "16",
                            "--backends", "reference,triton", "--device", "cuda", "--repeats", "2", "--no-progress",
                            "--json", out)
    assert code == 0, err
    entries = json.loads(out.read_text())
    assert {e["device"] for e in entries} == {"cuda"} and entries[0]["gpu"]
    assert 100 < entries[0]["bandwidth_gbps"] < 20_000  # a synchronised GPU copy, not a launch rate
    assert all(e["note"] is None and e["seconds"] > 0 for e in entries)  # reference and triton both run there
    assert len([e for e in entries if e["backend"] == "triton"]) == 4
