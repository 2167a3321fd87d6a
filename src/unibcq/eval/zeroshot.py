"""Zero-shot multiple-choice tasks scored by log-likelihood, following lm-evaluation-harness.

Every choice is a continuation scored after a context: the model's summed log-probability
of the continuation tokens. `acc` takes the argmax of that sum; `acc_norm` divides it by
the length of the choice text in characters first (without the " " that joins it to the
context: lm-eval's `completion_len`, `len` of the string, not its UTF-8 bytes, which are
lm-eval's separate `acc_bytes`), which removes the bias towards short answers.
Standard errors are those of a mean of 0/1 outcomes, sqrt(p (1 - p) / (n - 1)).

Prompts are lm-eval's:
  piqa        "Question: {goal}\\nAnswer:" + " {sol}"
  arc_*       "Question: {stem}\\nAnswer:" + " {choice}"
  openbookqa  "{stem}" + " {choice}"
  boolq       "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes"   (acc only)
  hellaswag   "{activity_label}: {ctx}" + " {ending}", both through lm-eval's `preprocess`
              (" [title]" becomes ". ", other [bracketed] text goes, double spaces close)
  winogrande  partial scoring: the same " {continuation}" after each of two contexts (acc only)
  lambada     last word: "{text without it}" + " {last word}"; correct iff greedy decoding
              reproduces every target token; also the perplexity exp(-mean target log-lik).

The local HellaSwag file keeps ctx_a and ctx_b joined, so ctx_b cannot be re-capitalised as
lm-eval does (about a third of the items start their second part in lower case there): its
scores are close to, not identical with, lm-eval's.

Tokenisation copies lm-eval's `_encode_pair`: trailing whitespace of the context moves to
the continuation, the context and the concatenation are encoded without special tokens
(lm-eval's causal-LM default up to v0.4.9, which most published scores used; later versions
let the tokenizer add its BOS, which changes Llama and Mistral scores, not SmolLM or Qwen),
and the continuation tokens are the concatenation's tail after the context's length.
Inputs longer than the model's window are cut from the left. A token's log-probability is
its logit minus the log-sum-exp of its position (float32), summed per continuation in double
precision; this equals log-softmax to about 1e-6 per token, so only exact ties can differ.

In bfloat16 (`--task-dtype bfloat16`) a request's score also depends on the batch it shares
(padding width, which stems run together): on SmolLM2-135M, ARC-Easy's first 600 questions
scored as one part and as three parts of 200 gave choice log-likelihoods up to 0.57 apart
and accuracies 3 questions apart, against 5e-5 and none in float32. Tasks are therefore
always scored in the same fixed parts (`score_in_parts`), so a resumed run reproduces an
uninterrupted one (at the same batch size) exactly.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from unibcq.data.sources import read_jsonl, read_utf8, resolve_data_dir
from unibcq.errors import UnibcqError
from unibcq.eval.perplexity import perplexity_of
from unibcq.models.architectures import context_window

# Reports (done, total) in the caller's units; run_tasks turns it into a progress bar.
ProgressFn = Callable[[int, int], None]

DEFAULT_MAX_LENGTH = 2048
# Scoring batches (see _batches): tokens computed per forward pass, padding included, and
# cached positions copied per pass (tails x (prefix + stem)), which bounds its memory. On a
# CPU, activations that outgrow the caches cost more than the extra passes of smaller
# batches; a GPU pays a kernel launch per op and pass, so it wants passes 16x larger, with
# the copied key/value cache also held under GPU_CACHE_BYTES (a 7B model's cache is about
# 0.5 MB per position).
TOKENS_PER_PASS = 1024
CACHE_TOKENS_PER_PASS = 8192
GPU_PASS_SCALE = 16
GPU_CACHE_BYTES = 2 * 2**30
NORMALIZER_ROWS = 256  # slots normalised at a time (float32: 50 MB at a 49k vocabulary)


def kv_bytes_per_position(model: nn.Module) -> int:
    """Bytes of key/value cache one position costs in `model` (from its config and dtype)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or 1
    heads = getattr(config, "num_attention_heads", None) or 1
    hidden = getattr(config, "hidden_size", None) or 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    element = next(model.parameters()).element_size()
    return max(2 * layers * kv_heads * head_dim * element, 1)


