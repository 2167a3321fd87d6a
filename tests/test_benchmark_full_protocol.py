"""The full-protocol benchmark plans each row so that no figure of one checkpoint, or one
machine, is reported for another, and stops in time on a lent machine."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import smollm2_full_protocol as protocol  # noqa: E402

HERE = {"gpu": None, "cpu": "cpu-a", "cpu_capability": "AVX2", "cpu_count": 2, "torch": "2.13.0", "transformers": "5.0.0", "device": "cpu",
        "jobs": 1, "threads": 1, "date": "2026-11-26"}
ELSEWHERE = {**HERE, "gpu": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "device": "cuda", "jobs": 8}


def _args(out: Path, *extra: str):
    return protocol.build_parser().parse_args(["--out", str(out), "--methods", "rtn", "--configs", "3:128", *extra])


def _touch(path: Path, content: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content or {}))


def _steps(args, row: str, machine: dict = HERE) -> list[str]:
    return [step for step, _ in protocol.row_plan(args, "unibcq", row, machine)[1]]


def _fake_cli(tmp_path: Path, seconds: float) -> str:
    """A stand-in for the unibcq CLI that notes its arguments in calls.txt and takes `seconds`."""
    exe = tmp_path / "fake-unibcq"
    exe.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.txt"}\nsleep {seconds}\n')
    exe.chmod(0o755)
    return str(exe)


def _quantizing_cli(tmp_path: Path, weights: bytes) -> str:
    """A stand-in for the unibcq CLI whose `quantize` writes a checkpoint holding `weights`, with a
    manifest and the run's duration in its config as the real one; every command notes its arguments."""
    exe = tmp_path / "fake-quantizing-unibcq"
    exe.write_text(f"""#!{sys.executable}
import hashlib, json, sys, time
from pathlib import Path
args = sys.argv[1:]
with open({str(tmp_path / "calls.txt")!r}, "a") as calls:
    calls.write(" ".join(args) + "\\n")
if args[0] == "quantize":
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes({weights!r})
    quantization = {{"quant_method": "unibcq", "manifest": "manifest.json", "quantize_seconds": time.time()}}
    (out / "config.json").write_text(json.dumps({{"quantization_config": quantization}}))
    files = {{name: {{"bytes": (out / name).stat().st_size,
                     "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()}}
             for name in ("model.safetensors", "config.json")}}
    (out / "manifest.json").write_text(json.dumps({{"files": files}}))
""")
    exe.chmod(0o755)
    return str(exe)


def _commands(tmp_path: Path) -> list[str]:
    calls = tmp_path / "calls.txt"
    commands = [line.split()[0] for line in calls.read_text().splitlines()]
    calls.unlink()
    return commands


