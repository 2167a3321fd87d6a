"""Shared fixtures: tiny random-init Llama / Qwen2 models and temporary-path helpers.

Hidden size 72 and intermediate size 136 are deliberately not multiples of 32 or 64, so
group sizes 32 / 64 leave a shorter tail group in every row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

# Two xdist workers on two cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the flag must be
# set before `unibcq.kernels.triton_bcq` is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import TINY_VOCAB, _build, _tiny_config_kwargs  # noqa: E402

# Property-based (hypothesis) tests: each sets its own example count; on CI (env CI set)
# the examples are derived from the test names instead of a random seed, so a run is
# reproducible, and nothing is written to the local example database.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the dev extra is not installed; only the fuzz tests need it
    pass
else:
    settings.register_profile(
        "ci", derandomize=True, database=None, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    if os.environ.get("CI"):
        settings.load_profile("ci")


@pytest.fixture
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Factory: a fresh, eval-mode, seeded tiny LlamaForCausalLM."""
    from transformers import LlamaConfig

    def make(
        seed: int = 0, tie_word_embeddings: bool = False, dtype: torch.dtype = torch.float32, **config_overrides
    ) -> torch.nn.Module:
        return _build(LlamaConfig(**_tiny_config_kwargs(tie_word_embeddings, **config_overrides)), seed, dtype)

    return make


@pytest.fixture
def tiny_qwen2() -> Callable[..., torch.nn.Module]:
    """Factory: a fresh, eval-mode, seeded tiny Qwen2ForCausalLM (q/k/v carry biases)."""
    from transformers import Qwen2Config

    def make(
        seed: int = 0, tie_word_embeddings: bool = True, dtype: torch.dtype = torch.float32, **config_overrides
    ) -> torch.nn.Module:
        return _build(Qwen2Config(**_tiny_config_kwargs(tie_word_embeddings, **config_overrides)), seed, dtype)

    return make


@pytest.fixture
def tiny_model(request, tiny_llama, tiny_qwen2) -> Callable[..., torch.nn.Module]:
    """Factory for the architecture named by indirect parametrization ('llama' / 'qwen2')."""
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[getattr(request, "param", "llama")]


@pytest.fixture
def input_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, TINY_VOCAB, (2, 11), generator=gen)


@pytest.fixture
def logits_of(input_ids) -> Callable[[torch.nn.Module], torch.Tensor]:
    """Forward the fixed token batch and return the logits."""

    def run(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids).logits

    return run


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Callable[[str], Path]:
    """Factory of not-yet-existing checkpoint paths under tmp_path."""

    def make(name: str = "ckpt") -> Path:
        return tmp_path / "out" / name

    return make


@pytest.fixture
def hidden_entries() -> Callable[[Path], list[str]]:
    """Names of hidden (dot-prefixed) entries in a directory, e.g. leftover temp dirs."""

    def list_hidden(directory: Path) -> list[str]:
        if not directory.exists():
            return []
        return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))

    return list_hidden


@pytest.fixture(autouse=True)
def unibcq_cache_dir(request, tmp_path_factory, monkeypatch) -> Path | None:
    """Point UNIBCQ_CACHE_DIR at a fresh temp dir so no fast test touches ~/.cache/unibcq.

    Tests marked `slow` keep the real cache (they load the real model, whose fp32 cache
    takes ~17 s to rebuild).
    """
    if request.node.get_closest_marker("slow") is not None:
        return None
    cache = tmp_path_factory.mktemp("unibcq-cache")
    monkeypatch.setenv("UNIBCQ_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