def pass_budget(device: torch.device, kv_bytes: int = 0) -> tuple[int, int]:
    """(tokens computed, cached positions copied) per scoring pass on `device`, for a model
    whose cache costs `kv_bytes` per position."""
    if device.type == "cpu":
        return TOKENS_PER_PASS, CACHE_TOKENS_PER_PASS
    cached = CACHE_TOKENS_PER_PASS * GPU_PASS_SCALE
    if kv_bytes:
        cached = max(min(cached, GPU_CACHE_BYTES // kv_bytes), 1)
    return TOKENS_PER_PASS * GPU_PASS_SCALE, cached


def no_progress(done: int, total: int) -> None:
    """Progress sink for callers that show none."""


# ----------------------------------------------------------------------------- data files


def data_root(data_dir: str | Path | None) -> Path:
    """The datasets folder; the tasks read local files only, so a missing folder is an error."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise UnibcqError(
            "benchmark tasks read local files: pass --data-dir or set UNIBCQ_DATA_DIR to the "
            "datasets folder (the one holding zeroshot/ and mmlu/)"
        )
    return root


def data_file(root: Path, relative: str) -> Path:
    """`root / relative`, or an error that names the path and the fix."""
    path = root / relative
    if not path.is_file():
        raise UnibcqError(f"{path} not found; point --data-dir / UNIBCQ_DATA_DIR at a folder containing {relative}")
    return path


def parse_rows(path: Path, rows: Iterator[tuple[int, Any]], build: Callable[[Any], Any], limit: int | None) -> list:
    """Apply `build` to the first `limit` rows; a schema mismatch names the file and line."""
    items = []
    for lineno, row in itertools.islice(rows, limit):
        try:
            items.append(build(row))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise UnibcqError(f"{path}:{lineno}: unexpected format ({type(exc).__name__}: {exc})") from exc
    if not items:
        raise UnibcqError(f"{path} holds no rows to score (truncated or emptied?)")
    return items


# ----------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class MultipleChoiceDoc:
    """One question: choice i is `" " + choices[i]` scored after `contexts[i]`."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    @classmethod
    def shared(cls, context: str, choices: Sequence[str], gold: int) -> MultipleChoiceDoc:
        """The usual case: every choice follows the same context."""
        if not 0 <= gold < len(choices):
            raise ValueError(f"gold index {gold} outside {len(choices)} choices")
        return cls((context,) * len(choices), tuple(choices), gold)


def _piqa(root: Path, limit: int | None) -> list[MultipleChoiceDoc]:
    path = data_file(root, "zeroshot/piqa/valid.jsonl")
    labels_path = data_file(root, "zeroshot/piqa/valid-labels.lst")
    labels = read_utf8(labels_path).split()
    rows = list(read_jsonl(path))
    if len(labels) != len(rows):
        raise UnibcqError(f"{labels_path} has {len(labels)} labels for {len(rows)} questions in {path}")
    labelled = ((lineno, (row, label)) for (lineno, row), label in zip(rows, labels))
    return parse_rows(path, labelled, lambda r: MultipleChoiceDoc.shared(
        f"Question: {r[0]['goal']}\nAnswer:", [r[0]["sol1"], r[0]["sol2"]], int(r[1])), limit)


def _arc_doc(row: dict[str, Any], with_question_prefix: bool) -> MultipleChoiceDoc:
    question = row["question"]
    choices = question["choices"]
    labels = [c["label"] for c in choices]
    context = f"Question: {question['stem']}\nAnswer:" if with_question_prefix else question["stem"]
    return MultipleChoiceDoc.shared(context, [c["text"] for c in choices], labels.index(row["answerKey"]))


def _arc_loader(relative: str, with_question_prefix: bool) -> Callable[[Path, int | None], list[MultipleChoiceDoc]]:
    def load(root: Path, limit: int | None) -> list[MultipleChoiceDoc]:
        path = data_file(root, relative)
        return parse_rows(path, read_jsonl(path), lambda r: _arc_doc(r, with_question_prefix), limit)

    return load


def _boolq_doc(row: dict[str, Any]) -> MultipleChoiceDoc:
    label = str(row["label"]).lower()
    if label not in ("true", "false"):
        raise ValueError(f"label {row['label']!r} is neither true nor false")
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return MultipleChoiceDoc.shared(context, ["no", "yes"], int(label == "true"))


def _boolq(root: Path, limit: int | None) -> list[MultipleChoiceDoc]:
    path = data_file(root, "zeroshot/boolq/val.jsonl")
    return parse_rows(path, read_jsonl(path), _boolq_doc, limit)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up of WikiHow artefacts; the local file still holds some
    (e.g. "[www.kiddio.org]", "[insert name of town]"), which would change those items'
    log-likelihoods and acc_norm lengths."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(root: Path, limit: int | None) -> list[MultipleChoiceDoc]:
    path = data_file(root, "zeroshot/hellaswag/hellaswag_val_from_text.jsonl")
    return parse_rows(path, read_jsonl(path), lambda r: MultipleChoiceDoc.shared(
        hellaswag_preprocess(f"{r['activity_label']}: {r['ctx']}"),
        [hellaswag_preprocess(ending) for ending in r["endings"]], int(r["label"])), limit)


def _winogrande_doc(row: dict[str, Any]) -> MultipleChoiceDoc:
    contexts = tuple(row["context_options"])
    gold = int(row["gold"])
    if len(contexts) != 2 or gold not in (0, 1):
        raise ValueError("expected two context_options and gold 0/1")
    return MultipleChoiceDoc(contexts, (row["continuation"],) * 2, gold)


def _winogrande(root: Path, limit: int | None) -> list[MultipleChoiceDoc]:
    path = data_file(root, "zeroshot/winogrande/winogrande_llmfoundry.jsonl")
    return parse_rows(path, read_jsonl(path), _winogrande_doc, limit)


@dataclass(frozen=True)
class ZeroShotTask:
    """A multiple-choice task: its files (for presence checks), loader, and whether acc_norm applies."""

    files: tuple[str, ...]
    load: Callable[[Path, int | None], list[MultipleChoiceDoc]]
    normalize: bool


MULTIPLE_CHOICE: dict[str, ZeroShotTask] = {
    "piqa": ZeroShotTask(("zeroshot/piqa/valid.jsonl", "zeroshot/piqa/valid-labels.lst"), _piqa, True),
    "arc_easy": ZeroShotTask(("zeroshot/arc_easy/ARC-Easy-Test.jsonl",),
                             _arc_loader("zeroshot/arc_easy/ARC-Easy-Test.jsonl", True), True),
    "arc_challenge": ZeroShotTask(("zeroshot/arc_challenge/ARC-Challenge-Test.jsonl",),
                                  _arc_loader("zeroshot/arc_challenge/ARC-Challenge-Test.jsonl", True), True),
    "hellaswag": ZeroShotTask(("zeroshot/hellaswag/hellaswag_val_from_text.jsonl",), _hellaswag, True),
    "winogrande": ZeroShotTask(("zeroshot/winogrande/winogrande_llmfoundry.jsonl",), _winogrande, False),
    "boolq": ZeroShotTask(("zeroshot/boolq/val.jsonl",), _boolq, False),
    "openbookqa": ZeroShotTask(("zeroshot/openbookqa/test.jsonl",),
                               _arc_loader("zeroshot/openbookqa/test.jsonl", False), True),
}

LAMBADA_FILE = "zeroshot/lambada/lambada_test.jsonl"


def load_lambada(root: Path, limit: int | None) -> list[tuple[str, str]]:
    """(context, target) pairs: the text without its last word, and " " + that word."""
    path = data_file(root, LAMBADA_FILE)

    def build(row: dict[str, Any]) -> tuple[str, str]:
        context, sep, word = row["text"].rpartition(" ")
        if not sep:
            raise ValueError("text has no space to split off the last word")
        return context, " " + word

    return parse_rows(path, read_jsonl(path), build, limit)


# ----------------------------------------------------------------------------- scoring


def encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens, as lm-eval's causal-LM default (no BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of many texts; a Hugging Face tokenizer takes them in one call (in parallel
    when it is a fast one), which matters for MMLU's thousands of long few-shot prompts."""
    if not texts:
        return []
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [encode(tokenizer, text) for text in texts]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval splits them.

    BPE tokenizers attach a space to the following word, so trailing spaces of the context
    move to the continuation; the continuation ids are then the tail of the jointly encoded
    text, so they are the tokens the model would really see after that context.
    """
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """`encode_pair` of many (context, continuation) pairs: each distinct context is encoded
    once (a question's choices share it) and all texts go through `encode_batch`."""
    split = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        split.append((stripped, context[len(stripped):] + continuation))
    contexts = list(dict.fromkeys(c for c, _ in split if c))
    context_ids = dict(zip(contexts, encode_batch(tokenizer, contexts)))
    joint = iter(encode_batch(tokenizer, [c + k for c, k in split if c]))
    encoded = []
    for context, continuation in split:
        if not context:
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            encoded.append(([prefix], encode(tokenizer, continuation)))
            continue
        ids = context_ids[context]
        # A merge across the boundary can swallow a very short continuation; score it on its own then.
        encoded.append((ids, next(joint)[len(ids):] or encode(tokenizer, continuation)))
    return encoded


def model_max_length(model: nn.Module) -> int:
    """The model's context window from its config, lm-eval's 2048 when it names none."""
    return context_window(getattr(model, "config", None)) or DEFAULT_MAX_LENGTH


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_argument(model: nn.Module) -> str:
    """The key/value cache's name in forward() and its output: transformers 5.24 renamed it to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class HeadSelection:
    """The (row, position) pairs of the output projection's input whose logits are read."""

    rows: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    applied: bool = False  # whether the projection really took the selection (it may not be the head called)


@contextmanager
def head_input(model: nn.Module) -> Iterator[HeadSelection | None]:
    """Hand the output projection a contiguous input, only the positions a selection names.

    transformers computes only the kept logits by slicing the hidden states
    (`logits_to_keep`); PyTorch runs a linear layer on such a non-contiguous 3-D input as a
    batched matmul over a copy of the weight per row. For SmolLM2's 49152 x 576 vocabulary
    projection in bfloat16 on our CPU (PyTorch 2.13) that took 1.6 s per 32-row pass instead
    of 9 ms with the slice made contiguous, a third of all task-scoring time. While the
    yielded selection is set, the projection receives just those (row, position) pairs as one
    (1, pairs, hidden) input: the padding and other rows' context tokens that a right-padded
    kept span also covers then cost no projection, and a pass's logits are pairs x vocab
    instead of rows x span x vocab. None when the model has no output projection module.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield None
        return
    selection = HeadSelection()

    def select(module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        if selection.rows is not None:
            hidden = args[0]
            selection.applied = True  # indices follow the input: a model split over devices moves it first
            picked = hidden[selection.rows.to(hidden.device), selection.positions.to(hidden.device)]
            return (picked.unsqueeze(0), *args[1:])
        return (args[0].contiguous(), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield selection
    finally:
        handle.remove()


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: ProgressFn = no_progress,
    prefix: Sequence[int] = (),
    max_tokens: int | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy decoding reproduces it) per request.

    Choices that follow one context share it: the context runs once and its key/value
    cache serves every choice (HellaSwag's four endings cost one context, not four; a
    context shorter than its longest choice is cheaper to repeat, see `_group`), and
    requests whose input is identical (same context, one-token continuations, as in MMLU's
    " A".." D") share one row. Inputs are sorted longest first and right-padded per batch,
    so the real tokens never attend to padding and padding costs little; only the logits
    over the continuation span are computed (`logits_to_keep`), which keeps the vocabulary
    projection off the long contexts. A forward pass scores at most `batch_size` rows and
    reads about `max_tokens` tokens, padding included (default: `pass_budget` of the model's
    device).

    With `prefix` (token ids that many contexts start with, such as MMLU's few-shot
    exemplars) the prefix runs once and its key/value cache is reused by every request
    whose context extends it and needs no truncation; the others are scored in full.
    Sharing needs a model that returns its key/value cache and takes `position_ids`
    (every Hugging Face causal LM does).
    """
    if batch_size < 1:
        raise UnibcqError(f"--batch-size must be >= 1, got {batch_size}")
    max_length = max_length or model_max_length(model)
    prefix = list(prefix)
    extends = [bool(prefix) and len(c) > len(prefix) and list(c[: len(prefix)]) == prefix
               and len(c) + len(k) <= max_length + 1 for c, k in requests]
    groups = [[i for i, e in enumerate(extends) if e], [i for i, e in enumerate(extends) if not e]]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    offset = 0
    for group, group_prefix in zip(groups, (prefix, [])):
        if not group:
            continue
        with head_input(model) as selection:
            scores = _score(model, [requests[i] for i in group], batch_size, max_length, group_prefix,
                            lambda done, _, offset=offset: progress(offset + done, len(requests)), max_tokens,
                            selection)
        for i, score in zip(group, scores):
            results[i] = score
        offset += len(group)
    return results


Reads = list[tuple[int, list[int]]]  # (request index, target ids) read from one input row


def _group(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, prefix: list[int], share: bool = True,
) -> dict[tuple[int, ...], dict[tuple[int, ...], Reads]]:
    """stem -> tail -> reads: how each request is scored, sharing what requests have in common.

    The model reads prefix + stem + tail, and a request's target ids are read from the logits
    over the tail's last positions. The tail starts at the context's last token (whose logits
    predict the first target), so the choices that follow one context share its stem: the stem
    runs once and its key/value cache serves every choice. Requests with identical inputs
    (MMLU's one-token letters) share a tail. A stem that only one tail reads gains nothing
    from a cache, and one shorter than its longest tail saves less than the padding and the
    second forward pass cost (PIQA's short goals before long solutions), so such a stem is
    folded into its tails, under the empty stem; without `share` every stem is.
    """
    by_stem: dict[tuple[int, ...], dict[tuple[int, ...], Reads]] = {}
    for index, (context, continuation) in enumerate(requests):
        if not continuation:
            raise UnibcqError("a continuation encodes to no tokens; cannot score it")
        body = (list(context) + list(continuation))[-(max_length + 1):][len(prefix):]
        if len(body) < 2:
            raise UnibcqError("a request needs at least one context token before its continuation")
        n_target = min(len(continuation), len(body) - 1)
        split = len(body) - n_target - 1
        stem, tail = tuple(body[:split]), tuple(body[split:-1])
        by_stem.setdefault(stem, {}).setdefault(tail, []).append((index, body[-n_target:]))
    groups: dict[tuple[int, ...], dict[tuple[int, ...], Reads]] = {(): {}}
    for stem, tails in by_stem.items():
        if share and stem and len(tails) > 1 and len(stem) >= max(len(t) for t in tails):
            groups[stem] = tails
        else:
            for tail, reads in tails.items():
                groups[()].setdefault(stem + tail, []).extend(reads)
    return groups


Batch = list[tuple[tuple[int, ...], list[tuple[int, ...]]]]  # (stem, some of its tails), ...


def _batches(
    groups: dict[tuple[int, ...], dict[tuple[int, ...], Reads]], batch_size: int, max_tokens: int, prefix_length: int,
    max_cached: int = CACHE_TOKENS_PER_PASS,
) -> Iterator[Batch]:
    """Batches of (stem, tails), longest first: unstemmed tails, then stems.

    A batch scores at most `batch_size` tails; padding included, each of its passes computes
    about `max_tokens` tokens, and the per-tail copies of the prefix + stem cache hold at
    most `max_cached` positions. A batch always holds at least one tail; a
    stem with more tails than fit runs once per batch its tails span.
    """

    def fits(rows: int, width: int, stems: int, stem_width: int) -> bool:
        cached = prefix_length + stem_width
        return (rows <= batch_size and rows * width <= max_tokens and stems * stem_width <= max_tokens
                and rows * cached <= max_cached)

    def pieces(stem: tuple[int, ...], tails: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], list]]:
        chunk: list[tuple[int, ...]] = []
        for tail in tails:
            if chunk and not fits(len(chunk) + 1, len(chunk[0]), 1, len(stem)):
                yield stem, chunk
                chunk = []
            chunk.append(tail)
        yield stem, chunk

    unstemmed = [((), [tail]) for tail in sorted(groups[()], key=len, reverse=True)]
    stemmed = [piece for stem in sorted((s for s in groups if s), key=len, reverse=True)
               for piece in pieces(stem, sorted(groups[stem], key=len, reverse=True))]
    for items in (unstemmed, stemmed):
        batch: Batch = []
        rows = width = 0
        for stem, tails in items:
            grown = (rows + len(tails), max(width, len(tails[0])), len(batch) + 1, len(batch[0][0]) if batch else len(stem))
            if batch and not fits(*grown):
                yield batch
                batch, grown = [], (len(tails), len(tails[0]), 1, len(stem))
            batch.append((stem, tails))
            rows, width = grown[0], grown[1]
        if batch:
            yield batch


