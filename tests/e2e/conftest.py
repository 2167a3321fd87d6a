"""Fixtures for CLI runs: a tiny model saved as a Hugging Face directory with a tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = [f"w{i}" for i in range(200)]


def _word_tokenizer():
    """A word-level fast tokenizer over WORDS, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """Seeded word salad with some structure (a Markov chain), long enough for a few windows."""
    rng = random.Random(0)
    words = [rng.choice(WORDS)]
    for _ in range(4000):
        prev = int(words[-1][1:])
        words.append(WORDS[(prev * 7 + rng.randint(0, 3)) % len(WORDS)])
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_llama) -> Path:
    model = tiny_llama(seed=1, vocab_size=256)
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    _word_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def nan_model_dir(tmp_path: Path, tiny_llama) -> Path:
    model = tiny_llama(seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    out = tmp_path / "nan-llama"
    model.save_pretrained(out)
    _word_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def deep_model_dir(tmp_path: Path, tiny_llama) -> Path:
    """Like tiny_model_dir with four decoder blocks, for runs that must be stopped half-way."""
    model = tiny_llama(seed=1, vocab_size=256, num_hidden_layers=4)
    out = tmp_path / "deep-llama"
    model.save_pretrained(out)
    _word_tokenizer().save_pretrained(out)
    return out
