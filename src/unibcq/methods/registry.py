"""Method name -> the function that quantizes one matrix: per-matrix methods from the weight alone,
GPTQ's from the weight and its input Hessian; reconstruction methods train whole blocks
(`methods.reconstruction`). A new method is an entry here, plus the settings it reads in
`SETTING_READERS` (and their flags in `cli.SETTING_FLAGS`) and their checks in `QuantConfig.validate`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor
from unibcq.formats.grouped_binary import GroupedBinaryTensor, parse_granularity
from unibcq.quantizers import quantize_bcq, quantize_rtn
from unibcq.quantizers.dyngroup import dyngroup_quantize
from unibcq.quantizers.grouping import check_weight

if TYPE_CHECKING:
    from unibcq.config import QuantConfig

MatrixQuantizer = Callable[[torch.Tensor, "QuantConfig"], BCQTensor | GroupedBinaryTensor]


def _bcq(algorithm: str) -> MatrixQuantizer:
    return lambda w, c: quantize_bcq(w, c.bits, c.group_size, algorithm, c.offset, c.iters, c.init)


def _dyngroup(weight: torch.Tensor, c: "QuantConfig") -> GroupedBinaryTensor:
    weight = check_weight(weight)
    if not weight.any():
        raise UnibcqError("weight is all zeros: there are no magnitudes to group (a broken or pruned layer?)")
    result = dyngroup_quantize(
        weight, c.max_groups, c.lam, c.algorithm, c.window, parse_granularity(c.granularity),
        c.normalize_lambda, c.dp_atom_size, c.refine_sweeps, c.merge_rule,
    )
    return GroupedBinaryTensor.from_parts(result.signs, result.group_index, result.scales, c.granularity)


def _gptq(inner: str) -> Callable[[torch.Tensor, torch.Tensor, "QuantConfig"], BCQTensor]:
    def quantize(w: torch.Tensor, hessian: torch.Tensor, c: "QuantConfig") -> BCQTensor:
        from unibcq.quantizers.gptq import gptq_quantize

        uniform = inner == "uniform"  # the grid flags describe a uniform grid; BCQ levels ignore them
        return gptq_quantize(w, hessian, c.bits, c.group_size, damp=c.damp, act_order=c.act_order,
                             symmetric=c.symmetric and uniform, integer_zero=c.integer_zero and uniform,
                             inner=inner, bcq_iters=c.iters)
    return quantize


PER_MATRIX_METHODS: dict[str, MatrixQuantizer] = {
    "rtn": lambda w, c: quantize_rtn(w, c.bits, c.group_size, c.symmetric, c.clip_search, integer_zero=c.integer_zero),
    "bcq-greedy": _bcq("greedy"),
    "bcq-refined": _bcq("refined"),
    "bcq-alternating": _bcq("alternating"),
    "dyngroup": _dyngroup,
}

# Calibrated methods: (weight, input Hessian, config) -> packed weight, run block by block.
HESSIAN_METHODS = {"gptq": _gptq("uniform"), "gptq-bcq": _gptq("bcq")}

# Calibrated methods trained by block-wise reconstruction (methods/reconstruction.py).
RECONSTRUCTION_METHODS = ("uniquanf", "flexround")

METHODS = [*PER_MATRIX_METHODS, *HESSIAN_METHODS, *RECONSTRUCTION_METHODS]
CALIBRATED = {*HESSIAN_METHODS, *RECONSTRUCTION_METHODS}

BCQ_METHODS = ("bcq-greedy", "bcq-refined", "bcq-alternating")
DYNGROUP_SETTINGS = ("algorithm", "max_groups", "lam", "window", "granularity", "normalize_lambda", "dp_atom_size",
                     "refine_sweeps", "merge_rule")

# QuantConfig setting -> the methods that read it. A checkpoint records only the settings its
# method read (`QuantConfig.recorded`), and quantize notes the flags a method ignores. Every
# method records the ones not named here: method, bits, group_size (-1 for dyngroup, whose groups
# are found, not fixed), include_lm_head, overrides, version.
SETTING_READERS: dict[str, tuple[str, ...]] = {
    "symmetric": ("rtn", "gptq"), "integer_zero": ("rtn", "gptq"), "clip_search": ("rtn",), "offset": BCQ_METHODS,
    "iters": ("bcq-alternating", "gptq-bcq", "uniquanf"), "init": ("bcq-alternating",),
    **{name: ("dyngroup",) for name in DYNGROUP_SETTINGS},
    **{name: tuple(HESSIAN_METHODS) for name in ("damp", "act_order", "true_sequential")},
    **{name: RECONSTRUCTION_METHODS for name in ("epochs", "u_lr", "batch_size", "input_prob")},
    **{name: ("uniquanf",) for name in ("b_lr", "remap_every", "grid_points", "p_norm", "mapping", "shift")},
    # calibration windows are sampled with the seed, and reconstruction's batches and input mixing
    **{name: (*HESSIAN_METHODS, *RECONSTRUCTION_METHODS)
       for name in ("calib", "calib_samples", "calib_seq_len", "seed")},
}


def reads_setting(method: str, setting: str) -> bool:
    """Whether `method`'s result depends on the QuantConfig field `setting`."""
    return method in SETTING_READERS.get(setting, (method,))


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UnibcqError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