def _right_padded(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each row's tokens first, zeros after."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def _sliding_window(model: nn.Module) -> int | None:
    """The attention window of a model whose layers (some or all) attend to a window, else None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    used = getattr(config, "use_sliding_window", True) or "sliding_attention" in layer_types
    return window if isinstance(window, int) and window > 0 and used else None


def _normalizers_and_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logsumexp and the argmax of each row of `logits` (slots x vocabulary), a few rows at a time.

    A pass can read thousands of slots, and a float32 copy of them all (plus logsumexp's
    temporary) would be several GB beside the pass's own logits; converting a chunk at a
    time gives the same numbers (the conversion is exact) at a fixed extra cost, and the
    argmax runs on the converted chunk (on a CPU, bfloat16 argmax is several times slower).
    """
    normalizers, argmax = [], []
    for chunk in logits.split(NORMALIZER_ROWS):
        chunk = chunk.float()
        normalizers.append(torch.logsumexp(chunk, dim=-1))
        argmax.append(chunk.argmax(-1))
    return torch.cat(normalizers), torch.cat(argmax)


def _stem_pass(model: nn.Module, stems: list[Sequence[int]], cache: Any, past_mask: torch.Tensor,
               keep_arg: bool, cache_arg: str) -> tuple[Any, torch.Tensor]:
    """Run a batch's stems (right-padded) after the prefix cache, one row per stem; return the
    grown cache and the attention mask over prefix + stems (padding hidden) that the tails extend."""
    device = next(model.parameters()).device
    if cache is not None:
        cache.batch_repeat_interleave(len(stems))
    ids, mask = _right_padded(stems)
    past_mask = torch.cat([past_mask.expand(len(stems), -1), mask], dim=1)
    kwargs = {"logits_to_keep": 1} if keep_arg else {}
    if cache is not None:
        kwargs[cache_arg] = cache
    out = model(input_ids=ids.to(device), attention_mask=past_mask.to(device), use_cache=True, **kwargs)
    return getattr(out, cache_arg), past_mask


def _read_plan(tails: Sequence[Sequence[int]], reads: Sequence[Sequence[tuple[int, Sequence[int]]]],
               dropped: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int], list[int]]:
    """Which logits a tail pass reads: (slots as (row, kept position), (request, target length) in
    read order, the slot of each target token, each target token's id).

    Only the positions some target is read from are normalised, each once: rows are
    right-padded, so the kept span (the last `width - dropped` positions) also covers padding
    and other rows' context tokens, and MMLU's four letters read one position of one row.
    Only per-token figures leave the device: a GPU would otherwise copy the whole vocabulary
    row of every slot back to the host.
    """
    slots: dict[tuple[int, int], int] = {}
    requests_read, read_slots, read_ids = [], [], []
    for row, (tail, row_reads) in enumerate(zip(tails, reads)):
        end = len(tail) - dropped  # one past the tail's last position, in kept coordinates
        for request, target_ids in row_reads:
            requests_read.append((request, len(target_ids)))
            read_slots += [slots.setdefault((row, pos), len(slots)) for pos in range(end - len(target_ids), end)]
            read_ids += target_ids
    return list(slots), requests_read, read_slots, read_ids


