"""Perplexity with the papers' protocol, and KL divergence / top-1 agreement in the same pass.

Protocol: the evaluation text is joined with "\\n\\n" and tokenised once; it is cut into
non-overlapping windows of `seq_len` tokens (a final partial window is dropped); each
window is scored independently and perplexity is exp(mean NLL over every predicted token,
i.e. seq_len - 1 per window). `max_windows` keeps the first N windows for quick runs.

With a reference model, the same windows also give KL(P_ref || P_model) per token (mean)
and how often both models' top-1 next tokens agree, as llama.cpp's KL statistics do.
"""

from __future__ import annotations

import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unibcq.compute_dtype import half_linear_in_float32
from unibcq.errors import UnibcqError
from unibcq.models.architectures import check_window_fits
from unibcq.nn.qlinear import dense_weights
from unibcq.progress import progress_bar


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), inf past float range (mean NLL > ~709.8): a broken model's perplexity is
    a figure to report, not an OverflowError after the whole evaluation ran."""
    return math.inf if mean_nll > math.log(sys.float_info.max) else math.exp(mean_nll)  # NaN stays NaN


@dataclass
class WindowStats:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    kl: float | None = None
    top1_agreement: float | None = None
    ref_ppl: float | None = None


def windows_of(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows (W, seq_len) of a 1-D token tensor."""
    if seq_len < 2:
        raise UnibcqError(f"--seq-len must be >= 2, got {seq_len}")
    count = len(ids) // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise UnibcqError(f"--max-windows must be >= 1, got {max_windows}")
        count = min(count, max_windows)
    if count == 0:
        raise UnibcqError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len)


def kl_terms(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_ref || P) and top-1 agreement (bool) for logits (T, V)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return kl, logits.argmax(-1) == ref_logits.argmax(-1)


@torch.no_grad()
def evaluate_windows(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    ref_model: nn.Module | None = None,
    description: str = "eval",
    show_progress: bool = True,
) -> WindowStats:
    """Perplexity of `model` on `ids`, plus KL / agreement vs `ref_model` when given; windows
    longer than either model's context are refused (the CLI caps --seq-len there)."""
    for checked in (model, ref_model):
        if checked is not None:
            check_window_fits(checked, seq_len, "perplexity windows", "seq_len")
    windows = windows_of(ids, seq_len, max_windows)
    device = next(model.parameters()).device
    nll_sum = ref_nll_sum = kl_sum = 0.0
    agree = tokens = 0
    with dense_weights(model), ExitStack() as stack, progress_bar(show_progress) as bar:
        for scored in (model, ref_model):  # a reference loaded in bfloat16 to fit, a caller's bfloat16 model
            if scored is not None:
                stack.enter_context(half_linear_in_float32(scored))
        task = bar.add_task(description, total=len(windows))
        for window in windows:
            x = window.unsqueeze(0).to(device)
            logits = model(x).logits[0, :-1].float()
            target = x[0, 1:]
            nll_sum += F.cross_entropy(logits, target, reduction="sum").item()
            tokens += target.numel()
            if ref_model is not None:
                ref_logits = ref_model(x.to(next(ref_model.parameters()).device)).logits[0, :-1].float().to(device)
                ref_nll_sum += F.cross_entropy(ref_logits, target, reduction="sum").item()
                kl, same = kl_terms(logits, ref_logits)
                kl_sum += kl.sum().item()
                agree += int(same.sum())
            bar.update(task, advance=1, description=f"{description} ppl {perplexity_of(nll_sum / tokens):.3f}")
    nll = nll_sum / tokens
    stats = WindowStats(ppl=perplexity_of(nll), nll=nll, tokens=tokens, windows=len(windows), seq_len=seq_len)
    if ref_model is not None:
        stats.kl = kl_sum / tokens
        stats.top1_agreement = agree / tokens
        stats.ref_ppl = perplexity_of(ref_nll_sum / tokens)
    return stats
