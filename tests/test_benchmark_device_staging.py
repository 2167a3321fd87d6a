"""Staging a full-protocol run for a lent GPU machine: the model survives the split, results come back safely."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "device"))
import local  # noqa: E402
import remote  # noqa: E402


def _split(tmp_path: Path, payload: bytes) -> tuple[dict, Path]:
    gguf = tmp_path / "Model.Q4_1.gguf"
    gguf.write_bytes(payload)
    stage = tmp_path / "stage"
    stage.mkdir()
    manifest = {"package": "llm_fake", **local.split_model(gguf, len(payload) // 3, stage, stage)}
    return manifest, stage


def test_the_model_is_reassembled_byte_for_byte_as_the_alias_package(tmp_path):
    payload = bytes(range(256)) * 40 + b"tail"
    manifest, stage = _split(tmp_path, payload)
    assert [len((stage / p).read_bytes()) for p in manifest["parts"]] == [len(payload) // 3, len(payload) - len(payload) // 3]
    model = remote.reassemble_model(stage, manifest, tmp_path / "site")
    assert model == tmp_path / "site" / "llm_fake" / "Model.Q4_1.gguf"
    assert model.read_bytes() == payload and (model.parent / "__init__.py").is_file()
    stamp = model.stat().st_mtime_ns
    time.sleep(0.01)
    assert remote.reassemble_model(stage, manifest, tmp_path / "site").stat().st_mtime_ns == stamp  # a retry keeps it


def test_the_protocol_is_pointed_at_its_results_folder_by_results_only():
    with pytest.raises(SystemExit, match="--results"):
        remote.protocol(540, remote.RESULTS, ["--out", "/tmp/elsewhere"])


def test_a_lost_or_damaged_part_is_refused(tmp_path):
    manifest, stage = _split(tmp_path, b"x" * 1000)
    (stage / "model.part1").write_bytes(b"y" * 10 + (stage / "model.part1").read_bytes()[10:])
    with pytest.raises(SystemExit, match="SHA-256"):
        remote.reassemble_model(stage, manifest, tmp_path / "site")
    assert not (tmp_path / "site" / "llm_fake" / "Model.Q4_1.gguf").exists()
    (stage / "model.part0").unlink()
    with pytest.raises(SystemExit, match="given back between the calls"):
        remote.reassemble_model(stage, manifest, tmp_path / "site")


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_results_are_packed_flat_and_collected_without_escaping(tmp_path):
    results = tmp_path / "results"
    (results / "logs").mkdir(parents=True)
    (results / "machine.json").write_text("{}")
    (results / "fp.eval-L512-N40.json").write_text(json.dumps({"ppl": {"wikitext2": 29.0}}))
    (results / "logs" / "fp.short.log").write_text("log")
    (results / "fp").mkdir()  # a checkpoint folder stays behind
    archive = remote.pack(results, tmp_path / "out")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["fp.eval-L512-N40.json", "logs", "logs/fp.short.log", "machine.json"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.tar.gz"]
    into = tmp_path / "repo-results"
    assert local.collect(archive, into) == ["fp.eval-L512-N40.json", "machine.json"]
    assert json.loads((into / "fp.eval-L512-N40.json").read_text())["ppl"]["wikitext2"] == 29.0

    hostile = _archive(tmp_path / "hostile.tar.gz", {"../escape.json": b"{}", "sub/row.json": b"{}", "machine.json": b"{}",
                                                     ".hidden.json": b"{}", "notes.txt": b"x", "ok.json": b"{}"})
    assert local.collect(hostile, into) == ["machine.json", "ok.json"]
    assert not (tmp_path / "escape.json").exists()


def test_collecting_drops_the_figures_the_run_discarded(tmp_path):
    """A row the lent machine started over lost its old JSONs there; they must not survive here."""
    into = tmp_path / "repo-results"
    into.mkdir()
    for name in ("machine.json", "fp.eval-L512-N40.json", "rtn-w3-g128.eval-L512-N40.json", "rtn-w3-g128.machine.json"):
        (into / name).write_text("{}")
    (into / ".gitignore").write_text("*\n")
    archive = _archive(tmp_path / "run.tar.gz", {"machine.json": b"{}", "fp.eval-L512-N40.json": b"{}",
                                                 "rtn-w3-g128.machine.json": b'{"gpu": "H100"}'})
    local.collect(archive, into)
    assert sorted(p.name for p in into.iterdir()) == [".gitignore", "fp.eval-L512-N40.json", "machine.json",
                                                      "rtn-w3-g128.machine.json"]
    assert json.loads((into / "rtn-w3-g128.machine.json").read_text()) == {"gpu": "H100"}


def test_a_torn_or_foreign_archive_takes_nothing(tmp_path):
    into = tmp_path / "into"
    into.mkdir()
    (into / "kept.json").write_text("{}")
    torn = _archive(tmp_path / "torn.tar.gz", {"machine.json": b"{}", "a.json": b"{}", "b.json": b'{"ppl": '})
    with pytest.raises(SystemExit, match="b.json .* not JSON"):
        local.collect(torn, into)
    foreign = _archive(tmp_path / "foreign.tar.gz", {"a.json": b"{}"})
    with pytest.raises(SystemExit, match="no machine.json"):
        local.collect(foreign, into)
    assert sorted(p.name for p in into.iterdir()) == ["kept.json"]


def test_the_archive_is_refreshed_while_the_protocol_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "PACK_EVERY", 0.05)
    results = tmp_path / "results"
    results.mkdir()
    (results / "machine.json").write_text("{}")
    stop = threading.Event()
    packer = threading.Thread(target=remote.pack_meanwhile, args=(results, tmp_path / "out", stop))
    packer.start()
    try:
        deadline = time.monotonic() + 5
        while not (tmp_path / "out" / "results.tar.gz").is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        packer.join()
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert tar.getnames() == ["machine.json"]


def test_kernel_timing_is_never_fatal_and_lands_in_out(tmp_path, monkeypatch, capsys):
    calls, clock = [], [0.0]

    def fake_run(cmd, env, timeout, check):
        calls.append((cmd, timeout))
        clock[0] += timeout  # killed at its limit
        raise remote.subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(remote, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(remote.subprocess, "run", fake_run)
    remote.time_kernels({}, tmp_path / "out", 120)
    (cmd, timeout), = calls  # float32 took all the time: bfloat16 is not started on what is left
    assert cmd[cmd.index("--input-dtype") + 1] == "float32" and timeout == 120
    assert cmd[cmd.index("--json") + 1] == str(tmp_path / "out" / "kernels-gpu-float32.json")
    assert cmd[cmd.index("--device") + 1] == "cuda"
    out = capsys.readouterr().out
    assert "stopped after" in out and "kernel timing (bfloat16) skipped" in out
    calls.clear()
    monkeypatch.setattr(remote.subprocess, "run", lambda cmd, env, timeout, check: (
        calls.append((cmd, timeout)), remote.subprocess.CompletedProcess(cmd, 0))[1])
    remote.time_kernels({}, tmp_path / "out", 120)
    assert [c[c.index("--input-dtype") + 1] for c, _ in calls] == ["float32", "bfloat16"]
    calls.clear()
    remote.time_kernels({}, tmp_path / "out", 20)  # too little budget left: nothing started
    assert not calls


def test_checks_run_the_gpu_tests_then_time_the_kernels(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(cmd, env, timeout, check, **kwargs):
        calls.append(cmd)
        if "pytest" in cmd:
            assert kwargs["cwd"] == remote.REPO and "src" in env["PYTHONPATH"]
            kwargs["stdout"].write("58 passed, 1 skipped in 40.0s\n")
        return remote.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(remote.subprocess, "run", fake_run)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert remote.checks(200) == 0
    assert calls[0][-len(remote.GPU_TESTS):] == list(remote.GPU_TESTS)
    assert [c[c.index("--input-dtype") + 1] for c in calls[1:]] == ["float32", "bfloat16"]
    assert "58 passed" in (tmp_path / "out" / "tests-gpu.log").read_text()
    assert "GPU tests: exit 0; 58 passed" in capsys.readouterr().out
    for test_file in remote.GPU_TESTS:
        assert (remote.REPO / test_file).is_file()
