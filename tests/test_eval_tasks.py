"""Benchmark tasks: scoring, prompts, answer extraction, loaders and the CLI, without a real model.

A bigram stub model (logits depend only on the current token, set by hand) makes every
log-likelihood known exactly, so accuracies are checked against exact expected values; a
tiny random Llama checks that batching, padding, truncation and the shared-prefix cache
change nothing.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unibcq.cli import main
from unibcq.data.sources import read_jsonl
from unibcq.errors import UnibcqError
from unibcq.eval import gsm8k, mmlu, zeroshot
from unibcq.eval import tasks as tasks_module
from unibcq.eval.suite import EvalSettings
from unibcq.eval.tasks import MEAN_KEY, TASKS, check_tasks, resolve_tasks, run_tasks

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"

WORDS = [f"w{i}" for i in range(200)]
EXTRA = ["Question", "Answer", "The", "following", "are", "multiple", "choice", "questions", "with", "answers",
         "about", "biology", "chemistry", "A", "B", "C", "D", "yes", "no", "####", ":", "?", ".", "(", ")", "$"]
VOCAB = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(EXTRA + WORDS)}}
VOCAB_SIZE = 256 + 64  # >= len(VOCAB); the tiny models' vocabulary


def word_tokenizer():
    """A word-level fast tokenizer (punctuation split off), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


