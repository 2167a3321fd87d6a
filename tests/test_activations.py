"""Activation streams in memory or spilled to disk, and calibrated runs that spill them."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import unibcq
from unibcq.errors import CheckpointError
from unibcq.methods.activations import ActivationStore, as_store


def samples(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randn(1, 5, 8, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("spill", [False, True])
def test_store_returns_what_was_appended(tmp_path, spill):
    items = samples()
    store = as_store(items, tmp_path if spill else None)
    assert store.spilled == spill and len(store) == 3
    assert all(torch.equal(a, b) for a, b in zip(store, items))
    assert torch.equal(store[-1], items[-1])
    with pytest.raises(IndexError):
        store[3]
    if spill:
        assert len(list(store.folder.iterdir())) == 3


def test_spilled_store_deletes_its_files_when_dropped(tmp_path):
    store = as_store(samples(), tmp_path)
    folder = store.folder
    del store
    gc.collect()
    assert not folder.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spill_from", [False, True])
@pytest.mark.parametrize("spill_to", [False, True])
def test_save_and_load_round_trip(tmp_path, spill_from, spill_to):
    items = samples(4)
    store = as_store(items, tmp_path / "a" if spill_from else None)
    store.save(tmp_path / "saved")
    loaded = ActivationStore.load(tmp_path / "saved", 4, tmp_path / "b" if spill_to else None)
    assert loaded.spilled == spill_to and len(loaded) == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded, items))


def test_load_refuses_a_stream_with_missing_samples(tmp_path):
    as_store(samples(4)).save(tmp_path / "saved")
    (tmp_path / "saved" / "000002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ActivationStore.load(tmp_path / "saved", 4)
    with pytest.raises(CheckpointError):
        ActivationStore.load(tmp_path / "saved", 1)  # more files than the state recorded


def test_corrupt_sample_file_is_a_clear_error(tmp_path):
    store = as_store(samples(), tmp_path)
    (store.folder / "000001.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="corrupt"):
        store[1]


CONFIGS = {
    "uniquanf": dict(bits=2, group_size=32, epochs=2, iters=2),
    "flexround": dict(bits=3, group_size=32, epochs=1),
    "gptq": dict(bits=3, group_size=32),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_spilling_activations_gives_the_same_checkpoint(tiny_llama, tmp_path, method):
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    base = tiny_llama(num_hidden_layers=2)
    config = unibcq.QuantConfig(method, **CONFIGS[method])
    in_memory, spilled = copy.deepcopy(base), copy.deepcopy(base)
    unibcq.quantize(in_memory, config, calib, show_progress=False)
    unibcq.quantize(spilled, config, calib, show_progress=False, state_dir=tmp_path / "state",
                    spill_activations=True)
    expected, got = in_memory.state_dict(), spilled.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [p.name for p in (tmp_path / "state").iterdir() if p.name.startswith("unibcq-spill-")] == []
