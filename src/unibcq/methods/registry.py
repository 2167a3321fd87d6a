"""Method name -> the function that quantizes one matrix: per-matrix methods from the weight alone,
GPTQ's from the weight and its input Hessian; reconstruction methods train whole blocks
(`methods.reconstruction`). A new method is an entry here, plus the flags it reads in
`cli.flag_methods` and its settings' checks in `QuantConfig.validate`."""

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


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UnibcqError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
