"""GSM8K by greedy generation with an 8-shot chain-of-thought prompt, scored by exact match.

The task is lm-evaluation-harness's `gsm8k_cot` (v3): the eight exemplars of the
chain-of-thought paper (Wei et al., 2022), each ending "The answer is N.", first-n, joined
by blank lines:

    Q: {exemplar}\\nA: {reasoning} The answer is {n}.\\n\\n  (x 8)
    Q: {test question}\\nA:

(lm-eval's plain `gsm8k` task draws its 5 exemplars from the train split, which is not
here.) With `--chat-template` (instruct models) the same exemplars become alternating user
("Q: ...\\nA:") and assistant ("... The answer is N.") turns rendered by the tokenizer's chat
template with the generation prompt appended, as lm-eval's `--apply_chat_template
--fewshot_as_multiturn`.

Generation is greedy, at most 256 new tokens, cut at the first "Q:", "</s>" or "<|im_end|>"
(lm-eval's `until`). Two scores, as lm-eval's filters:
  strict    the text after the first "The answer is " (`strict-match`);
  flexible  the last number-like run anywhere in the output (`flexible-extract`; the
            reported `acc`).
An extracted answer matches the gold text after "####" when both are equal once commas,
"$", anything up to "#### " and one trailing "." are removed and case is ignored (lm-eval's
exact_match with its `regexes_to_ignore`): a string match, so "18.00" does not match "18",
as in lm-eval.

`evaluate_gsm8k` takes any function from a batch of prompts to completions, so tests can
stub the model; `greedy_generator` is the one backed by a Hugging Face model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from unibcq.data.sources import read_jsonl
from unibcq.errors import UnibcqError
from unibcq.eval.zeroshot import (
    ProgressFn, data_file, encode, model_max_length, no_progress, parse_rows, stderr_of_mean,
)

GSM8K_FILE = "zeroshot/gsm8k/test.jsonl"
STOP_SEQUENCES = ("Q:", "</s>", "<|im_end|>")
MAX_NEW_TOKENS = 256

# (question, reasoning, answer): the chain-of-thought paper's eight GSM8K-style exemplars.
EXEMPLARS: tuple[tuple[str, str, int], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. "
     "So there must have been 21 - 15 = 6.", 6),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", 5),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39.", 39),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
     "How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.", 8),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.", 9),
    ("There were nine computers in the server room. Five more computers were installed each day, "
     "from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
     "So 5 * 4 = 20 computers were added. 9 + 20 is 29.", 29),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
     "How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
     "After losing 2 more, he had 35 - 2 = 33 golf balls.", 33),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
     "So she has 23 - 15 dollars left. 23 - 15 is 8.", 8),
)

_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORED = tuple(re.compile(r) for r in (",", r"\$", r"(?s).*#### ", r"\.$"))
INVALID = "[invalid]"  # lm-eval's filter output when nothing matches

GenerateFn = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Problem:
    question: str
    gold: str  # the reference answer's text after the last "####"


def normalize_answer(text: str) -> str:
    """An answer as lm-eval's exact_match compares it: commas, "$", everything up to
    "#### " and one trailing "." removed, in that order, then lower-cased."""
    for pattern in _IGNORED:
        text = pattern.sub("", text)
    return text.lower()


def extract_strict(output: str) -> str:
    """The answer after the first "The answer is ", or INVALID."""
    match = _STRICT.search(output)
    return match.group(1) if match else INVALID


def extract_flexible(output: str) -> str:
    """The last number-like run in the output, or INVALID."""
    matches = _FLEXIBLE.findall(output)
    if not matches:
        return INVALID
    return next((group for group in matches[-1] if group), INVALID)


def is_correct(extracted: str, gold: str) -> bool:
    return normalize_answer(extracted) == normalize_answer(gold)


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The text before the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def build_prompt(question: str) -> str:
    """The 8-shot prompt ending with "A:" after `question`."""
    shots = "".join(f"Q: {q}\nA: {r} The answer is {n}.\n\n" for q, r, n in EXEMPLARS)
    return f"{shots}Q: {question}\nA:"


def build_chat_prompt(tokenizer, question: str) -> str:
    """The 8-shot prompt as a multi-turn chat, rendered by the tokenizer's template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UnibcqError("--chat-template: the tokenizer has no chat template")
    messages: list[dict[str, str]] = []
    for q, r, n in EXEMPLARS:
        messages += [{"role": "user", "content": f"Q: {q}\nA:"},
                     {"role": "assistant", "content": f"{r} The answer is {n}."}]
    messages.append({"role": "user", "content": f"Q: {question}\nA:"})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_gsm8k(root: Path, limit: int | None) -> list[Problem]:
    """The first `limit` test problems with their gold answers."""
    path = data_file(root, GSM8K_FILE)

    def build(row: dict[str, Any]) -> Problem:
        _, sep, tail = row["answer"].rpartition("####")
        if not sep or not tail.strip():
            raise ValueError("answer does not end with '#### <answer>'")
        return Problem(row["question"], tail.strip())

    return parse_rows(path, read_jsonl(path), build, limit)


