"""Resume: a block-by-block run killed after any block continues to the same checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

import unibcq
from unibcq.methods import run_state
from unibcq.methods.run_state import RunState


class _Killed(Exception):
    """Stands in for SIGKILL: raised right after a given number of blocks were committed."""


def _kill_after(monkeypatch, blocks: int) -> None:
    original = RunState.commit_block

    def commit(self, model, index, activations, records):
        original(self, model, index, activations, records)
        if self.completed == blocks:
            raise _Killed

    monkeypatch.setattr(RunState, "commit_block", commit)


CONFIGS = {
    "uniquanf": dict(bits=2, group_size=32, epochs=2, iters=2, u_lr=1e-2, b_lr=1e-3),
    "flexround": dict(bits=3, group_size=32, epochs=2),
    "gptq": dict(bits=3, group_size=32),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("kill_after,spill", [(1, False), (2, False), (1, True)])
def test_resumed_run_equals_uninterrupted(tiny_llama, tmp_path, monkeypatch, method, kill_after, spill):
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    base = tiny_llama(num_hidden_layers=3)
    config = unibcq.QuantConfig(method, **CONFIGS[method])

    whole = copy.deepcopy(base)
    whole_records = unibcq.quantize(whole, config, calib, show_progress=False, state_dir=tmp_path / "a")

    state = tmp_path / "b"
    killed = copy.deepcopy(base)
    with monkeypatch.context() as patch:
        _kill_after(patch, kill_after)
        with pytest.raises(_Killed):
            unibcq.quantize(killed, config, calib, show_progress=False, state_dir=state, spill_activations=spill)
    assert (state / run_state.STATE_FILE).is_file()

    resumed = copy.deepcopy(base)  # a fresh process starts again from the full-precision model
    records = unibcq.quantize(resumed, config, calib, show_progress=False, state_dir=state, resume=True,
                              spill_activations=spill)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r.name for r in records] == [r.name for r in whole_records]
    assert [r.rel_error for r in records] == [r.rel_error for r in whole_records]


def _gptq_killed_after_one_block(model, state_dir, monkeypatch, seed: int):
    """(config, calibration) of a gptq run whose state in `state_dir` holds one finished block."""
    calib = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(seed))
    config = unibcq.QuantConfig("gptq", bits=3, group_size=32)
    with monkeypatch.context() as patch:
        _kill_after(patch, 1)
        with pytest.raises(_Killed):
            unibcq.quantize(model, config, calib, show_progress=False, state_dir=state_dir)
    return config, calib


def test_existing_state_needs_resume_and_the_same_run(tiny_llama, tmp_path, monkeypatch):
    config, calib = _gptq_killed_after_one_block(tiny_llama(), tmp_path / "s", monkeypatch, seed=6)
    with pytest.raises(unibcq.UnibcqError, match="--resume"):
        unibcq.quantize(tiny_llama(), config, calib, show_progress=False, state_dir=tmp_path / "s")
    other = unibcq.QuantConfig("gptq", bits=4, group_size=32)
    with pytest.raises(unibcq.UnibcqError, match="differs in: config"):
        unibcq.quantize(tiny_llama(), other, calib, show_progress=False, state_dir=tmp_path / "s", resume=True)
    with pytest.raises(unibcq.UnibcqError, match="calibration_sha256"):
        unibcq.quantize(tiny_llama(), config, calib + 1, show_progress=False, state_dir=tmp_path / "s", resume=True)


def test_a_model_replaced_under_the_same_path_is_not_continued(tiny_llama, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    tiny_llama(seed=1).save_pretrained(folder)

    def load():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder).eval()

    config, calib = _gptq_killed_after_one_block(load(), tmp_path / "s", monkeypatch, seed=8)
    tiny_llama(seed=2).save_pretrained(folder)  # other weights, same path and shapes
    with pytest.raises(unibcq.UnibcqError, match="differs in: model_files"):
        unibcq.quantize(load(), config, calib, show_progress=False, state_dir=tmp_path / "s", resume=True)


def test_corrupt_state_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    config, calib = _gptq_killed_after_one_block(tiny_llama(), tmp_path / "s", monkeypatch, seed=7)
    block = tmp_path / "s" / "block-0000.safetensors"
    block.write_bytes(block.read_bytes()[:50])
    with pytest.raises(unibcq.CheckpointError, match="corrupt"):
        unibcq.quantize(tiny_llama(), config, calib, show_progress=False, state_dir=tmp_path / "s", resume=True)
    (tmp_path / "s" / run_state.STATE_FILE).write_text("{not json")
    with pytest.raises(unibcq.CheckpointError, match="corrupt"):
        unibcq.quantize(tiny_llama(), config, calib, show_progress=False, state_dir=tmp_path / "s", resume=True)


def test_a_second_run_on_a_locked_state_fails_without_touching_it(tmp_path):
    fingerprint = {"run": 1}
    first = RunState.open(tmp_path / "s", fingerprint, resume=False)
    spill = tmp_path / "s" / f"{run_state.SPILL_PREFIX}live"
    spill.mkdir()
    with pytest.raises(unibcq.UnibcqError, match="another unibcq run"):
        RunState.open(tmp_path / "s", fingerprint, resume=False)
    assert spill.is_dir()  # the running run's spill folder survives
    (tmp_path / "s" / run_state.STATE_FILE).write_text("{}")  # it has committed a block
    for resume in (False, True):  # not "remove that directory", which would destroy the live run
        with pytest.raises(unibcq.UnibcqError, match="another unibcq run"):
            RunState.open(tmp_path / "s", fingerprint, resume=resume)
    (tmp_path / "s" / run_state.STATE_FILE).unlink()
    first.close()
    second = RunState.open(tmp_path / "s", fingerprint, resume=False)
    assert not spill.exists()  # a killed run's scratch is cleared once the directory is ours
    second.close()



def test_a_resumed_run_counts_the_killed_runs_quantizing_time(tiny_llama, tmp_path, monkeypatch):
    """The state records the quantizing seconds up to each commit and a resumed run goes on from
    them, so quantize --resume and compare report the whole quantization's time, not that of
    its last stretch (3.8 s of a 6.9 s run)."""
    ticks = iter(range(0, 10_000, 100))  # every reading of the run state's clock is 100 s later
    monkeypatch.setattr(run_state, "perf_counter", lambda: float(next(ticks)))
    state = tmp_path / "state"
    config, calib = _gptq_killed_after_one_block(tiny_llama(num_hidden_layers=3), state, monkeypatch, seed=7)
    killed = RunState.committed_seconds(state)
    assert killed == 100.0  # opened at 0, committed block 0 at 100
    seen = []
    original = RunState.commit_block

    def commit(self, *args):
        original(self, *args)
        seen.append(RunState.committed_seconds(state))

    monkeypatch.setattr(RunState, "commit_block", commit)
    unibcq.quantize(tiny_llama(num_hidden_layers=3), config, calib, show_progress=False, state_dir=state, resume=True)
    assert seen == [killed + 100.0, killed + 200.0]  # blocks 1 and 2, after the 100 s already spent
    assert RunState.committed_seconds(tmp_path / "nothing") == 0.0
