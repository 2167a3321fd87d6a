"""The full-protocol benchmark plans each row so that no figure of one checkpoint is reported for another."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import smollm2_full_protocol as protocol  # noqa: E402


def _args(out: Path, *extra: str):
    return protocol.build_parser().parse_args(["--out", str(out), "--methods", "rtn", "--configs", "3:128", *extra])


def _touch(path: Path, content: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content or {}))


def _steps(args, row: str) -> list[str]:
    return [step for step, _ in protocol.row_commands(args, "unibcq", row)]


def test_rows_run_only_what_is_missing_and_a_new_checkpoint_redoes_every_figure(tmp_path):
    args = _args(tmp_path)
    assert protocol.row_names(args) == ["fp", "rtn-w3-g128"]
    assert _steps(args, "fp") == ["short", "full", "tasks", "mmlu"]
    assert _steps(args, "rtn-w3-g128") == ["quantize", "info", "short", "full", "tasks", "mmlu"]
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


def test_a_failed_requantization_leaves_no_old_figures(tmp_path):
    args = _args(tmp_path)
    for path in protocol.result_paths(args, "rtn-w3-g128").values():
        _touch(path)
    failure = protocol.process_row(args, str(tmp_path / "no-such-unibcq"), "rtn-w3-g128")
    assert failure and failure.startswith("rtn-w3-g128")
    assert not any(p.exists() for p in protocol.result_paths(args, "rtn-w3-g128").values())


def test_an_out_folder_holds_one_machine_and_setting(tmp_path):
    protocol.claim_out(_args(tmp_path))
    protocol.claim_out(_args(tmp_path, "--jobs", "4"))  # resuming with other parallelism is fine
    with pytest.raises(SystemExit, match="task_dtype"):
        protocol.claim_out(_args(tmp_path, "--task-dtype", "float32"))
