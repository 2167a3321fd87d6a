"""Refusing tensors that hold NaN or inf, with a message that names them.

Saved, such a tensor makes a checkpoint that loading calls corrupt; quantized, its NaNs
surface far from their cause. Quantizers and checkpoint writers share this one check.
"""

from __future__ import annotations

import torch

from unibcq.errors import UnibcqError


def nonfinite_count(tensor: torch.Tensor) -> int:
    """NaN/inf entries of a floating tensor (0 for any other, and for meta tensors). A sum comes
    first, which any NaN or inf poisons, so a finite tensor costs one reduction and no mask."""
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return 0
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def refuse_nonfinite(key: str, tensor: torch.Tensor,
                     consequence: str = "quantizing and saving need finite values (fix or re-export the model, "
                                        "and quantize it from there)") -> torch.Tensor:
    """`tensor`, or an error naming it when it holds NaN/inf, with the `consequence` for the task at
    hand: saved, it would be a checkpoint that loading calls corrupt; quantized, NaNs surface far
    from their cause."""
    bad = nonfinite_count(tensor)
    if bad:
        raise UnibcqError(f"{key} has {bad} NaN/inf values; {consequence}")
    return tensor


def refuse_nonfinite_model(model: torch.nn.Module, spec: str) -> torch.nn.Module:
    """`model`, or an error naming its first tensor that holds NaN/inf: evaluated or run, such a
    model gives NaN perplexity or empty text with no word of why."""
    for key, tensor in model.state_dict().items():
        refuse_nonfinite(f"{spec}: {key}", tensor, "every output would be NaN; fix or re-export the model")
    return model