def test_a_row_quantized_again_keeps_its_figures_only_for_the_same_checkpoint(tmp_path, capsys):
    """A fresh clone has the row's JSONs and journals but not its checkpoint."""
    args, row = _args(tmp_path), "rtn-w3-g128"
    assert protocol.process_row(args, _quantizing_cli(tmp_path, b"weights"), row, HERE) is None
    assert _commands(tmp_path) == ["quantize", "info", "eval", "eval", "eval", "eval"]
    paths = protocol.result_paths(args, row)
    journal = paths["tasks"].with_name(paths["tasks"].name + ".partial")
    for path in (paths["short"], paths["full"], journal, tmp_path / f"{row}.info.json"):
        _touch(path)  # what the evaluations would have written
    shutil.rmtree(tmp_path / row)
    fresh, steps = protocol.row_plan(args, "unibcq", row, HERE)
    assert not fresh and [s for s, _ in steps] == ["quantize", "info", "tasks", "mmlu"]
    assert protocol.process_row(args, _quantizing_cli(tmp_path, b"weights"), row, HERE) is None
    assert _commands(tmp_path) == ["quantize", "info", "eval", "eval"]
    assert paths["short"].is_file() and paths["full"].is_file() and journal.is_file()  # the same checkpoint

    shutil.rmtree(tmp_path / row)
    assert protocol.process_row(args, _quantizing_cli(tmp_path, b"other weights"), row, HERE) is None
    assert _commands(tmp_path) == ["quantize", "info", "eval", "eval", "eval", "eval"]
    assert not paths["short"].exists() and not journal.exists()  # another checkpoint: measured anew
    assert "differs from the checkpoint" in capsys.readouterr().out
    recorded = protocol.recorded_identity(args, row)
    assert recorded == protocol.identity_json(protocol.files_fingerprint(tmp_path / row))

    for path in (paths["short"], journal):
        _touch(path)
    (tmp_path / row / "model.safetensors").write_bytes(b"weights made by hand")  # the manifest follows
    entries = json.loads((tmp_path / row / "manifest.json").read_text())
    entries["files"]["model.safetensors"]["sha256"] = "0" * 64
    (tmp_path / row / "manifest.json").write_text(json.dumps(entries))
    assert protocol.process_row(args, _quantizing_cli(tmp_path, b"unused"), row, HERE) is None
    assert _commands(tmp_path) == ["info", "eval", "eval", "eval", "eval"]  # present, but not the figures' checkpoint
    assert not paths["short"].exists() and not journal.exists() and "is not the checkpoint" in capsys.readouterr().out
    recorded = protocol.recorded_identity(args, row)

    protocol.checkpoint_record(args, row).unlink()  # a row begun before checkpoints were recorded
    reason = protocol.process_row(args, _quantizing_cli(tmp_path, b"x"), row, HERE, deadline=time.monotonic())
    assert str(reason) == f"{row}: not started (time budget)" and protocol.recorded_identity(args, row) == recorded


def test_rows_run_only_what_is_missing_and_a_new_checkpoint_redoes_every_figure(tmp_path):
    args = _args(tmp_path)
    assert protocol.row_names(args) == ["fp", "rtn-w3-g128"]
    assert _steps(args, "fp") == ["short", "full", "tasks", "mmlu"]
    assert _steps(args, "rtn-w3-g128") == ["quantize", "info", "short", "full", "tasks", "mmlu"]
    _touch(tmp_path / "rtn-w3-g128.machine.json", HERE)
    paths = protocol.result_paths(args, "rtn-w3-g128")
    _touch(paths["short"])
    assert _steps(args, "rtn-w3-g128")[2:] == ["short", "full", "tasks", "mmlu"]  # new checkpoint: all again
    _touch(tmp_path / "rtn-w3-g128" / "config.json")
    _touch(tmp_path / "rtn-w3-g128" / "model.safetensors")
    assert _steps(args, "rtn-w3-g128") == ["info", "full", "tasks", "mmlu"]  # same checkpoint: only the rest
    for path in paths.values():
        _touch(path)
    _touch(tmp_path / "rtn-w3-g128.info.json")
    (tmp_path / "rtn-w3-g128" / "model.safetensors").unlink()
    assert _steps(args, "rtn-w3-g128") == []  # every figure is there; the checkpoint is not needed


def test_a_row_begun_on_another_machine_starts_over_there(tmp_path):
    args = _args(tmp_path)
    _touch(tmp_path / "rtn-w3-g128.machine.json", ELSEWHERE)
    _touch(tmp_path / "rtn-w3-g128" / "config.json")
    _touch(tmp_path / "rtn-w3-g128" / "model.safetensors")
    _touch(protocol.result_paths(args, "rtn-w3-g128")["short"])
    fresh, steps = protocol.row_plan(args, "unibcq", "rtn-w3-g128", HERE)
    assert fresh and [s for s, _ in steps] == ["quantize", "info", "short", "full", "tasks", "mmlu"]
    assert "--overwrite" in steps[0][1]  # the other machine's checkpoint is replaced, not reused
    assert _steps(args, "rtn-w3-g128", {**ELSEWHERE, "jobs": 2}) == ["info", "full", "tasks", "mmlu"]
    _touch(tmp_path / "fp.machine.json", ELSEWHERE)
    _touch(protocol.result_paths(args, "fp")["short"])
    assert _steps(args, "fp") == ["short", "full", "tasks", "mmlu"]


