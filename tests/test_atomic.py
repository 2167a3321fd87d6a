"""Atomic writes: what a killed writer leaves is cleared by the next write, and never a live
writer's work or the only copy of an earlier output."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unibcq.atomic import ORPHAN_MIN_AGE_SECONDS, _locked, atomic_directory, write_json_atomic
from unibcq.errors import UnibcqError


def _hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def _age(path: Path, seconds: float = 2 * ORPHAN_MIN_AGE_SECONDS) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


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
    [orphan] = _hidden(tmp_path)
    with atomic_directory(tmp_path / "ckpt") as tmp:  # too young to judge: its writer may be about to lock it
        (tmp / "weights").write_bytes(b"y")
    assert _hidden(tmp_path) == [orphan]
    _age(tmp_path / orphan)
    with atomic_directory(tmp_path / "ckpt", overwrite=True) as tmp:
        (tmp / "weights").write_bytes(b"z")
    assert _hidden(tmp_path) == [] and (tmp_path / "ckpt" / "weights").read_bytes() == b"z"


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_earlier_output_moved_aside_by_a_killed_writer_is_put_back(tmp_path, overwrite):
    """Killed between moving the old checkpoint aside and moving the new one in: the old one is
    the only complete copy, so it returns to its name before the next write decides anything."""
    old = tmp_path / ".ckpt.old-abc123" / "old"
    old.mkdir(parents=True)
    (old / "weights").write_bytes(b"old")
    (tmp_path / ".ckpt.tmp-def456").mkdir()
    for orphan in (old.parent, tmp_path / ".ckpt.tmp-def456"):
        _age(orphan)
    with pytest.raises(UnibcqError if not overwrite else RuntimeError):
        with atomic_directory(tmp_path / "ckpt", overwrite=overwrite):
            raise RuntimeError("this write fails too")
    assert (tmp_path / "ckpt" / "weights").read_bytes() == b"old" and _hidden(tmp_path) == []



def test_an_output_that_appears_during_the_write_is_kept(tmp_path):
    """Another job or a user made the folder while this run wrote: neither is lost."""
    target = tmp_path / "ckpt"
    with pytest.raises(UnibcqError, match="appeared while this run was writing it") as info:
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_bytes(b"new")
            target.mkdir()
            (target / "notes.txt").write_text("mine")
    assert (target / "notes.txt").read_text() == "mine"
    [kept] = [path for path in tmp_path.iterdir() if path.name.startswith("ckpt.new-")]
    assert (kept / "weights").read_bytes() == b"new" and str(kept) in str(info.value) and _hidden(tmp_path) == []


def test_overwrite_checks_the_target_again_before_replacing_it(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()

    def check() -> None:
        if (target / "notes.txt").exists():
            raise UnibcqError("output holds files the checkpoint did not write")

    with pytest.raises(UnibcqError, match="did not write; nothing was replaced"):
        with atomic_directory(target, overwrite=True, check=check) as tmp:
            (tmp / "weights").write_bytes(b"new")
            (target / "notes.txt").write_text("added mid-run")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    with atomic_directory(target, overwrite=True, check=lambda: None) as tmp:
        (tmp / "weights").write_bytes(b"newer")
    assert [p.name for p in target.iterdir()] == ["weights"]


def test_a_dead_writers_temporary_is_cleared_after_a_write_too(tmp_path):
    """A run killed moments before this one began leaves a temporary too young to judge at the
    start; by the end of a long write it is judged, so a partial copy does not stay hidden."""
    orphan = tmp_path / ".ckpt.tmp-dead01"
    with atomic_directory(tmp_path / "ckpt") as tmp:
        orphan.mkdir()
        _age(orphan)
        (tmp / "weights").write_bytes(b"x")
    assert _hidden(tmp_path) == []

def test_a_live_writers_temporary_is_left_alone(tmp_path):
    live = tmp_path / ".out.json.tmp-abc123"
    live.write_text("{}")
    _age(live)
    with _locked(live):  # another open file, as another process's writer holds it
        write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert _hidden(tmp_path) == [live.name] and json.loads((tmp_path / "out.json").read_text()) == {"a": 1}


def test_reports_are_strict_json_and_state_files_round_trip(tmp_path):
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    data = {"ppl": {"wikitext2": float("nan")}, "scores": [[-math.inf, 1.5]], "n": 3}
    write_json_atomic(tmp_path / "report.json", data, portable=True)
    assert json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse) == {
        "ppl": {"wikitext2": None}, "scores": [[None, 1.5]], "n": 3}
    write_json_atomic(tmp_path / "state.json", data)
    back = json.loads((tmp_path / "state.json").read_text())
    assert math.isnan(back["ppl"]["wikitext2"]) and back["scores"] == [[-math.inf, 1.5]]


def test_a_refused_temporary_names_the_path_the_user_gave(tmp_path, monkeypatch):
    """A read-only or pseudo file system refuses the hidden temporary: the error names the target."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x.tmp-abc"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OSError) as json_error:
        write_json_atomic(tmp_path / "report.json", {})
    with pytest.raises(OSError) as folder_error:
        with atomic_directory(tmp_path / "ckpt"):
            pass
    for error, name in ((json_error.value, "report.json"), (folder_error.value, "ckpt")):
        assert error.errno == errno.EROFS and error.filename == str(tmp_path / name) and ".tmp-" not in str(error)
