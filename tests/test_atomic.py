"""Atomic writes: what a killed writer leaves is cleared by the next write, and never a live
writer's work or the only copy of an earlier output."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unibcq.atomic import atomic_directory, write_json_atomic


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_a_sigkilled_writers_temporary_is_removed_by_the_next_write(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from unibcq.atomic import atomic_directory
        with atomic_directory({str(tmp_path / "ckpt")!r}) as tmp:
            (tmp / "weights").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert len(_hidden(tmp_path)) == 1 and not (tmp_path / "ckpt").exists()
    with atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "weights").write_bytes(b"y")
    assert _hidden(tmp_path) == [] and (tmp_path / "ckpt" / "weights").read_bytes() == b"y"


def test_an_earlier_output_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """Killed between moving the old checkpoint aside and moving the new one in: the old one is
    the only complete copy, so it returns to its name before the next write starts."""
    host, pid = socket.gethostname(), _dead_pid()
    old = tmp_path / f".ckpt.old-{host}-{pid}-abc123" / "old"
    old.mkdir(parents=True)
    (old / "weights").write_bytes(b"old")
    (tmp_path / f".ckpt.tmp-{host}-{pid}-def456").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "ckpt", overwrite=True):
            assert (tmp_path / "ckpt" / "weights").read_bytes() == b"old"
            raise RuntimeError("this write fails too")
    assert (tmp_path / "ckpt" / "weights").read_bytes() == b"old" and _hidden(tmp_path) == []


@pytest.mark.parametrize("whose", ["this process", "another host"])
def test_temporaries_of_a_live_or_remote_writer_are_left_alone(tmp_path, whose):
    host, pid = (socket.gethostname(), os.getpid()) if whose == "this process" else ("elsewhere", _dead_pid())
    other = tmp_path / f".out.json.tmp-{host}-{pid}-abc123"
    other.write_text("{}")
    write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert _hidden(tmp_path) == [other.name]


def test_reports_are_strict_json_and_state_files_round_trip(tmp_path):
    import json
    import math

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    data = {"ppl": {"wikitext2": float("nan")}, "scores": [[-math.inf, 1.5]], "n": 3}
    write_json_atomic(tmp_path / "report.json", data, portable=True)
    assert json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse) == {
        "ppl": {"wikitext2": None}, "scores": [[None, 1.5]], "n": 3}
    write_json_atomic(tmp_path / "state.json", data)
    back = json.loads((tmp_path / "state.json").read_text())
    assert math.isnan(back["ppl"]["wikitext2"]) and back["scores"] == [[-math.inf, 1.5]]