def test_a_cpu_of_the_same_name_with_another_vector_unit_is_another_machine(tmp_path):
    """Virtual machines call Zen 2 and Zen 4 alike 'AMD EPYC'; their bfloat16 arithmetic differs."""
    args = _args(tmp_path)
    _touch(protocol.result_paths(args, "fp")["short"])
    _touch(tmp_path / "fp.machine.json", {**HERE, "cpu_capability": "AVX512"})
    assert _steps(args, "fp") == ["short", "full", "tasks", "mmlu"]
    _touch(tmp_path / "fp.machine.json", {k: v for k, v in HERE.items() if k != "cpu_capability"})
    assert _steps(args, "fp") == ["short", "full", "tasks", "mmlu"]  # a record without it cannot be matched
    _touch(tmp_path / "fp.machine.json", HERE)
    assert _steps(args, "fp") == ["full", "tasks", "mmlu"]
    assert protocol.machine_record(args)["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_failed_requantization_leaves_no_old_figures_and_records_the_machine(tmp_path):
    args = _args(tmp_path)
    for path in protocol.result_paths(args, "rtn-w3-g128").values():
        _touch(path)
    failure = protocol.process_row(args, str(tmp_path / "no-such-unibcq"), "rtn-w3-g128", HERE)
    assert failure and failure.failed and failure.row == "rtn-w3-g128"
    assert not any(p.exists() for p in protocol.result_paths(args, "rtn-w3-g128").values())
    assert json.loads((tmp_path / "rtn-w3-g128.machine.json").read_text()) == HERE


def test_the_time_budget_stops_a_running_step_and_starts_no_other(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "EXPECTED_EVAL_SECONDS", {"cuda": 0, "cpu": 0})
    args = _args(tmp_path)
    start = time.monotonic()
    reason = protocol.process_row(args, _fake_cli(tmp_path, 30), "fp", HERE, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - start < 10
    assert reason == protocol.Unfinished("fp", "not finished (time budget; short stopped)", failed=False)
    reason = protocol.process_row(args, _fake_cli(tmp_path, 30), "fp", HERE, deadline=time.monotonic())
    assert str(reason) == "fp: not started (time budget)"  # the same machine's row goes on, but not now
    assert not (tmp_path / "logs" / "fp.full.log").exists()


def test_a_fresh_row_starts_only_with_its_expected_time_left(tmp_path, capsys):
    args = _args(tmp_path)
    _touch(tmp_path / "rtn-w3-g128.machine.json", ELSEWHERE)
    _touch(protocol.result_paths(args, "rtn-w3-g128")["short"])
    expected = protocol.expected_seconds("rtn-w3-g128", args.device)
    assert expected > protocol.expected_seconds("fp", args.device)
    assert expected > 10 * protocol.expected_seconds("rtn-w3-g128", "cuda")  # a CPU row takes hours
    reason = protocol.process_row(args, _fake_cli(tmp_path, 0), "rtn-w3-g128", HERE,
                                  deadline=time.monotonic() + expected - 5)
    assert not reason.failed and reason.why.startswith("not started (time budget:")
    assert protocol.result_paths(args, "rtn-w3-g128")["short"].is_file()  # another machine's figures stay
    assert not (tmp_path / "calls.txt").exists()
    assert protocol.process_row(args, _fake_cli(tmp_path, 0), "rtn-w3-g128", HERE,
                                deadline=time.monotonic() + expected + 5) is None
    assert not protocol.result_paths(args, "rtn-w3-g128")["short"].is_file()  # started over: the fake wrote none
    assert "rtn-w3-g128 began on another machine (gpu NVIDIA H100 80GB HBM3 -> None, cpu_count 16 -> 2, " \
           "device cuda -> cpu)" in capsys.readouterr().out


def test_a_killed_calibrated_quantization_resumes_and_another_machines_is_removed(tmp_path):
    """The quantize step of a calibrated row passes --resume (a run killed at the time budget
    left its finished blocks in ROW.partial, which refuses a plain rerun); a row that starts
    over on this machine removes the half-finished run another machine left."""
    args = _args(tmp_path, "--methods", "gptq,rtn")
    commands = dict(protocol.row_plan(args, "unibcq", "gptq-w3-g128", HERE)[1])
    assert "--resume" in commands["quantize"]
    assert "--resume" not in dict(protocol.row_plan(args, "unibcq", "rtn-w3-g128", HERE)[1])["quantize"]
    for machine, kept in ((HERE, True), (ELSEWHERE, False)):
        _touch(tmp_path / "gptq-w3-g128.partial" / "state.json")
        _touch(tmp_path / "gptq-w3-g128.machine.json", machine)
        protocol.process_row(args, str(tmp_path / "no-such-unibcq"), "gptq-w3-g128", HERE)
        assert (tmp_path / "gptq-w3-g128.partial").exists() == kept


def test_rows_this_machine_began_go_first_and_other_machines_rows_last(tmp_path):
    _touch(tmp_path / "fp.machine.json", ELSEWHERE)
    args = _args(tmp_path, "--configs", "3:128,2:128", "--unibcq", _fake_cli(tmp_path, 0))
    _touch(tmp_path / "rtn-w2-g128.machine.json", protocol.machine_record(args))
    unfinished, _ = protocol.run_rows(args, protocol.row_names(args))
    assert unfinished == []
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    quantized = [c.split("--bits ")[1][0] for c in calls if c.startswith("quantize")]
    assert quantized == ["2", "3"]
    assert calls[-1].startswith("eval smollm2-135m") and "--method" not in calls[-1]  # fp, begun elsewhere


def test_an_out_folder_holds_one_protocol(tmp_path):
    protocol.claim_out(_args(tmp_path))
    protocol.claim_out(_args(tmp_path, "--jobs", "4"))  # resuming with other parallelism is fine
    with pytest.raises(SystemExit, match="task_dtype"):
        protocol.claim_out(_args(tmp_path, "--task-dtype", "float32"))
    with pytest.raises(SystemExit, match="limit"):
        protocol.claim_out(_args(tmp_path, "--limit", "10"))


def test_the_docs_name_each_machine_with_its_rows():
    one = protocol.machines_note([("fp", {"machine": ELSEWHERE}), ("rtn-w3-g128", {"machine": ELSEWHERE})])
    assert one.startswith("one NVIDIA H100 80GB HBM3 GPU, 16 CPU cores (cpu-a, AVX2)") and "fp" not in one
    two = protocol.machines_note([("fp", {"machine": ELSEWHERE}), ("rtn-w3-g128", {"machine": HERE}),
                                  ("rtn-w2-g128", {"machine": None})])
    assert "H100 80GB HBM3 GPU" in two and ": fp." in two
    assert "no GPU, 2 CPU cores" in two and ": rtn-w3-g128." in two
    ran = protocol.machines_note([("rtn-w3-g128", {"machine": {**HERE, "command": "python x.py --rows rtn-w3-g128"}})])
    assert ran.endswith("run as `python x.py --rows rtn-w3-g128`.")
    assert "not recorded: rtn-w2-g128." in two


def test_scoring_passes_are_larger_on_a_gpu_unless_told(tmp_path):
    def batch(*extra):
        steps = protocol.row_plan(_args(tmp_path, *extra), "unibcq", "fp", HERE)[1]
        cmd = dict(steps)["tasks"]
        return int(cmd[cmd.index("--batch-size") + 1])

    assert batch() == 64
    assert batch("--device", "cuda") == 256
    assert batch("--device", "cuda", "--batch-size", "32") == 32


def test_rows_narrows_what_runs_not_what_the_table_lists(tmp_path):
    args = _args(tmp_path, "--methods", "rtn,gptq", "--rows", "gptq-w3-g128")
    assert protocol.rows_to_run(args) == ["gptq-w3-g128"]
    assert protocol.row_names(args) == ["fp", "rtn-w3-g128", "gptq-w3-g128"]
    assert protocol.rows_to_run(_args(tmp_path)) == ["fp", "rtn-w3-g128"]
    assert protocol.rows_to_run(_args(tmp_path, "--rows", "fp,rtn-w3-g128,fp")) == ["fp", "rtn-w3-g128"]
    with pytest.raises(SystemExit, match="none"):
        protocol.rows_to_run(_args(tmp_path, "--rows", ""))
    with pytest.raises(SystemExit, match="rtn-w4-g-1 not among"):
        protocol.rows_to_run(_args(tmp_path, "--rows", "rtn-w4-g-1"))