def _token_scores(slot_logits: torch.Tensor, read_slots: list[int],
                  read_ids: list[int]) -> tuple[list[float], list[bool]]:
    """Each target token's log-probability and whether it is the greedy choice at its slot."""
    read_slots_t = torch.tensor(read_slots, device=slot_logits.device)
    read_ids_t = torch.tensor(read_ids, device=slot_logits.device)
    normalizers, argmax = _normalizers_and_argmax(slot_logits)
    token_logprobs = (slot_logits[read_slots_t, read_ids_t].float() - normalizers[read_slots_t]).tolist()
    return token_logprobs, (argmax[read_slots_t] == read_ids_t).tolist()


def _score(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    max_length: int,
    prefix: list[int],
    progress: ProgressFn,
    max_tokens: int | None,
    selection: HeadSelection | None = None,
) -> list[tuple[float, bool]]:
    """`loglikelihoods` for requests that all extend `prefix` untruncated, or any requests when it is empty.

    Each batch takes at most two forward passes: its stems (right-padded, after the prefix
    cache), then every tail after its own stem's cache rows. A tail's positions continue
    from its stem's real length, and the attention mask hides the stem's padding, so each
    tail sees exactly prefix + stem before it. A sliding window counts cache slots, padding
    included, so stems are shared only when no input reaches the window.
    """
    device = next(model.parameters()).device
    window = _sliding_window(model)
    longest = max(min(len(c) + len(k), max_length + 1) for c, k in requests)
    groups = _group(requests, max_length, prefix, share=window is None or longest <= window)
    keep_arg = _accepts_logits_to_keep(model)
    cache_arg = _cache_argument(model)
    prefix_cache = None
    if prefix:
        kwargs = {"logits_to_keep": 1} if keep_arg else {}
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **kwargs)
        prefix_cache = getattr(out, cache_arg)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    done = 0
    default_tokens, max_cached = pass_budget(device, kv_bytes_per_position(model))
    for batch in _batches(groups, batch_size, max_tokens or default_tokens, len(prefix), max_cached):
        rows = [(s, tail) for s, (_, tails) in enumerate(batch) for tail in tails]
        cache = copy.deepcopy(prefix_cache) if prefix_cache is not None else None  # a forward appends to its cache
        past_mask = torch.ones(1, len(prefix), dtype=torch.long)
        index = torch.zeros(len(rows), dtype=torch.long)
        if batch[0][0]:
            cache, past_mask = _stem_pass(model, [stem for stem, _ in batch], cache, past_mask, keep_arg, cache_arg)
            index = torch.tensor([s for s, _ in rows])
        ids, mask = _right_padded([tail for _, tail in rows])
        width = ids.shape[1]
        reads = [groups[batch[s][0]][tail] for s, tail in rows]
        keep = max(width - len(tail) + max(len(t) for _, t in r) for (_, tail), r in zip(rows, reads))
        kwargs = {"logits_to_keep": keep} if keep_arg else {}
        if cache is not None:
            cache.reorder_cache(index.to(device))
            start = torch.tensor([len(prefix) + len(batch[s][0]) for s, _ in rows])
            kwargs.update({cache_arg: cache, "use_cache": True,
                           "position_ids": (start[:, None] + torch.arange(width)).to(device)})
        else:
            kwargs["use_cache"] = False
        slots, requests_read, read_slots, read_ids = _read_plan([tail for _, tail in rows], reads, width - keep)
        where = torch.tensor(slots, device=device)
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.cat([past_mask[index], mask], 1).to(device)}
        if selection is not None:
            # The projection sees the kept span, or every position when the model keeps all.
            selection.rows, selection.positions = where[:, 0], where[:, 1] + (0 if keep_arg else width - keep)
            selection.applied = False
            try:
                logits = model(**inputs, **kwargs).logits
            finally:
                selection.rows = selection.positions = None
        else:
            logits = model(**inputs, **kwargs).logits
        if selection is not None and selection.applied:
            slot_logits = logits[0]
        else:  # every kept position was projected: read the slots from them
            slot_logits = logits[:, -keep:][where[:, 0], where[:, 1]]
        token_logprobs, token_greedy = _token_scores(slot_logits, read_slots, read_ids)
        first = 0
        for request, length in requests_read:
            results[request] = (sum(token_logprobs[first: first + length]), all(token_greedy[first: first + length]))
            first += length
        done += sum(len(r) for r in reads)
        progress(done, len(requests))
    return results


