"""Text generation with a quantized (or full-precision) model: streamed text, timing, memory.

`generate_text` runs the model's own `generate` (so KV cache, stopping and the model's
generation config behave exactly as in transformers) with a streamer that time-stamps every
new token as it arrives. That splits the run into prefill (from the call to the first new
token: the prompt's forward pass, all its rows at once) and decode (one row per step, so
every step streams all the weights: memory-bound, where packed weights should pay off),
which are served by different kernels and must be reported apart.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from transformers import TextStreamer

from unibcq.compute_dtype import half_linear_in_float32
from unibcq.errors import UnibcqError
from unibcq.models.architectures import context_window
from unibcq.memory import model_memory_bytes, resident_memory_bytes


@dataclass
class GenerationResult:
    """What one generation produced and cost.

    `prefill_seconds` runs from the call to the first new token; `decode_seconds` from the
    first to the last new token, i.e. `new_tokens - 1` decode steps. Memory is measured
    right after generating: `model_bytes` is the model's parameters and buffers as stored,
    `rss_bytes` the whole process (None off Linux), `gpu_peak_bytes` the most the generation
    held allocated on the model's GPU (None on a CPU). `max_new_tokens` is the limit that applied:
    the one asked for, or less where the model's context window ends first.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    max_new_tokens: int
    chat: bool
    seconds: float
    prefill_seconds: float
    decode_seconds: float
    model_bytes: int
    rss_bytes: int | None
    gpu_peak_bytes: int | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the whole call, prefill included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Decode steps per second after the first token; None with fewer than two new tokens."""
        if self.new_tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_seconds

    def summary(self) -> str:
        """The one line the CLI prints after the streamed text."""
        decode = self.decode_tokens_per_second
        rss = "-" if self.rss_bytes is None else f"{self.rss_bytes / 2**20:.1f} MiB"
        gpu = "" if self.gpu_peak_bytes is None else f", GPU peak {self.gpu_peak_bytes / 2**20:.1f} MiB"
        return (
            f"{self.new_tokens} new tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tokens/s): "
            f"prefill {self.prompt_tokens} prompt tokens {self.prefill_seconds:.3f} s, "
            f"decode {'-' if decode is None else f'{decode:.1f}'} tokens/s; "
            f"memory: RSS {rss}, model {self.model_bytes / 2**20:.1f} MiB{gpu}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"new_tokens": self.new_tokens, "tokens_per_second": self.tokens_per_second,
                               "decode_tokens_per_second": self.decode_tokens_per_second}


class _TimedStreamer(TextStreamer):
    """Records when each new token arrives; forwards decoded text to `on_text` if given.

    Without `on_text` nothing is decoded while generating, so benchmarks time the model alone.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True
        if self.on_text is not None:
            super().put(value)

    def end(self) -> None:
        if self.on_text is not None:
            super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.on_text(text + "\n" if stream_end else text)


MIN_TEMPERATURE = 1e-6


def check_generation_options(max_new_tokens: int, temperature: float) -> None:
    """Reject settings generate() cannot honour (called by the CLI before the model loads)."""
    if max_new_tokens < 1:
        raise UnibcqError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise UnibcqError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-40 overflow float32 to inf, and sampling fails on them
        raise UnibcqError(f"--temperature {temperature} is below {MIN_TEMPERATURE}; use 0 for greedy decoding")


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> tuple[torch.Tensor, bool]:
    """(input ids of shape (1, n), whether the chat template was applied).

    `chat=None` applies the template when the tokenizer has one. A templated prompt already
    carries its special tokens, so the tokenizer adds none of its own to it.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    use_chat = has_template if chat is None else chat
    if use_chat and not has_template:
        raise UnibcqError("the tokenizer has no chat template; use --no-chat")
    text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True) if use_chat else prompt)
    ids = tokenizer(text, add_special_tokens=not use_chat, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UnibcqError("the prompt is empty after tokenization; give some text with --prompt")
    return ids, use_chat


WARMUP_PROMPT_TOKENS = 16  # past every CPU GEMV row bound, so the prefill's matmul path runs too


@torch.no_grad()
def _stop_ids(configured: int | list[int] | None, eos: int | None) -> list[int] | None:
    """The generation config's EOS ids with the tokenizer's EOS added (None when neither has one)."""
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids or None


def _warm_up(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """One untimed forward of a short prompt slice and one of a single token: the two product
    paths (prefill and decode steps) are compiled and their buffers allocated before timing."""
    with half_linear_in_float32(model):
        for width in (min(WARMUP_PROMPT_TOKENS, input_ids.shape[1]), 1):
            model(input_ids[:, :width], logits_to_keep=1)


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    ignore_eos: bool = False,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt`, streaming text to `on_text` as it comes.

    `temperature` 0 is greedy decoding; above 0 it samples at that temperature, with any
    top-k / top-p the model's generation config sets, seeded by `seed` when given.
    `ignore_eos` forbids the end-of-sequence token until `max_new_tokens` are out, so
    timing runs always decode the same number of steps. Timing starts after `_warm_up`: a
    process's first packed matmul compiles (or loads) its kernel, which took 0.4-7 s against a
    3 ms prefill of a tiny model, and would be reported as prefill time.
    """
    check_generation_options(max_new_tokens, temperature)
    input_ids, used_chat = encode_prompt(tokenizer, prompt, chat)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and input_ids.numel() and int(input_ids.max()) >= vocab:
        raise UnibcqError(f"the tokenizer gave token id {int(input_ids.max())}, past the model's vocabulary of "
                          f"{vocab}; is it the tokenizer of another model?")
    input_ids = input_ids.to(model.device)
    context = context_window(getattr(model, "config", None))
    if context is not None:
        # Past its context a model was never trained (and RoPE tables or masks may run out):
        # the prompt must fit, and the new tokens stop at the context's end.
        if input_ids.shape[1] >= context:
            raise UnibcqError(f"the prompt is {input_ids.shape[1]} tokens and the model's context window "
                              f"{context}; shorten it so new tokens fit")
        max_new_tokens = min(max_new_tokens, context - input_ids.shape[1])
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if used_chat:  # the turn ends at the tokenizer's EOS (the template's end of turn) even where the
        # generation config names another EOS: past it the text would run into a next turn
        options["eos_token_id"] = _stop_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)
    if temperature > 0:
        options["temperature"] = temperature
    if ignore_eos:
        options["min_new_tokens"] = max_new_tokens
    if getattr(model.generation_config, "pad_token_id", None) is None:
        # generate() would warn on every call and then fall back to EOS; pass that fallback itself.
        options["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if seed is not None:
        torch.manual_seed(seed)
    streamer = _TimedStreamer(tokenizer, on_text)
    on_gpu = model.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(model.device)
    _warm_up(model, input_ids)
    if on_gpu:  # the warm-up's kernels are queued, not done: they must not count as prefill
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    with half_linear_in_float32(model):
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **options)
    seconds = time.perf_counter() - start
    new_ids = output[0, input_ids.shape[1]:].tolist()
    times = streamer.token_times
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        token_ids=new_ids,
        prompt_tokens=int(input_ids.shape[1]),
        max_new_tokens=max_new_tokens,
        chat=used_chat,
        seconds=seconds,
        prefill_seconds=times[0] - start if times else seconds,
        decode_seconds=times[-1] - times[0] if times else 0.0,
        model_bytes=model_memory_bytes(model),
        rss_bytes=resident_memory_bytes(),
        gpu_peak_bytes=torch.cuda.max_memory_allocated(model.device) if on_gpu else None,
    )
