"""The per-part benchmark scripts' `--no-run` only tabulates: it runs no command, and works on a
results folder without its (git-ignored) checkpoints, as a fresh clone has it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import smollm2_table  # noqa: E402
import smollm2_tasks  # noqa: E402


def _write(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content))


def _fake_cli(tmp_path: Path) -> str:
    exe = tmp_path / "fake-unibcq"
    exe.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.txt"}\nexit 1\n')
    exe.chmod(0o755)
    return str(exe)


def _eval(ppl: float) -> dict:
    return {"ppl": {"wikitext2": ppl}, "kl_vs_ref": 0.5, "top1_agreement": 0.6, "bits_per_weight": 32.0,
            "seq_len": 512, "windows": {"wikitext2": 40}}


def test_table_no_run_tabulates_the_measured_rows_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "fp.eval-L512-N40.json", _eval(20.0))
    _write(out / "rtn-w3-g128.eval-L512-N40.json", _eval(61.25))
    _write(out / "rtn-w3-g128.info.json", {"bits_per_weight": 3.542, "file_bytes": 9e7, "quantize_seconds": 3.0})
    _write(out / "rtn-w3-g128.quantize.json", {"seconds": 3.0, "layers": []})
    _write(out / "rtn-w2-g128.eval-L512-N40.json", _eval(900.0))  # no info: not measured completely
    _write(out / "host.json", {"cpu_count": 64, "cpu": "Measuring CPU"})
    docs = tmp_path / "BENCHMARKS.md"
    assert smollm2_table.main(["--out", str(out), "--methods", "rtn", "--configs", "3:128,2:128", "--no-run",
                               "--unibcq", _fake_cli(tmp_path), "--write-docs", "--docs", str(docs)]) == 0
    assert not (tmp_path / "calls.txt").exists()
    table = capsys.readouterr().out
    assert "61.25" in table and "900.00" not in table
    assert "64 CPU cores, Measuring CPU" in docs.read_text()  # the machine that measured, not this one


def test_tasks_no_run_needs_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    tasks = {name: {"acc": 0.5, "acc_norm": None, "stderr": 0.01, "n": 100, "seconds": 1.0}
             for name in smollm2_tasks.ZERO_SHOT}
    args = smollm2_tasks.build_parser().parse_args(["--out", str(out), "--rows", "rtn-w3-g128", "--no-run"])
    zero_shot, mmlu = smollm2_tasks.evaluate_row(args, "unused", "rtn-w3-g128")
    _write(zero_shot, {"task_dtype": "bfloat16", "tasks": tasks})
    _write(mmlu, {"task_dtype": "bfloat16", "tasks": {"mmlu": {"acc": 0.25, "stderr": 0.02, "n": 171, "seconds": 2.0}}})
    assert smollm2_tasks.main(["--out", str(out), "--rows", "rtn-w3-g128", "--no-run",
                               "--unibcq", _fake_cli(tmp_path)]) == 0
    assert not (tmp_path / "calls.txt").exists()
    assert "50.0 ± 0.4" in capsys.readouterr().out


def test_full_test_no_run_writes_its_docs_section(tmp_path):
    import smollm2_full_test

    out = tmp_path / "out"
    out.mkdir()
    full = {"ppl": {"wikitext2": 50.5}, "kl_vs_ref": 0.4, "windows": {"wikitext2": 147},
            "tokens": {"wikitext2": 300909}, "seconds": 10.0}
    _write(out / "rtn-w3-g128.eval-L2048-full.json", full)
    _write(out / "rtn-w3-g128.info.json", {"bits_per_weight": 3.542})
    docs = tmp_path / "BENCHMARKS.md"
    assert smollm2_full_test.main(["--out", str(out), "--rows", "rtn-w3-g128", "--no-run", "--write-docs",
                                   "--docs", str(docs), "--unibcq", _fake_cli(tmp_path)]) == 0
    assert not (tmp_path / "calls.txt").exists()
    assert "50.50" in docs.read_text() and "machine not recorded" in docs.read_text()