# ----------------------------------------------------------------------------- metrics


def stderr_of_mean(p: float, n: int) -> float | None:
    """Standard error of a mean of n 0/1 outcomes (sample variance), lm-eval's `mean_stderr`."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def argmax_first(values: Sequence[float]) -> int:
    """First index of the maximum (ties go to the earlier choice, like numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# Items (questions, passages) per journaled part of a task: HellaSwag on one CPU core takes
# about 90 min, so a run killed in it loses at most one part (about 8 min), not the task.
TASK_PART_ITEMS = 1000

# Called as each part of a task completes: (part name "START-STOP", {"outcomes", "seconds"}).
PartFn = Callable[[str, dict[str, Any]], None]


def part_name(start: int, stop: int) -> str:
    """A part as the journal names it: its item range, so parts of another size never match."""
    return f"{start}-{stop}"


def score_in_parts(
    items: Sequence[Any],
    score: Callable[[Sequence[Any], ProgressFn], list[Any]],
    progress: ProgressFn = no_progress,
    finished: dict[str, dict[str, Any]] | None = None,
    on_part: PartFn | None = None,
    part_items: int | None = None,
) -> tuple[list[Any], float]:
    """(`score(items, progress)`'s per-item outcomes, seconds the reused parts took when scored),
    scored TASK_PART_ITEMS items at a time.

    Items are always scored in the same fixed parts, resumed or not, so a resumed task gives
    the figures of an uninterrupted one (at the same batch size); the parts in `finished`
    (JSON-able outcomes, as `on_part` received them) are reused. `progress` counts items.
    """
    outcomes: list[Any] = []
    reused_seconds = 0.0
    part_items = part_items or TASK_PART_ITEMS
    for start in range(0, len(items), part_items):
        part = items[start: start + part_items]
        name = part_name(start, start + len(part))
        stored = (finished or {}).get(name)
        if stored is not None and len(stored["outcomes"]) == len(part):
            outcomes.extend(stored["outcomes"])
            reused_seconds += stored["seconds"]
        else:
            began = time.perf_counter()
            scored = score(part, lambda done, total, start=start, size=len(part):
                           progress(start + done * size // max(total, 1), len(items)))
            outcomes.extend(scored)
            if on_part is not None:
                on_part(name, {"outcomes": scored, "seconds": time.perf_counter() - began})
        progress(start + len(part), len(items))
    return outcomes, reused_seconds


def evaluate_multiple_choice(
    model: nn.Module,
    tokenizer,
    docs: Sequence[MultipleChoiceDoc],
    normalize: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: ProgressFn = no_progress,
    finished: dict[str, dict[str, Any]] | None = None,
    on_part: PartFn | None = None,
) -> dict[str, Any]:
    """acc (and acc_norm when `normalize`) with standard errors over `docs`, and the seconds
    scoring took (reused parts count the seconds they took when they were scored).

    Scored in parts (`score_in_parts`); a part's outcomes are each document's choice
    log-likelihoods, so `finished` parts of an interrupted run are reused as they are.
    """
    if not docs:
        raise UnibcqError("the task has no questions to score")
    began = time.perf_counter()

    def score(part: Sequence[MultipleChoiceDoc], part_progress: ProgressFn) -> list[list[float]]:
        requests = encode_pairs(tokenizer, [(ctx, " " + choice) for doc in part
                                            for ctx, choice in zip(doc.contexts, doc.choices)])
        scores = iter(loglikelihoods(model, requests, batch_size, max_length, part_progress))
        return [[next(scores)[0] for _ in doc.choices] for doc in part]

    correct = correct_norm = 0
    scored, reused_seconds = score_in_parts(docs, score, progress, finished, on_part)
    for doc, lls in zip(docs, scored):
        correct += argmax_first(lls) == doc.gold
        if normalize:
            per_char = [ll / max(len(choice), 1) for ll, choice in zip(lls, doc.choices)]
            correct_norm += argmax_first(per_char) == doc.gold
    n = len(docs)
    acc = correct / n
    acc_norm = correct_norm / n if normalize else None
    return {
        "acc": acc, "acc_norm": acc_norm, "stderr": stderr_of_mean(acc, n),
        "acc_norm_stderr": stderr_of_mean(acc_norm, n) if acc_norm is not None else None, "n": n,
        "seconds": time.perf_counter() - began + reused_seconds,
    }


def evaluate_lambada(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: ProgressFn = no_progress,
    finished: dict[str, dict[str, Any]] | None = None,
    on_part: PartFn | None = None,
) -> dict[str, Any]:
    """Last-word accuracy (greedy match of every target token) and target perplexity, scored
    in parts like `evaluate_multiple_choice` (a part's outcomes: [log-likelihood, greedy])."""
    if not pairs:
        raise UnibcqError("lambada has no passages to score")
    began = time.perf_counter()

    def score(part: Sequence[tuple[str, str]], part_progress: ProgressFn) -> list[list[Any]]:
        return [[ll, greedy] for ll, greedy in loglikelihoods(model, encode_pairs(tokenizer, part), batch_size,
                                                             max_length, part_progress)]

    results, reused_seconds = score_in_parts(pairs, score, progress, finished, on_part)
    n = len(results)
    acc = sum(bool(greedy) for _, greedy in results) / n
    return {
        "acc": acc, "acc_norm": None, "stderr": stderr_of_mean(acc, n), "n": n,
        "ppl": perplexity_of(-sum(ll for ll, _ in results) / n), "seconds": time.perf_counter() - began + reused_seconds,
    }