class _StopOnText(StoppingCriteria):
    """Marks a sequence finished once its decoded completion contains a stop sequence.

    transformers' own `stop_strings` maps stop strings onto the vocabulary and fails on
    some tokenizers (word-level ones, for instance); decoding the completion works for all.
    Special tokens are decoded too: `<|im_end|>` is a stop and a special token at once.
    """

    def __init__(self, tokenizer, prompt_width: int, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stops = tuple(stops)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def completions(tokenizer, ids: torch.Tensor, stops: Sequence[str]) -> list[str]:
    """The generated rows `ids` as text, each cut at its first stop sequence or end-of-text token
    (found with special tokens decoded, since some stops are special tokens; the padding of rows
    that finished first follows them), then without any special-token text left."""
    ends = [*stops, *(t for t in (tokenizer.eos_token, tokenizer.pad_token) if t)]
    specials = [t for t in tokenizer.all_special_tokens if t]
    texts = [truncate_at_stop(t, ends) for t in tokenizer.batch_decode(ids, skip_special_tokens=False)]
    for special in specials:
        texts = [t.replace(special, "") for t in texts]
    return texts


def greedy_generator(
    model: nn.Module,
    tokenizer,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_length: int | None = None,
    stops: Sequence[str] = STOP_SEQUENCES,
) -> GenerateFn:
    """Batched greedy decoding with `model.generate`, prompts left-padded and left-truncated."""
    room = (max_length or model_max_length(model)) - max_new_tokens
    if room < 1:
        raise UnibcqError(f"the model's window leaves no room for a prompt before {max_new_tokens} new tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    @torch.no_grad()
    def generate(prompts: list[str]) -> list[str]:
        encoded = [encode(tokenizer, p)[-room:] for p in prompts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_StopOnText(tokenizer, width, stops)]),
        )
        return completions(tokenizer, out[:, width:], stops)

    return generate


def evaluate_gsm8k(
    problems: Sequence[Problem],
    generate: GenerateFn,
    batch_size: int = 8,
    progress: ProgressFn = no_progress,
    prompt: Callable[[str], str] = build_prompt,
) -> dict[str, Any]:
    """Flexible (`acc`) and strict exact match; prompts (`prompt` of each question: plain
    few-shot text, or a chat rendering) go out longest first to limit padding."""
    if not problems:
        raise UnibcqError("gsm8k has no problems to score")
    if batch_size < 1:
        raise UnibcqError(f"--batch-size must be >= 1, got {batch_size}")
    prompts = [prompt(p.question) for p in problems]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, text in zip(batch, generate([prompts[i] for i in batch])):
            outputs[i] = truncate_at_stop(text)
        progress(min(start + batch_size, len(order)), len(order))
    n = len(problems)
    flexible = sum(is_correct(extract_flexible(o), p.gold) for o, p in zip(outputs, problems)) / n
    strict = sum(is_correct(extract_strict(o), p.gold) for o, p in zip(outputs, problems)) / n
    return {
        "acc": flexible, "acc_norm": None, "stderr": stderr_of_mean(flexible, n), "n": n,
        "acc_strict": strict, "acc_strict_stderr": stderr_of_mean(strict, n), "shots": len(EXEMPLARS),
    }