class _NoCache:
    """What the bigram stub returns as its key/value cache: it needs none."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        return None

    def reorder_cache(self, index: torch.Tensor) -> None:
        return None


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: log p(next | current) is set by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, cache=None, use_cache=False, **kwargs):
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=_NoCache() if use_cache else None)


def bigram(*favours: tuple[str, str, float]) -> BigramLM:
    """A stub whose logit for `next` after `current` is `value` (0 elsewhere)."""
    table = torch.zeros(VOCAB_SIZE, VOCAB_SIZE)
    for current, nxt, value in favours:
        table[VOCAB[current], VOCAB[nxt]] = value
    return BigramLM(table)


def logp(model: BigramLM, current: str, nxt: str) -> float:
    return torch.log_softmax(model.table[VOCAB[current]], -1)[VOCAB[nxt]].item()


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture
def llama(tiny_llama):
    return tiny_llama(seed=3, hidden_size=64, vocab_size=VOCAB_SIZE)


# ----------------------------------------------------------------------------- tokenisation


class CharTokenizer:
    """One token per character, except that "ab" merges into one token (id 1000)."""

    bos_token_id = None
    eos_token_id = 7

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_encode_pair_moves_trailing_space_to_the_continuation():
    ctx, cont = zeroshot.encode_pair(CharTokenizer(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in " yes"]


def test_encode_pair_takes_the_joint_encodings_tail_and_survives_a_boundary_merge():
    # "xab" encodes as [x, ab]: the tail after the context's two tokens would be empty.
    assert zeroshot.encode_pair(CharTokenizer(), "xa", "b") == ([ord("x"), ord("a")], [ord("b")])
    assert zeroshot.encode_pair(CharTokenizer(), "xy", "abc") == ([ord("x"), ord("y")], [1000, ord("c")])


def test_batched_pair_encoding_matches_lm_evals_one_at_a_time_split(tok):
    pairs = [("Question: w1\nAnswer:", " w5 w6"), ("w1 w2 ", "w3"), ("", "w4"), ("Question: w1\nAnswer:", " w7"),
             ("w2", " w3 w4")]

    def one_at_a_time(context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        continuation, context = context[len(stripped):] + continuation, stripped
        if not context:
            return [tok.eos_token_id], tok.encode(continuation, add_special_tokens=False)
        ids = tok.encode(context, add_special_tokens=False)
        return ids, tok.encode(context + continuation, add_special_tokens=False)[len(ids):]

    assert zeroshot.encode_pairs(tok, pairs) == [one_at_a_time(c, k) for c, k in pairs]
    assert zeroshot.encode_pairs(CharTokenizer(), [("xy", "abc"), ("", "hi")]) == \
        [zeroshot.encode_pair(CharTokenizer(), "xy", "abc"), zeroshot.encode_pair(CharTokenizer(), "", "hi")]


def test_encode_pair_with_empty_context_scores_after_eos():
    assert zeroshot.encode_pair(CharTokenizer(), "", "hi") == ([7], [ord("h"), ord("i")])


# ----------------------------------------------------------------------------- scoring


def test_loglikelihoods_are_exact_sums_of_token_logprobs(tok):
    model = bigram((":", "w5", 4.0), ("w5", "w6", 2.0))
    ctx, cont = zeroshot.encode_pair(tok, "Question: w1\nAnswer:", " w5 w6")
    [(ll, greedy)] = zeroshot.loglikelihoods(model, [(ctx, cont)])
    assert ll == pytest.approx(logp(model, ":", "w5") + logp(model, "w5", "w6"), abs=1e-5)
    assert greedy
    [(_, greedy)] = zeroshot.loglikelihoods(model, [zeroshot.encode_pair(tok, "Answer:", " w5 w7")])
    assert not greedy


def test_accuracy_follows_the_models_preference():
    model = bigram((":", "w5", 5.0))
    docs = [zeroshot.MultipleChoiceDoc.shared(f"Question: w{i}\nAnswer:", ["w5", "w6"], gold)
            for i, gold in enumerate([0, 0, 0, 1])]
    result = zeroshot.evaluate_multiple_choice(model, word_tokenizer(), docs, batch_size=3)
    assert result["acc"] == 0.75 and result["acc_norm"] == 0.75 and result["n"] == 4
    assert result["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_acc_norm_divides_by_length_and_can_disagree_with_acc(tok):
    # Choice 0 is four tokens (11 characters) with a lower total but a higher per-character score.
    model = bigram((":", "w8", 3.0), ("w7", "w7", 10.0))
    long_ll = logp(model, ":", "w7") + 3 * logp(model, "w7", "w7")
    short_ll = logp(model, ":", "w8")
    assert short_ll > long_ll and long_ll / 11 > short_ll / 2
    docs = [zeroshot.MultipleChoiceDoc.shared("Answer:", ["w7 w7 w7 w7", "w8"], 0)]
    result = zeroshot.evaluate_multiple_choice(model, tok, docs)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0
    assert zeroshot.evaluate_multiple_choice(model, tok, docs, normalize=False)["acc_norm"] is None


def test_acc_norm_counts_characters_not_utf8_bytes(tok):
    # "éééé" is one [UNK] token of 4 characters but 8 bytes: lm-eval's completion_len is 4.
    model = bigram((":", "w7", 6.8), ("w7", "w7", 10.0), (":", "[UNK]", 7.3))
    long_ll = logp(model, ":", "w7") + 3 * logp(model, "w7", "w7")
    accented_ll = logp(model, ":", "[UNK]")
    assert long_ll / 11 > accented_ll / 4 and accented_ll / 8 > long_ll / 11
    docs = [zeroshot.MultipleChoiceDoc.shared("Answer:", ["w7 w7 w7 w7", "éééé"], 0)]
    assert zeroshot.evaluate_multiple_choice(model, tok, docs)["acc_norm"] == 1.0


def test_hellaswag_text_goes_through_lm_evals_preprocess(tmp_path):
    # One pass of "  " -> " ", as lm-eval: the three spaces left around "[step]" become two.
    assert zeroshot.hellaswag_preprocess(" How to cook [title] Boil water [step]  then  wait. ") == \
        "How to cook. Boil water  then wait."
    row = {"activity_label": "Home", "ctx": "Call [insert name of town] office.", "label": 1,
           "endings": ["visit [www.kiddio.org] today.", "wait.", "go [title] Run.", "sit."]}
    _write_jsonl(tmp_path / "zeroshot/hellaswag/hellaswag_val_from_text.jsonl", [row])
    (doc,) = zeroshot.MULTIPLE_CHOICE["hellaswag"].load(tmp_path, None)
    assert doc.contexts == ("Home: Call office.",) * 4
    assert doc.choices == ("visit today.", "wait.", "go. Run.", "sit.") and doc.gold == 1


def test_partial_scoring_compares_the_continuation_after_each_context(tok):
    # Winogrande-style: same continuation, two contexts; only the continuation is scored.
    model = bigram(("w2", "w9", 6.0))
    doc = zeroshot.MultipleChoiceDoc(("w0 w1 w3", "w0 w1 w2"), ("w9 .",) * 2, 1)
    assert zeroshot.evaluate_multiple_choice(model, tok, [doc], normalize=False)["acc"] == 1.0


def test_lambada_needs_every_target_token_greedy(tok):
    model = bigram(("w1", "w2", 8.0), ("w2", "w3", 8.0))
    pairs = [("w0 w1", " w2"), ("w0 w2", " w3"), ("w0 w1", " w4")]
    result = zeroshot.evaluate_lambada(model, tok, pairs)
    assert result["acc"] == pytest.approx(2 / 3) and result["acc_norm"] is None
    expected = [logp(model, "w1", "w2"), logp(model, "w2", "w3"), logp(model, "w1", "w4")]
    assert result["ppl"] == pytest.approx(math.exp(-sum(expected) / 3), rel=1e-5)


def _scorer_killed_in_call(n: int, score, calls: list[int]):
    """`score` (loglikelihoods) that notes each call's request count in `calls` and dies in call `n`."""
    def scorer(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == n:
            raise _Killed
        return score(*args, **kwargs)

    return scorer


def _figures(result: dict) -> dict:
    """A task result without its timing, which differs run to run."""
    return {k: v for k, v in result.items() if k != "seconds"}


def test_a_task_resumes_part_by_part_with_the_figures_of_an_uninterrupted_run(tok, monkeypatch):
    monkeypatch.setattr(zeroshot, "TASK_PART_ITEMS", 2)
    model = bigram((":", "w5", 5.0))
    docs = [zeroshot.MultipleChoiceDoc.shared(f"Question: w{i}\nAnswer:", ["w5", "w6 w7"], gold)
            for i, gold in enumerate([0, 1, 0, 0, 1])]
    committed: dict[str, dict] = {}
    whole = zeroshot.evaluate_multiple_choice(model, tok, docs, on_part=committed.__setitem__)
    assert list(committed) == ["0-2", "2-4", "4-5"] and len(committed["4-5"]["outcomes"]) == 1
    assert all(len(lls) == 2 and all(isinstance(ll, float) for ll in lls)
               for piece in committed.values() for lls in piece["outcomes"])

    score, calls = zeroshot.loglikelihoods, []
    monkeypatch.setattr(zeroshot, "loglikelihoods", _scorer_killed_in_call(2, score, calls))
    finished: dict[str, dict] = {}
    with pytest.raises(_Killed):
        zeroshot.evaluate_multiple_choice(model, tok, docs, on_part=finished.__setitem__)
    assert list(finished) == ["0-2"]
    stored = json.loads(json.dumps(finished))  # as a journal reads it back
    calls.clear()
    monkeypatch.setattr(zeroshot, "loglikelihoods", lambda *a, **k: calls.append(len(a[1])) or score(*a, **k))
    again: dict[str, dict] = {}
    resumed = zeroshot.evaluate_multiple_choice(model, tok, docs, finished=stored, on_part=again.__setitem__)
    assert _figures(resumed) == _figures(whole)
    assert resumed["seconds"] >= stored["0-2"]["seconds"]  # the reused part's time counts
    assert calls == [4, 2] and list(again) == ["2-4", "4-5"]  # the first part was not scored again
    monkeypatch.setattr(zeroshot, "TASK_PART_ITEMS", 3)  # parts of another size are other ranges: none reused
    calls.clear()
    zeroshot.evaluate_multiple_choice(model, tok, docs, finished=stored)
    assert calls == [6, 4]


def test_the_batching_noise_benchmark_compares_the_same_choices_in_order(tok):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import task_batching_noise

    model = bigram((":", "w5", 5.0))
    docs = [zeroshot.MultipleChoiceDoc.shared(f"Question: w{i}\nAnswer:", ["w5", "w6 w7", "w8"], i % 3)
            for i in range(5)]
    whole, result = task_batching_noise.score(model, tok, docs, 5, 8, True)
    split, _ = task_batching_noise.score(model, tok, docs, 2, 8, True)
    assert len(whole) == 15 and split == pytest.approx(whole, abs=1e-6)
    assert whole[:3] == pytest.approx([logp(model, ":", "w5"), logp(model, ":", "w6") + logp(model, "w6", "w7"),
                                       logp(model, ":", "w8")], abs=1e-5)
    assert result["n"] == 5 and zeroshot.TASK_PART_ITEMS == 1000  # the module setting is restored


def test_lambada_resumes_part_by_part(tok, monkeypatch):
    monkeypatch.setattr(zeroshot, "TASK_PART_ITEMS", 2)
    model = bigram(("w1", "w2", 8.0), ("w2", "w3", 8.0))
    pairs = [("w0 w1", " w2"), ("w0 w2", " w3"), ("w0 w1", " w4")]
    committed: dict[str, dict] = {}
    whole = zeroshot.evaluate_lambada(model, tok, pairs, on_part=committed.__setitem__)
    assert list(committed) == ["0-2", "2-3"] and committed["0-2"]["outcomes"][0][1] is True
    stored = json.loads(json.dumps({"0-2": committed["0-2"]}))
    assert _figures(zeroshot.evaluate_lambada(model, tok, pairs, finished=stored)) == _figures(whole)


def _reference_ll(model, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)[-n_cont:]
    return logprobs.gather(-1, torch.tensor(ids[-n_cont:]).unsqueeze(-1)).sum().item()


def _random_requests(seed: int, count: int, prefix: list[int] = ()) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(count):
        n_ctx = int(torch.randint(1, 12, (1,), generator=gen))
        n_cont = int(torch.randint(1, 4, (1,), generator=gen))
        tokens = torch.randint(2, VOCAB_SIZE, (n_ctx + n_cont,), generator=gen).tolist()
        requests.append((list(prefix) + tokens[:n_ctx], tokens[n_ctx:]))
    return requests


def test_batched_right_padded_scoring_matches_one_sequence_at_a_time(llama):
    requests = _random_requests(0, 9)
    requests.append((requests[0][0], [requests[0][1][0]]))  # same input as another one-token request
    batched = zeroshot.loglikelihoods(llama, requests, batch_size=4)
    for (ctx, cont), (ll, _) in zip(requests, batched):
        assert ll == pytest.approx(_reference_ll(llama, ctx + cont, len(cont)), abs=1e-4)


def test_long_inputs_are_cut_from_the_left(llama):
    ctx, cont = list(range(2, 30)), [40, 41]
    [(ll, _)] = zeroshot.loglikelihoods(llama, [(ctx, cont)], max_length=10)
    assert ll == pytest.approx(_reference_ll(llama, (ctx + cont)[-11:], 2), abs=1e-4)


def test_shared_prefix_cache_changes_nothing(llama):
    prefix = list(range(50, 70))
    requests = _random_requests(1, 7, prefix) + [(prefix[:5], [3, 4])]  # the last one does not extend it
    plain = zeroshot.loglikelihoods(llama, requests, batch_size=3)
    cached = zeroshot.loglikelihoods(llama, requests, batch_size=3, prefix=prefix)
    assert [g for _, g in plain] == [g for _, g in cached]
    assert [ll for ll, _ in cached] == pytest.approx([ll for ll, _ in plain], abs=1e-4)


def _multiple_choice_requests(seed: int, docs: int, prefix: list[int] = ()) -> list[tuple[list[int], list[int]]]:
    """Contexts of varied length, each followed by 2-5 choices of 1-4 tokens (some repeated)."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(docs):
        context = list(prefix) + torch.randint(2, VOCAB_SIZE, (int(torch.randint(1, 15, (1,), generator=gen)),),
                                               generator=gen).tolist()
        choices = [torch.randint(2, VOCAB_SIZE, (int(torch.randint(1, 5, (1,), generator=gen)),),
                                 generator=gen).tolist() for _ in range(int(torch.randint(2, 6, (1,), generator=gen)))]
        requests += [(context, choice) for choice in choices + choices[:1]]
    return requests


@pytest.mark.parametrize("tiny_model", ["llama", "qwen2"], indirect=True)
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_contexts_score_like_each_choice_alone(tiny_model, batch_size):
    model = tiny_model(seed=3, hidden_size=64, vocab_size=VOCAB_SIZE)
    requests = _multiple_choice_requests(4, 6) + [([9], [3]), ([9], [4, 5])]  # one-token contexts too
    for (ctx, cont), (ll, greedy) in zip(requests, zeroshot.loglikelihoods(model, requests, batch_size=batch_size)):
        assert ll == pytest.approx(_reference_ll(model, ctx + cont, len(cont)), abs=1e-4)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):]
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())


def test_shared_contexts_after_a_prefix_cache(llama):
    prefix = list(range(50, 62))
    requests = _multiple_choice_requests(5, 5, prefix)
    cached = zeroshot.loglikelihoods(llama, requests, batch_size=4, prefix=prefix)
    for (ctx, cont), (ll, _) in zip(requests, cached):
        assert ll == pytest.approx(_reference_ll(llama, ctx + cont, len(cont)), abs=1e-4)


def test_shared_contexts_run_once():
    calls = []
    model = BigramLM(torch.zeros(VOCAB_SIZE, VOCAB_SIZE))
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    context = list(range(2, 22))
    zeroshot.loglikelihoods(model, [(context, [30 + i, 40]) for i in range(4)], batch_size=8)
    assert calls == [(1, 19), (4, 2)]  # the stem once, then four two-token tails


def test_the_vocabulary_projection_gets_contiguous_inputs_only_while_scoring(llama):
    seen = []
    llama.lm_head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    zeroshot.loglikelihoods(llama, _multiple_choice_requests(7, 8) + _random_requests(8, 12), batch_size=4)
    assert seen and all(seen)  # without the hook the kept slices of the hidden states are strided views
    assert not llama.lm_head._forward_pre_hooks


def test_the_vocabulary_projection_sees_only_the_positions_whose_logits_are_read(llama):
    """Right-padded rows of different lengths: the kept span covers padding and context too."""
    requests = _random_requests(9, 10)
    assert len({tuple(c + k) for c, k in requests}) == len(requests)  # no two share a row
    projected = []
    llama.lm_head.register_forward_hook(lambda _, args, out: projected.append(args[0].shape[:-1].numel()))
    scores = zeroshot.loglikelihoods(llama, requests, batch_size=4)
    assert sum(projected) == sum(len(k) for _, k in requests)
    for (ctx, cont), (ll, _) in zip(requests, scores):
        assert ll == pytest.approx(_reference_ll(llama, ctx + cont, len(cont)), abs=1e-4)


def test_a_head_the_forward_does_not_call_is_not_trusted(llama, monkeypatch):
    """Wrappers may report an output module their forward never calls: then every kept
    position is projected as before, and the scores stay exact."""
    monkeypatch.setattr(llama, "get_output_embeddings", lambda: torch.nn.Linear(4, 4))
    requests = _random_requests(10, 8) + _multiple_choice_requests(11, 3)
    scores = zeroshot.loglikelihoods(llama, requests, batch_size=4)
    for (ctx, cont), (ll, _) in zip(requests, scores):
        assert ll == pytest.approx(_reference_ll(llama, ctx + cont, len(cont)), abs=1e-4)


def test_forward_passes_stay_within_the_token_budget(llama):
    shapes = []
    llama.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    requests = _multiple_choice_requests(7, 8) + _random_requests(8, 12)
    budgeted = zeroshot.loglikelihoods(llama, requests, batch_size=16, max_tokens=24)
    assert all(rows == 1 or rows * width <= 24 for rows, width in shapes)
    shapes.clear()
    one_row = zeroshot.loglikelihoods(llama, requests, batch_size=1)
    assert max(rows for rows, _ in shapes) == 1  # a context with several choices runs once per choice then
    assert [ll for ll, _ in one_row] == pytest.approx([ll for ll, _ in budgeted], abs=1e-4)
    shapes.clear()
    assert [ll for ll, _ in zeroshot.loglikelihoods(llama, requests, batch_size=16, max_tokens=10_000)] == \
        pytest.approx([ll for ll, _ in budgeted], abs=1e-4)
    assert max(rows for rows, _ in shapes) == 16  # a generous budget leaves batch_size as the limit


def test_a_gpu_pass_is_sixteen_cpu_passes_within_a_cache_memory_bound(llama):
    assert zeroshot.pass_budget(torch.device("cpu")) == (zeroshot.TOKENS_PER_PASS, zeroshot.CACHE_TOKENS_PER_PASS)
    tokens, cached = zeroshot.pass_budget(torch.device("cuda", 0))
    assert (tokens, cached) == (16 * zeroshot.TOKENS_PER_PASS, 16 * zeroshot.CACHE_TOKENS_PER_PASS)
    seven_b = 2 * 32 * 32 * 128 * 2  # Llama-2-7B in bf16: 0.5 MB of cache per position
    assert zeroshot.pass_budget(torch.device("cuda"), seven_b)[1] * seven_b <= zeroshot.GPU_CACHE_BYTES
    config = llama.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert zeroshot.kv_bytes_per_position(llama) == \
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4


def test_placed_on_moves_models_back_even_when_evaluation_fails():
    from unibcq.eval.suite import placed_on

    class Recorded(torch.nn.Linear):
        def to(self, device):  # records the moves; no GPU is needed to check them
            self.moves.append(str(device))
            return self

    model = Recorded(2, 2)
    model.moves = []
    with pytest.raises(RuntimeError), placed_on("cuda:0", model, None):
        raise RuntimeError("evaluation failed")
    assert model.moves == ["cuda:0", "cpu"]


def test_sliding_window_models_are_scored_exactly(tiny_qwen2):
    model = tiny_qwen2(seed=5, hidden_size=64, vocab_size=VOCAB_SIZE, use_sliding_window=True, sliding_window=6,
                       max_window_layers=0)
    assert zeroshot._sliding_window(model) == 6
    requests = _multiple_choice_requests(9, 4)
    for (ctx, cont), (ll, _) in zip(requests, zeroshot.loglikelihoods(model, requests, batch_size=8)):
        assert ll == pytest.approx(_reference_ll(model, ctx + cont, len(cont)), abs=1e-4)


def test_a_request_without_context_is_refused(llama):
    with pytest.raises(UnibcqError, match="at least one context token"):
        zeroshot.loglikelihoods(llama, [([], [5])])


def test_bfloat16_task_scoring_without_a_fast_bfloat16_gemm_runs_float32_gemms(llama, tok, data_dir, monkeypatch):
    from linear_recorder import LinearDtypes
    from unibcq import compute_dtype

    monkeypatch.setattr(compute_dtype, "native_half_gemm", lambda dtype: False)
    monkeypatch.setattr(compute_dtype, "FLOAT32_GEMM_MIN_ROWS", 4)  # the tiny task's passes are short
    with LinearDtypes() as seen:
        run_tasks(llama, tok, ["piqa"], limit=None, data_dir=data_dir, batch_size=8, show_progress=False,
                  dtype="bfloat16")
    assert torch.float32 in seen.dtypes


def test_bfloat16_scoring_restores_the_exact_float32_parameters(llama):
    from unibcq.eval.tasks import parameters_as

    originals = {name: (p.data_ptr(), p.detach().clone()) for name, p in llama.named_parameters()}
    buffers = {name: b.dtype for name, b in llama.named_buffers()}
    requests = _multiple_choice_requests(6, 3)
    plain = zeroshot.loglikelihoods(llama, requests)
    with torch.inference_mode(), parameters_as(llama, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in llama.parameters())
        assert {name: b.dtype for name, b in llama.named_buffers()} == buffers  # rotary frequencies stay float32
        low = zeroshot.loglikelihoods(llama, requests)
    assert all(p.dtype == torch.float32 and p.data_ptr() == originals[name][0] and torch.equal(p, originals[name][1])
               for name, p in llama.named_parameters())
    assert [ll for ll, _ in low] == pytest.approx([ll for ll, _ in plain], rel=0.05)


def test_progress_reports_every_request(llama):
    seen = []
    zeroshot.loglikelihoods(llama, _random_requests(2, 5), batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (5, 5) and all(t == 5 for _, t in seen)


# ----------------------------------------------------------------------------- MMLU


def test_mmlu_prompt_is_the_standard_one():
    exemplar = mmlu.Question("What is 2 + 2?", ("3", "4", "5", "6"), "B")
    question = mmlu.Question("Which organelle makes ATP?", ("Nucleus", "Ribosome", "Mitochondrion", "Golgi"), "C")
    expected = (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "Which organelle makes ATP?\nA. Nucleus\nB. Ribosome\nC. Mitochondrion\nD. Golgi\nAnswer:"
    )
    assert mmlu.build_prompt("high_school_biology", [exemplar], question) == expected
    assert mmlu.build_prompt("anatomy", [], question).startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\nWhich organelle")


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A miniature data folder: PIQA (4 items) and MMLU with two subjects."""
    root = tmp_path / "data"
    _write_jsonl(root / "zeroshot/piqa/valid.jsonl",
                 [{"goal": f"w{i} ?", "sol1": "w5 w6", "sol2": "w9"} for i in range(4)])
    (root / "zeroshot/piqa/valid-labels.lst").write_text("0\n0\n1\n0\n")
    for subject, answers in (("biology", "BBC"), ("chemistry", "BA")):
        _write_csv(root / f"mmlu/dev/{subject}_dev.csv", [["w1 ?", "w2", "w3", "w4", "w5", "A"]])
        _write_csv(root / f"mmlu/test/{subject}_test.csv",
                   [[f"w{10 + i}, w{20 + i} ?", "w2", "w3", "w4", "w5", a] for i, a in enumerate(answers)])
    return root


def test_mmlu_micro_and_macro_accuracy(tok, data_dir):
    model = bigram((":", "B", 6.0))  # always answers B
    result = mmlu.evaluate_mmlu(model, tok, data_dir, shots=1)
    assert result["n"] == 5 and result["acc"] == pytest.approx(3 / 5)
    assert result["acc_macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["subjects"] == {"biology": {"acc": pytest.approx(2 / 3), "n": 3},
                                  "chemistry": {"acc": 0.5, "n": 2}}
    limited = mmlu.evaluate_mmlu(model, tok, data_dir, shots=0, limit=1)
    assert limited["n"] == 2 and limited["acc"] == 1.0 and limited["shots"] == 0


def test_mmlu_resumes_subject_by_subject(tok, data_dir, monkeypatch):
    model = bigram((":", "B", 6.0))
    committed: dict[str, dict] = {}
    whole = mmlu.evaluate_mmlu(model, tok, data_dir, shots=1, on_subject=committed.__setitem__)
    assert {s: c["hits"] for s, c in committed.items()} == {"biology": [1, 1, 0], "chemistry": [1, 0]}
    scored, score = [], mmlu.loglikelihoods
    monkeypatch.setattr(mmlu, "loglikelihoods", lambda m, requests, *a, **k: scored.append(len(requests))
                        or score(m, requests, *a, **k))
    again: dict[str, dict] = {}
    resumed = mmlu.evaluate_mmlu(model, tok, data_dir, shots=1, finished={"biology": committed["biology"]},
                                 on_subject=again.__setitem__)
    assert scored == [8] and _figures(resumed) == _figures(whole)  # only chemistry's 2 x 4 letters were scored
    assert resumed["seconds"] >= committed["biology"]["seconds"]
    assert list(again) == ["chemistry"]  # a reused subject is not committed again
    encoded, encode_batch = [], zeroshot.encode_batch
    monkeypatch.setattr(zeroshot, "encode_batch", lambda t, texts: encoded.extend(texts) or encode_batch(t, texts))
    mmlu.evaluate_mmlu(model, tok, data_dir, shots=1, finished={"biology": committed["biology"]})
    assert encoded and not any("biology" in text for text in encoded)  # a finished subject is not even tokenized


def test_mmlu_shots_beyond_the_dev_split_are_refused(tok, data_dir):
    with pytest.raises(UnibcqError, match="fewer than 2 shots"):
        mmlu.evaluate_mmlu(bigram(), tok, data_dir, shots=2)
    with pytest.raises(UnibcqError, match="between 0 and 5"):
        mmlu.evaluate_mmlu(bigram(), tok, data_dir, shots=6)


def test_empty_or_missing_task_files_are_refused_before_a_model_loads(tok, data_dir):
    """An emptied MMLU test file was skipped, shrinking the averages unnoticed; a missing dev
    file and an empty task file were found only once scoring began, after the model loaded."""
    (data_dir / "mmlu/test/chemistry_test.csv").write_text("")
    with pytest.raises(UnibcqError, match="chemistry_test.csv holds no questions"):
        mmlu.evaluate_mmlu(bigram(), tok, data_dir, shots=1)
    with pytest.raises(UnibcqError, match="chemistry_test.csv holds no questions"):
        check_tasks(["mmlu"], None, data_dir)
    (data_dir / "mmlu/test/chemistry_test.csv").unlink()
    (data_dir / "mmlu/dev/biology_dev.csv").unlink()
    with pytest.raises(UnibcqError, match="biology_dev.csv"):
        check_tasks(["mmlu"], None, data_dir, mmlu_shots=5)
    check_tasks(["mmlu"], None, data_dir, mmlu_shots=0)  # zero-shot reads no dev file
    (data_dir / "zeroshot/piqa/valid.jsonl").write_text("\n")
    with pytest.raises(UnibcqError, match="valid.jsonl holds no rows to score"):
        check_tasks(["piqa"], None, data_dir)


def test_a_byte_order_mark_is_not_part_of_the_first_mmlu_question(data_dir):
    path = data_dir / "mmlu/test/biology_test.csv"
    path.write_bytes("\ufeff".encode() + path.read_bytes())
    assert mmlu.read_questions(path)[0].question == "w10, w20 ?"


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(("text", "strict", "flexible"), [
    ("She makes 9 * 2 = 18 dollars. The answer is 18.", "18", "18."),
    ("The answer is 1,234.\n", "1,234", "1,234."),
    ("It is -5 degrees. The answer is -5. Q", "-5.", "-5."),  # the pattern's last "." is any character
    ("The answer is $3.50 each", gsm8k.INVALID, "$3.50"),  # lm-eval's strict pattern takes no "$"
    ("so 12 apples and 7.5 kg, total $1,000.", gsm8k.INVALID, "$1,000."),
    ("The answer is 7 because 8", "7", "8"),
    ("I do not know...", gsm8k.INVALID, "..."),
    ("I do not know", gsm8k.INVALID, gsm8k.INVALID),
])
def test_gsm8k_answer_extraction_follows_lm_eval_filters(text, strict, flexible):
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


@pytest.mark.parametrize(("extracted", "gold", "hit"), [
    ("18.", "18", True), ("$1,000.", "1000", True), ("2,125", "2,125", True), ("-5.", "-5", True),
    ("18.00", "18", False), ("018", "18", False), ("1,000..", "1000", False), ("...", "3", False),
    (gsm8k.INVALID, "18", False),
])
def test_gsm8k_answers_match_as_normalised_strings(extracted, gold, hit):
    assert gsm8k.is_correct(extracted, gold) is hit


def test_gsm8k_stop_sequences_and_prompt():
    assert gsm8k.truncate_at_stop("a. The answer is 4.\n\nQ: b") == "a. The answer is 4.\n\n"
    assert gsm8k.truncate_at_stop("a\n</s>Q: b") == "a\n"
    prompt = gsm8k.build_prompt("How many?")
    assert prompt.count("Q: ") == 9 and prompt.endswith(" The answer is 8.\n\nQ: How many?\nA:")
    assert prompt.startswith("Q: There are 15 trees in the grove.")
    assert "\nA: There are 15 trees originally." in prompt and "= 6. The answer is 6.\n\nQ: If there" in prompt


def test_gsm8k_scores_a_stub_generator():
    problems = [gsm8k.Problem(f"q{i}", g) for i, g in enumerate(["18", "3", "7", "10", "1,000"])]
    canned = {"q0": "x = 18. The answer is 18.\n\nQ: 99", "q1": "The answer is 3.", "q2": "The answer is 7 because 8",
              "q3": "I do not know", "q4": "Total: $1,000"}
    batches = []

    def generate(prompts: list[str]) -> list[str]:
        batches.append(len(prompts))
        return [canned[p.rsplit("Q: ", 1)[1].split("\n")[0]] for p in prompts]

    result = gsm8k.evaluate_gsm8k(problems, generate, batch_size=2)
    assert batches == [2, 2, 1]
    assert result["acc"] == pytest.approx(3 / 5) and result["acc_strict"] == pytest.approx(3 / 5)
    assert result["n"] == 5 and result["acc_norm"] is None


def test_gsm8k_chat_prompt_turns_each_exemplar_into_a_user_and_an_assistant_turn():
    class Template:
        chat_template = "stand-in"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"

    prompt = gsm8k.build_chat_prompt(Template(), "How many?")
    assert prompt.count("<user>Q: ") == 9 and prompt.count("<assistant>") == 9
    assert prompt.startswith("<user>Q: There are 15 trees in the grove.")
    assert "</><assistant>There are 15 trees originally." in prompt and "The answer is 6.</>" in prompt
    assert prompt.endswith("<user>Q: How many?\nA:</><assistant>")
    with pytest.raises(UnibcqError, match="no chat template"):
        gsm8k.build_chat_prompt(object(), "How many?")


def test_chat_template_is_refused_without_gsm8k(data_dir):
    with pytest.raises(UnibcqError, match="gsm8k"):
        check_tasks(["piqa"], None, data_dir, chat_template=True)
    with pytest.raises(UnibcqError, match="gsm8k"):
        EvalSettings.from_flags("wikitext2", None, chat_template=True).check()


def test_task_options_without_tasks_are_refused_not_ignored(tmp_path):
    """--limit and --mmlu-shots only shape benchmark tasks; without --tasks they did nothing, silently."""
    text = tmp_path / "text.txt"
    text.write_text("w1 w2 w3")
    for options, flag in (({"limit": 10}, "--limit"), ({"mmlu_shots": 0}, "--mmlu-shots")):
        with pytest.raises(UnibcqError, match=f"{flag} applies to benchmark tasks; add --tasks"):
            EvalSettings.from_flags(str(text), None, **options).check()
    EvalSettings.from_flags(str(text), None, mmlu_shots=5).check()


def test_gsm8k_runs_end_to_end_plain_and_as_a_chat(tiny_llama, tok, data_dir, monkeypatch):
    monkeypatch.setattr(tasks_module, "greedy_generator", functools.partial(gsm8k.greedy_generator, max_new_tokens=4))
    llama = tiny_llama(seed=3, hidden_size=64, vocab_size=VOCAB_SIZE, max_position_embeddings=1024)
    _write_jsonl(data_dir / gsm8k.GSM8K_FILE, [{"question": "w1 w2 ?", "answer": "w3\n#### 18"},
                                               {"question": "w4 ?", "answer": "w5\n#### 1,000"}])
    plain = run_tasks(llama, tok, ["gsm8k"], None, data_dir, show_progress=False)["gsm8k"]
    assert plain["n"] == 2 and plain["chat_template"] is False and 0 <= plain["acc"] <= 1
    with pytest.raises(UnibcqError, match="no chat template"):
        run_tasks(llama, tok, ["gsm8k"], None, data_dir, show_progress=False, chat_template=True)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    chat = run_tasks(llama, tok, ["gsm8k"], None, data_dir, show_progress=False, chat_template=True)["gsm8k"]
    assert chat["n"] == 2 and chat["chat_template"] is True


def test_gsm8k_hf_generation_is_the_same_batched_and_alone(llama, tok):
    generate = gsm8k.greedy_generator(llama, tok, max_new_tokens=4, max_length=64)
    prompts = ["w1 w2 w3 w4 w5 w6 w7", "w9 w8"]
    together = generate(prompts)
    assert together == [generate([p])[0] for p in prompts]
    assert all(isinstance(t, str) for t in together)


# ----------------------------------------------------------------------------- dispatcher


def test_unknown_task_lists_the_valid_names(data_dir):
    with pytest.raises(UnibcqError, match="unknown task 'pika'.*piqa.*gsm8k"):
        resolve_tasks(["pika"], data_dir)


def test_all_means_the_zero_shot_tasks_present_plus_mmlu(data_dir):
    assert resolve_tasks(["all", "piqa", "gsm8k"], data_dir) == ["piqa", "mmlu", "gsm8k"]


def test_missing_files_and_data_dir_are_user_errors(data_dir, tok, monkeypatch):
    with pytest.raises(UnibcqError, match=r"boolq/val\.jsonl not found.*--data-dir"):
        run_tasks(bigram(), tok, ["boolq"], None, data_dir, show_progress=False)
    monkeypatch.delenv("UNIBCQ_DATA_DIR", raising=False)
    with pytest.raises(UnibcqError, match="UNIBCQ_DATA_DIR"):
        run_tasks(bigram(), tok, ["piqa"], None, None, show_progress=False)
    with pytest.raises(UnibcqError, match="--limit"):
        run_tasks(bigram(), tok, ["piqa"], 0, data_dir, show_progress=False)


def test_run_tasks_reports_every_task_and_the_zero_shot_mean(data_dir, tok):
    model = bigram((":", "w5", 5.0), ("w5", "w6", 5.0), (":", "B", 6.0))  # PIQA picks sol1 ("w5 w6"), MMLU B
    results = run_tasks(model, tok, ["piqa", "mmlu"], None, data_dir, mmlu_shots=1, batch_size=2, show_progress=False)
    assert results["piqa"]["acc"] == 0.75 and results["piqa"]["n"] == 4
    assert results["mmlu"]["acc"] == pytest.approx(3 / 5) and results["mmlu"]["shots"] == 1
    assert results[MEAN_KEY] == {"mean_acc": results["piqa"]["acc_norm"], "tasks": ["piqa"]}
    assert all(results[name]["seconds"] >= 0 for name in ("piqa", "mmlu"))


def test_run_tasks_resumes_a_task_killed_mid_way_from_its_journal(data_dir, tok, tmp_path, monkeypatch):
    from unibcq.eval.journal import EvalJournal

    monkeypatch.setattr(zeroshot, "TASK_PART_ITEMS", 2)  # PIQA's 4 questions: parts 0-2 and 2-4
    model = bigram((":", "w5", 5.0), ("w5", "w6", 5.0))
    whole = run_tasks(model, tok, ["piqa"], None, data_dir, show_progress=False)["piqa"]
    path = tmp_path / "r.json.partial"
    score, calls = zeroshot.loglikelihoods, []
    monkeypatch.setattr(zeroshot, "loglikelihoods", _scorer_killed_in_call(2, score, calls))
    with pytest.raises(_Killed):
        run_tasks(model, tok, ["piqa"], None, data_dir, show_progress=False, journal=EvalJournal(path, {"k": 1}))
    first = json.loads(path.read_text())["pieces"]["part"]["piqa:0-2"]
    first["seconds"] = 1000.0  # a part that took long, so its share of the resumed time shows
    stored = json.loads(path.read_text())
    stored["pieces"]["part"]["piqa:0-2"] = first
    path.write_text(json.dumps(stored))
    calls.clear()
    monkeypatch.setattr(zeroshot, "loglikelihoods", lambda *a, **k: calls.append(len(a[1])) or score(*a, **k))
    journal = EvalJournal(path, {"k": 1})
    resumed = run_tasks(model, tok, ["piqa"], None, data_dir, show_progress=False, journal=journal)["piqa"]
    assert calls == [4] and _figures(resumed) == _figures(whole)  # only the second part was scored
    assert 1000.0 <= resumed["seconds"] < 1100.0
    assert set(json.loads(path.read_text())["pieces"]) == {"task"}  # the parts left with the finished task


# ----------------------------------------------------------------------------- real data files


@pytest.fixture
def real_data(monkeypatch) -> Path:
    """The shared datasets folder ($UNIBCQ_DATA_DIR, else ../shared/datasets next to the repo)."""
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("UNIBCQ_DATA_DIR", str(SHARED_DATA))
    root = zeroshot.resolve_data_dir(None)
    if root is None or not root.is_dir():
        pytest.skip("needs UNIBCQ_DATA_DIR (the shared datasets)")
    return root


CHOICES = {"piqa": {2}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "hellaswag": {4}, "winogrande": {2},
           "boolq": {2}, "openbookqa": {4}}


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_real_multiple_choice_files_load(real_data, name):
    docs = zeroshot.MULTIPLE_CHOICE[name].load(real_data, 5)
    assert len(docs) == 5
    for doc in docs:
        assert len(doc.choices) in CHOICES[name] and len(doc.contexts) == len(doc.choices)
        assert 0 <= doc.gold < len(doc.choices) and all(doc.contexts) and all(doc.choices)


def test_real_lambada_gsm8k_and_mmlu_files_load(real_data):
    pairs = zeroshot.load_lambada(real_data, 5)
    assert len(pairs) == 5 and all(t.startswith(" ") and " " not in t[1:] for _, t in pairs)
    problems = gsm8k.load_gsm8k(real_data, 3)
    assert [p.gold for p in problems] == ["18", "3", "70000"]
    subjects = mmlu.subjects(real_data)
    assert len(subjects) == 57
    for subject in subjects:
        assert len(mmlu.read_questions(real_data / f"mmlu/dev/{subject}_dev.csv")) == 5
        assert len(mmlu.read_questions(real_data / f"mmlu/test/{subject}_test.csv", 3)) == 3


def test_every_task_name_is_known():
    assert set(TASKS) == set(CHOICES) | {"lambada", "mmlu", "gsm8k"}


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def model_dir(tmp_path: Path, llama) -> Path:
    out = tmp_path / "tiny"
    llama.save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out


def test_cli_eval_tasks_writes_json(capsys, tmp_path, model_dir, data_dir):
    report_path = tmp_path / "report.json"
    code = main(["eval", str(model_dir), "--ppl", "none", "--tasks", "piqa,mmlu", "--limit", "3", "--mmlu-shots", "1",
                 "--data-dir", str(data_dir), "--no-progress", "--json", str(report_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "piqa" in out and "mmlu" in out
    report = json.loads(report_path.read_text())
    assert report["ppl"] == {} and report["kl_vs_ref"] is None
    tasks = report["tasks"]
    assert tasks["piqa"]["n"] == 3 and tasks["mmlu"]["n"] == 5 and tasks["mmlu"]["shots"] == 1
    assert 0 <= tasks["piqa"]["acc"] <= 1 and tasks[MEAN_KEY]["tasks"] == ["piqa"]
    assert report["task_dtype"] == "float32"


def test_cli_eval_tasks_in_bfloat16_records_the_dtype(capsys, tmp_path, model_dir, data_dir):
    report_path = tmp_path / "report.json"
    code = main(["eval", str(model_dir), "--ppl", "none", "--tasks", "piqa", "--limit", "3", "--task-dtype",
                 "bfloat16", "--data-dir", str(data_dir), "--no-progress", "--json", str(report_path)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["task_dtype"] == "bfloat16" and report["tasks"]["piqa"]["n"] == 3


@pytest.mark.parametrize(("argv", "message"), [
    (["--ppl", "none"], "nothing to evaluate"),
    (["--ppl", "none", "--tasks", "piqa,nope"], "unknown task 'nope'"),
    (["--ppl", "none", "--tasks", "mmlu", "--mmlu-shots", "7"], "--mmlu-shots"),
    (["--ppl", "none", "--tasks", "piqa", "--device", "tpu"], "--device takes cpu, cuda or cuda:N"),
    (["--ppl", "none", "--tasks", "piqa", "--device", "cuda:9"], "--device cuda:9"),
    (["--ppl", "none", "--tasks", "piqa", "--device", "cpu:1"], "use cpu, cuda or cuda:N"),
])
def test_cli_eval_task_errors(capsys, model_dir, data_dir, argv, message):
    code = main(["eval", str(model_dir), "--data-dir", str(data_dir), "--no-progress", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err


class _Killed(Exception):
    """Stands for the process dying half-way (out of memory, Ctrl-C, the session ending)."""


def _eval_argv(model_dir: Path, data_dir: Path, report_path: Path, limit: str = "3") -> list[str]:
    corpus = data_dir / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(" ".join(WORDS[i % 50] for i in range(400)))
    return ["eval", str(model_dir), "--ppl", str(corpus), "--seq-len", "16", "--max-windows", "3", "--kl-ref", "none",
            "--tasks", "piqa,mmlu", "--limit", limit, "--mmlu-shots", "1", "--data-dir", str(data_dir),
            "--no-progress", "--json", str(report_path)]


def test_cli_eval_killed_half_way_resumes_without_redoing_finished_pieces(capsys, tmp_path, model_dir, data_dir,
                                                                          monkeypatch):
    import unibcq.eval.perplexity as perplexity
    import unibcq.eval.tasks as tasks

    report_path = model_dir / "eval.json"  # beside the checkpoint: the journal must not fingerprint itself
    argv = _eval_argv(model_dir, data_dir, report_path)
    assert main(argv) == 0, capsys.readouterr().err
    uninterrupted = json.loads(report_path.read_text())
    report_path.unlink()

    calls: list[str] = []
    windows, piqa, score = perplexity.evaluate_windows, tasks.evaluate_multiple_choice, mmlu.loglikelihoods
    monkeypatch.setattr(perplexity, "evaluate_windows", lambda *a, **k: calls.append("ppl") or windows(*a, **k))
    monkeypatch.setattr(tasks, "evaluate_multiple_choice", lambda *a, **k: calls.append("piqa") or piqa(*a, **k))

    def dies_in_the_second_subject(*args, **kwargs):
        calls.append("mmlu subject")
        if calls.count("mmlu subject") == 2:
            raise _Killed
        return score(*args, **kwargs)

    monkeypatch.setattr(mmlu, "loglikelihoods", dies_in_the_second_subject)
    with pytest.raises(_Killed):
        main(argv)
    journal = Path(f"{report_path}.partial")
    assert not report_path.exists() and calls == ["ppl", "piqa", "mmlu subject", "mmlu subject"]
    pieces = json.loads(journal.read_text())["pieces"]
    assert set(pieces["task"]) == {"piqa"} and set(pieces["mmlu"]) == {"biology"}
    assert "part" not in pieces  # a finished task's parts leave the journal with it

    calls.clear()
    monkeypatch.setattr(mmlu, "loglikelihoods", lambda *a, **k: calls.append("mmlu subject") or score(*a, **k))
    argv += ["--batch-size", "1"]  # a smaller batch (say, after running out of memory) still resumes
    argv[argv.index("piqa,mmlu")] = "mmlu,piqa"  # so does another order of the same tasks
    assert main(argv) == 0, capsys.readouterr().err
    assert calls == ["mmlu subject"], "finished pieces were measured again"
    assert "(1 perplexity dataset(s), 1 task(s), 1 MMLU subject(s) already measured)" in capsys.readouterr().err
    assert not journal.exists()
    resumed = json.loads(report_path.read_text())
    for key in ("ppl", "windows", "tokens"):
        assert resumed[key] == uninterrupted[key]
    for name in ("piqa", "mmlu"):
        assert ({k: v for k, v in resumed["tasks"][name].items() if k != "seconds"}
                == {k: v for k, v in uninterrupted["tasks"][name].items() if k != "seconds"})


def test_cli_eval_ignores_a_journal_from_other_settings(capsys, tmp_path, model_dir, data_dir, monkeypatch):
    import unibcq.eval.tasks as tasks

    report_path = tmp_path / "report.json"
    run_one = tasks._run_one

    def dies_at_mmlu(name, *args, **kwargs):
        if name == "mmlu":
            raise _Killed
        return run_one(name, *args, **kwargs)

    monkeypatch.setattr(tasks, "_run_one", dies_at_mmlu)
    with pytest.raises(_Killed):
        main(_eval_argv(model_dir, data_dir, report_path, limit="3"))
    monkeypatch.undo()
    calls: list[str] = []
    monkeypatch.setattr(tasks, "_run_one", lambda name, *a, **k: calls.append(name) or run_one(name, *a, **k))
    assert main(_eval_argv(model_dir, data_dir, report_path, limit="2")) == 0
    assert "other settings" in capsys.readouterr().err and calls == ["piqa", "mmlu"]
    assert json.loads(report_path.read_text())["tasks"]["piqa"]["n"] == 2


def test_journal_survives_a_corrupt_file_and_commits_each_piece(tmp_path, capsys):
    from unibcq.eval.journal import EvalJournal

    path = tmp_path / "r.json.partial"
    path.write_text("{ truncated")
    journal = EvalJournal(path, {"limit": 3, "data_dir": tmp_path})
    assert "unreadable" in capsys.readouterr().err and journal.summary() == ""
    journal.put("task", "piqa", {"acc": 0.5})
    again = EvalJournal(path, {"limit": 3, "data_dir": tmp_path})
    assert again.get("task", "piqa") == {"acc": 0.5} and again.get("ppl", "wikitext2") is None
    assert again.summary() == "1 task(s)"
    again.remove()
    assert not path.exists()


def test_a_home_relative_journal_is_read_where_it_is_written(tmp_path, monkeypatch):
    """`eval --json=~/r.json` (no shell expansion after "=") wrote its journal to $HOME but
    looked for it under ./~, so a killed run never resumed and the journal stayed behind."""
    from unibcq.eval.journal import EvalJournal

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    EvalJournal("~/r.json.partial", {"k": 1}).put("task", "piqa", {"acc": 0.5})
    again = EvalJournal("~/r.json.partial", {"k": 1})
    assert again.get("task", "piqa") == {"acc": 0.5}
    assert EvalJournal.stored_protocol("~/r.json.partial") == {"k": 1}
    again.remove()
    assert not (tmp_path / "home" / "r.json.partial").exists() and not (tmp_path / "~").exists()


def test_a_journal_that_cannot_be_written_only_costs_the_resume(tmp_path, capsys):
    from unibcq.eval.journal import EvalJournal

    (tmp_path / "a-file").write_text("not a folder")
    journal = EvalJournal(tmp_path / "a-file" / "r.json.partial", {"limit": 3})
    journal.put("task", "piqa", {"acc": 0.5})
    journal.put("task", "boolq", {"acc": 0.6})
    err = capsys.readouterr().err
    assert err.count("will not be resumable") == 1 and journal.get("task", "boolq") == {"acc": 0.6}


def test_a_model_folder_written_anew_under_the_same_path_changes_the_fingerprint(tmp_path):
    from unibcq.models.fingerprint import files_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"old weights")
    before = files_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"new weights, longer")
    assert files_fingerprint(tmp_path) != before and files_fingerprint("org/hub-model-id") is None


def test_generation_stops_once_the_completion_holds_a_stop_sequence():
    class Chars:
        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join(chr(int(i)) for i in row) for row in rows]

    stop = gsm8k._StopOnText(Chars(), 2, gsm8k.STOP_SEQUENCES)
    rows = ["abQ:xxxxxx", "Q:abcdefgh", "ab</s>xxxx"]
    ids = torch.tensor([[ord(c) for c in row] for row in rows])
    assert stop(ids, None).tolist() == [True, False, True]  # a stop inside the prompt does not count


def test_a_stop_that_is_a_special_token_stops_and_cuts():
    """`<|im_end|>` ends a chat turn as a special token: decoding with special tokens skipped
    would hide it, and generation would run on past the answer into what the score then reads."""
    special = word_tokenizer()
    special.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    prompt = special.encode("w1 w2", add_special_tokens=False)
    done = special.encode("w5 <|im_end|> w7 w8", add_special_tokens=False)
    running = special.encode("w5 w6 w7 w8", add_special_tokens=False)
    ids = torch.tensor([prompt + done, prompt + running])
    assert gsm8k._StopOnText(special, len(prompt), gsm8k.STOP_SEQUENCES)(ids, None).tolist() == [True, False]
    texts = gsm8k.completions(special, ids[:, len(prompt):], gsm8k.STOP_SEQUENCES)
    assert [t.split() for t in texts] == [["w5"], ["w5", "w6", "w7", "w8"]]


def test_slot_normalizers_are_chunked_without_changing_a_number():
    """Scoring normalises read slots a chunk at a time (bounded memory); the figures are the
    unchunked float32 ones exactly, for a slot count that is not a multiple of the chunk."""
    logits = (torch.randn(zeroshot.NORMALIZER_ROWS * 2 + 37, 1000) * 4).to(torch.bfloat16)
    normalizers, argmax = zeroshot._normalizers_and_argmax(logits)
    assert torch.equal(normalizers, torch.logsumexp(logits.float(), dim=-1))
    assert torch.equal(argmax, logits.float().argmax(-1))


def test_task_files_that_are_not_utf8_are_named_in_one_error(tmp_path):
    csv_file, jsonl = tmp_path / "x_test.csv", tmp_path / "valid.jsonl"
    csv_file.write_bytes("Caf\xe9?,a,b,c,d,A\n".encode("latin-1"))
    jsonl.write_bytes('{"goal": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UnibcqError, match="x_test.csv is not UTF-8 text"):
        mmlu.read_questions(csv_file)
    with pytest.raises(UnibcqError, match="valid.jsonl is not UTF-8 text"):
        list(read_jsonl(jsonl))
