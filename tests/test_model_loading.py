"""Resolving and caching models: a GGUF is dequantized once, even by processes that start together."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from unibcq.atomic import atomic_directory
from unibcq.errors import UnibcqError
from unibcq.models import loading


def test_concurrent_first_loads_dequantize_a_gguf_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIBCQ_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "Tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    source = loading.resolve_model(str(gguf))
    builds: list[int] = []

    def slow_dequantize(source, cached: Path) -> None:  # stands in for transformers' ~17 s
        builds.append(1)
        time.sleep(0.3)
        with atomic_directory(cached, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_dequantize_gguf", slow_dequantize)
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(loading._cache_gguf(source))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(found) == 4 and len(set(found)) == 1 and (found[0] / "config.json").is_file()


def test_a_rewritten_gguf_replaces_its_stale_cache(tmp_path, monkeypatch):
    """A GGUF changed in place gets a new cache; the old one (540 MB for SmolLM2) is removed,
    another GGUF's cache with the same file name is not."""
    monkeypatch.setenv("UNIBCQ_CACHE_DIR", str(tmp_path / "cache"))

    def dequantize(source, cached: Path) -> None:
        with atomic_directory(cached, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_dequantize_gguf", dequantize)
    gguf, other = tmp_path / "a" / "Tiny.gguf", tmp_path / "b" / "Tiny.gguf"
    for path in (gguf, other):
        path.parent.mkdir()
        path.write_bytes(b"GGUF")
    old = loading._cache_gguf(loading.resolve_model(str(gguf)))
    neighbour = loading._cache_gguf(loading.resolve_model(str(other)))
    gguf.write_bytes(b"GGUF v2")
    new = loading._cache_gguf(loading.resolve_model(str(gguf)))
    assert new != old and (new / "config.json").is_file()
    assert not old.exists() and not Path(f"{old}.source").exists()
    assert (neighbour / "config.json").is_file()
    assert loading._cache_gguf(loading.resolve_model(str(other))) == neighbour


def test_context_window_reads_the_config_and_stretching_rope():
    from transformers import GPT2Config, LlamaConfig

    from unibcq.models.architectures import context_window

    assert context_window(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert context_window(GPT2Config(n_positions=1024)) == 1024
    assert context_window(None) is None
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert context_window(LlamaConfig(max_position_embeddings=32768, rope_scaling=yarn)) == 131072
    # max_position_embeddings already the stretched length (Phi-3's longrope): not stretched twice
    longrope = {"rope_type": "longrope", "factor": 32.0, "original_max_position_embeddings": 4096,
                "short_factor": [1.0] * 32, "long_factor": [1.0] * 32}
    assert context_window(LlamaConfig(max_position_embeddings=131072, rope_scaling=longrope)) == 131072


@pytest.fixture
def offline_machine(monkeypatch, tmp_path):
    """No proxy, no HF_HUB_OFFLINE, an empty Hub cache and a host name that does not resolve;
    any call that reaches transformers fails the test."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(loading.urllib.request, "getproxies", dict)
    lookups: list[str] = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(loading.socket, "getaddrinfo", no_dns)
    return lookups


def test_an_uncached_hub_model_fails_at_once_when_offline(offline_machine, monkeypatch):
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from transformers import AutoConfig

    host = urlparse(constants.ENDPOINT).hostname

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("reached the Hub (and its ~23 s of retries)")

    monkeypatch.setattr(AutoConfig, "from_pretrained", must_not_be_called)
    for attempt in (lambda: loading.context_window_of("org/uncached-model"),
                    lambda: loading.snapshot_dir(loading.resolve_model("org/uncached-model"))):
        with pytest.raises(UnibcqError, match=f"no local file or folder, and as a Hugging Face id it is not in the local cache and {host} cannot be"):
            attempt()
    assert offline_machine == [host, host]


def test_a_cached_hub_model_or_a_proxy_still_reaches_transformers(offline_machine, monkeypatch, tmp_path):
    from huggingface_hub import constants

    commit = "0" * 40
    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--cached-model" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    loading._fail_fast_when_offline(loading.resolve_model("org/cached-model"))
    monkeypatch.setattr(loading.urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
    loading._fail_fast_when_offline(loading.resolve_model("org/uncached-model"))
    assert offline_machine == []


def test_a_malformed_gguf_has_no_size_and_fails_on_load_in_one_error(tmp_path):
    junk = tmp_path / "broken.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert loading.float32_bytes(str(junk)) is None  # the KL reference sizing leaves it to loading
    with pytest.raises(UnibcqError, match="broken.gguf"):
        loading.load_model(str(junk))


@pytest.mark.parametrize("content,needle", [
    (b"[]", "has no weight_map"),
    (b'{"weight_map": {}}', "has no weight_map"),
    (b'{"weight_map": {"w": "../outside.safetensors"}}', "not a shard file name"),
    (b'{"weight_map": {"w": 3}}', "not a shard file name"),
    (b'{"weight_map": {"w": "x.bin"}}', "not a shard file name"),
    (b"\xff\xfe{", "not a valid safetensors index"),
])
def test_one_reader_refuses_every_malformed_shard_index(tmp_path, content, needle):
    from unibcq.errors import CheckpointError
    from unibcq.methods.streaming import source_weight_map
    from unibcq.models.shards import WEIGHTS_INDEX, read_weight_map

    index = tmp_path / WEIGHTS_INDEX
    index.write_bytes(content)
    with pytest.raises(UnibcqError, match=needle):
        source_weight_map(tmp_path)  # a source model streamed block by block
    with pytest.raises(CheckpointError, match=needle):
        read_weight_map(index, CheckpointError)  # what a checkpoint's loader raises
    assert loading._weight_files(tmp_path) == []  # sizing a model falls back to the files present
