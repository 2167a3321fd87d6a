"""Property-based fuzzing of the quantizers as pure functions (issue #7).

Random shapes (1x1, 1xN, Nx1, zero-size), values (constant rows, all zeros, denormals,
wide ranges, values past fp16, NaN/inf) and parameters (bits, group sizes, algorithms,
Hessians) in random combinations. A valid input gives a packed tensor of the right shape
whose dequantized weights are finite and whose bits per weight are finite and at least
the code bits; an invalid one raises `UnibcqError`, never another exception. Inputs are
never modified. The one-for-one cases live in tests/test_quantizers_*.py.

`CI=1` derandomizes the examples (tests/conftest.py); `UNIBCQ_FUZZ_SCALE=N` runs N times
as many. The plain `test_regression_*` tests at the end pin the bugs the fuzzing found.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor
from unibcq.formats.grouped_binary import GroupedBinaryTensor, parse_granularity
from unibcq.methods.registry import PER_MATRIX_METHODS
from unibcq.quantizers import quantize_bcq, quantize_rtn
from unibcq.quantizers.dyngroup import dyngroup_quantize
from unibcq.quantizers.gptq import gptq_quantize

SCALE = int(os.environ.get("UNIBCQ_FUZZ_SCALE", "1"))
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FP16_MAX = 65504.0
# Below this magnitude every valid quantization must succeed; between it and the fp16
# maximum a range can be too wide for fp16 scales (an error), above the maximum it always is.
SAFE_MAX = 1e4

# --------------------------------------------------------------------------- strategies

SPECIAL = [0.0, -0.0, 1e-40, -1e-40, 1e-45, 1.17e-38, 6e-8, 1e-4, 0.5, 1.0, -1.0, 3.0, 1000.0]


@st.composite
def shapes(draw, max_rows=6, max_cols=40):
    kind = draw(st.sampled_from(["any", "1x1", "1xN", "Nx1"]))
    rows = 1 if kind in ("1x1", "1xN") else draw(st.integers(1, max_rows))
    cols = 1 if kind in ("1x1", "Nx1") else draw(st.integers(1, max_cols))
    return rows, cols


@st.composite
def valid_weights(draw, max_abs=SAFE_MAX):
    """A finite, non-empty float matrix with |w| <= max_abs, of one of several kinds."""
    rows, cols = draw(shapes())
    max_abs = float(np.float32(max_abs))  # a bound hypothesis can use for float32 elements
    kind = draw(st.sampled_from(["normal", "scaled", "constant-rows", "zeros", "denormal", "special", "sparse"]))
    if kind == "normal":
        w = draw(arrays(np.float32, (rows, cols), elements=st.floats(-4, 4, width=32)))
    elif kind == "scaled":
        exponent = draw(st.integers(-40, int(math.log10(max_abs))))
        base = draw(arrays(np.float32, (rows, cols), elements=st.floats(-1, 1, width=32)))
        w = (base.astype(np.float64) * 10.0**exponent).astype(np.float32)
    elif kind == "constant-rows":
        values = draw(st.lists(st.sampled_from(SPECIAL) | st.floats(-max_abs, max_abs, width=32),
                               min_size=rows, max_size=rows))
        w = np.repeat(np.array(values, dtype=np.float32)[:, None], cols, axis=1)
    elif kind == "zeros":
        w = np.zeros((rows, cols), dtype=np.float32)
    elif kind == "denormal":
        w = draw(arrays(np.float32, (rows, cols), elements=st.sampled_from([0.0, 1e-40, -1e-40, 1e-45, -3e-42])))
    elif kind == "special":
        w = draw(arrays(np.float32, (rows, cols), elements=st.sampled_from(SPECIAL + [max_abs, -max_abs])))
    else:
        w = np.zeros((rows, cols), dtype=np.float32)
        w.flat[draw(st.integers(0, w.size - 1))] = draw(st.floats(-max_abs, max_abs, width=32))
    w = np.clip(w, -max_abs, max_abs)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    tensor = torch.from_numpy(w).to(dtype)
    if not torch.isfinite(tensor).all():  # a value past the dtype's range (fp16) became inf
        tensor = torch.from_numpy(w)
    return tensor


@st.composite
def invalid_weights(draw):
    """Matrices every quantizer must reject: empty, not 2-D, NaN/inf, past the fp16 range."""
    kind = draw(st.sampled_from(["empty", "ndim", "nonfinite", "too-large"]))
    if kind == "empty":
        return torch.zeros(draw(st.sampled_from([(0, 0), (0, 5), (3, 0), (0, 1)])))
    if kind == "ndim":
        return torch.zeros(draw(st.sampled_from([(4,), (2, 2, 2), (1, 1, 1, 1)]))) + 0.5
    w = draw(valid_weights()).float().clone()
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf] if kind == "nonfinite"
                               else [1e30, -1e30, 3.4e38, 7e4, -65505.0, 1e5]))
    for _ in range(draw(st.integers(1, 3))):
        w.view(-1)[draw(st.integers(0, w.numel() - 1))] = bad
    return w


# one_of picks its branches about equally often (identical branches count once): three
# distinct valid branches against one invalid keep most examples valid, so the valid-input
# properties get enough examples too.
VALID_BITS = st.integers(1, 8)
ANY_BITS = st.one_of(VALID_BITS, st.sampled_from([1, 2, 3, 4]), st.sampled_from([2, 3, 8]),
                     st.sampled_from([0, 9, -1, 16, True, 2.0, "3", None]))
VALID_GROUP = st.one_of(st.sampled_from([-1, 1, 2, 3, 5, 7, 8, 127, 1000]), st.integers(1, 64))
ANY_GROUP = st.one_of(st.sampled_from([-1, 1, 2, 3, 5, 7, 8, 127, 1000]), st.integers(1, 64), st.integers(2, 9),
                      st.sampled_from([0, -2, -3, True, 2.5, None, "8"]))
ANY_WEIGHT = st.one_of(valid_weights(), valid_weights(max_abs=100.0), valid_weights(max_abs=FP16_MAX),
                       invalid_weights())


def bits_ok(bits) -> bool:
    return type(bits) is int and 1 <= bits <= 8


def group_ok(group_size) -> bool:
    return type(group_size) is int and (group_size == -1 or group_size >= 1)


def check_packed(packed, weight: torch.Tensor, bits: int | None = None, group_size: int | None = None) -> None:
    """The properties every valid result has."""
    assert tuple(packed.shape) == tuple(weight.shape)
    dq = packed.dequantize()
    assert dq.shape == weight.shape and dq.dtype == torch.float32
    assert torch.isfinite(dq).all()
    bpw = packed.bits_per_weight
    assert math.isfinite(bpw) and bpw > 0
    if isinstance(packed, BCQTensor):
        assert packed.bits == bits and packed.group_size == group_size
        assert bpw >= bits  # the bit-planes alone cost `bits` per weight
        assert torch.isfinite(packed.alpha.float()).all() and (packed.alpha >= 0).all()
    peak = float(weight.float().abs().max())
    if peak == 0:
        assert not dq.any()  # all-zero weights come back exactly
    # No level strays far from the data: every value is within the group's own range
    # (plus the fp16 rounding of the scales).
    assert float(dq.abs().max()) <= 2 * peak + 1e-3


def run_or_reject(fn, valid: bool, may_reject: bool = False):
    """fn() for a valid input (may_reject: a UnibcqError is also fine), a UnibcqError for an invalid one."""
    event("valid input" if valid else "invalid input")
    if valid and not may_reject:
        return fn()
    try:
        result = fn()
    except UnibcqError as exc:
        assert str(exc) and "\n" not in str(exc)
        event("rejected")
        return None
    assert valid, "an invalid input was accepted"
    return result


# --------------------------------------------------------------------------- RTN and BCQ


@settings(max_examples=150 * SCALE, **FUZZ)
@given(weight=ANY_WEIGHT, bits=ANY_BITS, group_size=ANY_GROUP, symmetric=st.booleans(), clip_search=st.booleans(),
       integer_zero=st.booleans())
def test_rtn(weight, bits, group_size, symmetric, clip_search, integer_zero):
    before = weight.clone()
    valid = bits_ok(bits) and group_ok(group_size) and _weight_ok(weight)
    packed = run_or_reject(lambda: quantize_rtn(weight, bits, group_size, symmetric, clip_search,
                                                integer_zero=integer_zero),
                           valid, may_reject=_near_fp16_limit(weight))
    if packed is not None:
        check_packed(packed, weight, bits, group_size)
    assert torch.equal(weight, before) or torch.isnan(weight).any()


@settings(max_examples=200 * SCALE, **FUZZ)
@given(weight=ANY_WEIGHT, bits=ANY_BITS, group_size=ANY_GROUP, algorithm=st.sampled_from(["greedy", "refined", "alternating", "alternating", "nope"]),
       offset=st.booleans(), iters=st.integers(0, 4), init=st.sampled_from(["greedy", "greedy+uniform", "x"]))
def test_bcq(weight, bits, group_size, algorithm, offset, iters, init):
    before = weight.clone()
    valid = (bits_ok(bits) and group_ok(group_size) and _weight_ok(weight) and algorithm != "nope"
             and (algorithm != "alternating" or init != "x"))
    packed = run_or_reject(lambda: quantize_bcq(weight, bits, group_size, algorithm, offset, iters, init),
                           valid, may_reject=_near_fp16_limit(weight))
    if packed is not None:
        check_packed(packed, weight, bits, group_size)
        assert (packed.offset is not None) == offset
    assert torch.equal(weight, before) or torch.isnan(weight).any()


def _weight_ok(weight: torch.Tensor) -> bool:
    return (weight.dim() == 2 and weight.numel() > 0 and bool(torch.isfinite(weight).all())
            and float(weight.float().abs().max()) <= FP16_MAX)


def _near_fp16_limit(weight: torch.Tensor) -> bool:
    return weight.numel() > 0 and bool(torch.isfinite(weight).all()) and float(weight.float().abs().max()) > SAFE_MAX


# --------------------------------------------------------------------------- dynamic grouping

GRANULARITIES = st.one_of(st.sampled_from(["matrix", "row"]), st.integers(1, 45).map(lambda n: ("block", n)))


@settings(max_examples=100 * SCALE, **FUZZ)
@given(data=st.data(), max_groups=st.integers(1, 12), lam=st.one_of(st.just(0.0), st.floats(0, 10)),
       algorithm=st.sampled_from(["windowed", "greedy", "dp"]), window=st.integers(1, 9), granularity=GRANULARITIES,
       normalize=st.booleans(), atom=st.integers(1, 5), sweeps=st.integers(0, 3))
def test_dyngroup_quantize_valid(data, max_groups, lam, algorithm, window, granularity, normalize, atom, sweeps):
    """The solver on any finite matrix (zero-size included, as its contract allows)."""
    weight = data.draw(st.one_of(valid_weights(), valid_weights(max_abs=1e30),
                                 st.sampled_from([(0, 0), (0, 3), (2, 0)]).map(torch.zeros)), label="weight")
    before = weight.clone()
    res = dyngroup_quantize(weight, max_groups, lam, algorithm, window, granularity, normalize, atom, sweeps)
    dq = res.dequantize()
    assert dq.shape == weight.shape and torch.isfinite(dq).all()
    assert torch.equal(res.signs, weight >= 0) or weight.numel() == 0
    assert (res.num_groups <= max_groups).all() and int(res.group_sizes.sum()) == weight.numel()
    assert math.isfinite(res.objective) and res.objective >= 0
    assert torch.equal(weight, before)
    if weight.numel() and float(weight.float().abs().max()) <= SAFE_MAX:
        kind = granularity if isinstance(granularity, str) else f"block:{granularity[1]}"
        packed = GroupedBinaryTensor.from_parts(res.signs, res.group_index, res.scales, kind)
        packed.check_values()
        # The file stores fp16 scales: the packed weights are the solver's, rounded to fp16.
        assert torch.equal(packed.dequantize(), dq.to(torch.float16).float())
        assert math.isfinite(packed.bits_per_weight) and packed.bits_per_weight >= 1


BAD_DYNGROUP = [
    {"max_groups": 0}, {"max_groups": -1}, {"max_groups": 2.5}, {"max_groups": True}, {"max_groups": "4"},
    {"lam": -1.0}, {"lam": math.nan}, {"lam": math.inf}, {"lam": "x"}, {"lam": True}, {"lam": None},
    {"window": 0}, {"window": 1.5}, {"dp_atom_size": 0}, {"dp_atom_size": 2.0},
    {"refine_sweeps": -1}, {"refine_sweeps": 0.5}, {"algorithm": "kmeans"}, {"algorithm": None},
    {"granularity": "column"}, {"granularity": ("block", 0)}, {"granularity": ("block", 2.0)},
    {"granularity": "block:4"}, {"granularity": None}, {"granularity": ["block", 4]},
]


@settings(max_examples=60 * SCALE, **FUZZ)
@given(weight=st.one_of(valid_weights(), invalid_weights()), bad=st.sampled_from(BAD_DYNGROUP))
def test_dyngroup_quantize_rejects_bad_parameters(weight, bad):
    with pytest.raises(UnibcqError):
        dyngroup_quantize(weight, **bad)


@settings(max_examples=80 * SCALE, **FUZZ)
@given(weight=ANY_WEIGHT, max_groups=st.integers(1, 9), algorithm=st.sampled_from(["windowed", "greedy", "dp"]),
       granularity=st.one_of(st.sampled_from(["matrix", "row"]), st.integers(1, 45).map(lambda n: f"block:{n}")),
       lam=st.floats(0, 3))
def test_dyngroup_method(weight, max_groups, algorithm, granularity, lam):
    """The dyngroup method as `unibcq quantize` runs it: validated weight -> packed grouped-binary."""
    config = QuantConfig("dyngroup", bits=1, group_size=-1, max_groups=max_groups, algorithm=algorithm,
                         granularity=granularity, lam=lam, window=3).validate()
    valid = _weight_ok(weight) and bool(weight.any())  # an all-zero layer has nothing to group
    packed = run_or_reject(lambda: PER_MATRIX_METHODS["dyngroup"](weight, config), valid)
    if packed is not None:
        assert isinstance(packed, GroupedBinaryTensor)
        packed.check_values()
        check_packed(packed, weight)
        assert packed.bits_per_weight >= 1


# --------------------------------------------------------------------------- GPTQ


@st.composite
def hessians(draw, n: int):
    """(H, must_work): a random Hessian for n inputs; must_work False where H may be rejected."""
    kind = draw(st.sampled_from(["gram", "gram", "identity", "zero", "dead", "diagonal", "negative", "rank1"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind in ("gram", "dead", "rank1"):
        samples = 1 if kind == "rank1" else draw(st.integers(1, 2 * n + 2))
        x = torch.randn(samples, n, generator=gen) * 10.0 ** draw(st.integers(-3, 2))
        h = 2 * x.T @ x / samples
        if kind == "dead":
            dead = torch.rand(n, generator=gen) < 0.4
            h[dead, :] = 0
            h[:, dead] = 0
    elif kind == "identity":
        h = torch.eye(n)
    elif kind == "zero":
        h = torch.zeros(n, n)
    elif kind == "diagonal":
        h = torch.diag(torch.rand(n, generator=gen) * 10 + 1e-3)
    else:
        h = -torch.eye(n) - 0.1
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return h.to(dtype), kind != "negative"


@settings(max_examples=200 * SCALE, **FUZZ)
@given(data=st.data(), bits=ANY_BITS, group_size=ANY_GROUP,
       damp=st.one_of(st.sampled_from([0.0, 0.01, 0.1, 1.0]), st.sampled_from([0.01, 0.1]),
                      st.floats(0, 10), st.sampled_from([-0.1, math.nan, math.inf, "x"])),
       block_size=st.one_of(st.integers(1, 9), st.just(128), st.integers(2, 5), st.sampled_from([0, -1, 2.0])),
       act_order=st.booleans(), inner=st.sampled_from(["uniform"] * 4 + ["bcq"] * 3 + ["nope"]),
       symmetric=st.booleans(), integer_zero=st.booleans(),
       bcq_iters=st.one_of(st.integers(0, 3), st.sampled_from([1, 2]), st.just(-1)))
def test_gptq(data, bits, group_size, damp, block_size, act_order, inner, symmetric, integer_zero, bcq_iters):
    weight = data.draw(ANY_WEIGHT, label="weight")
    n = weight.shape[-1] if weight.dim() == 2 else 3
    hessian, must_work = data.draw(hessians(max(n, 1)), label="hessian")
    bad_h = data.draw(st.sampled_from([None] * 9 + ["nan", "shape", "int"]), label="bad_hessian")
    if bad_h == "nan":
        hessian = hessian.clone()
        hessian[0, 0] = math.nan
    elif bad_h == "shape":
        hessian = torch.eye(n + 1)
    elif bad_h == "int":
        hessian = torch.eye(n, dtype=torch.int64)
    w_before, h_before = weight.clone(), hessian.clone()
    valid = (bits_ok(bits) and group_ok(group_size) and _weight_ok(weight) and bad_h is None
             and type(damp) is float and math.isfinite(damp) and damp >= 0
             and type(block_size) is int and block_size >= 1 and bcq_iters >= 0 and inner != "nope"
             and not (inner == "bcq" and (symmetric or integer_zero)))
    packed = run_or_reject(
        lambda: gptq_quantize(weight, hessian, bits, group_size, damp=damp, block_size=block_size,
                              act_order=act_order, symmetric=symmetric, integer_zero=integer_zero, inner=inner,
                              bcq_iters=bcq_iters),
        valid, may_reject=not must_work or _near_fp16_limit(weight))
    if packed is not None:
        check_packed_gptq(packed, weight, bits, group_size)
    assert torch.equal(weight, w_before) or torch.isnan(weight).any()
    assert torch.equal(hessian, h_before) or torch.isnan(hessian).any()


def check_packed_gptq(packed: BCQTensor, weight: torch.Tensor, bits: int, group_size: int) -> None:
    """As `check_packed`, but GPTQ's error feedback may move values outside the original range."""
    assert tuple(packed.shape) == tuple(weight.shape) and packed.bits == bits and packed.group_size == group_size
    dq = packed.dequantize()
    assert torch.isfinite(dq).all()
    assert math.isfinite(packed.bits_per_weight) and packed.bits_per_weight >= bits


# --------------------------------------------------------------------------- QuantConfig

HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-10, 300), st.sampled_from([2**40, -(2**40)]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["block:2", "block:\u00b2", "row", "dp", "greedy", "local"]),
                    st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FIELDS = ["bits", "group_size", "iters", "init", "algorithm", "max_groups", "lam", "window", "granularity",
          "dp_atom_size", "refine_sweeps", "damp", "epochs", "u_lr", "b_lr", "remap_every", "grid_points",
          "p_norm", "mapping", "batch_size", "input_prob", "overrides", "merge_rule", "act_order", "true_sequential"]


@settings(max_examples=150 * SCALE, **FUZZ)
@given(method=st.sampled_from(["rtn", "bcq-alternating", "dyngroup", "gptq", "uniquanf", "flexround", "nope", 3]),
       values=st.dictionaries(st.sampled_from(FIELDS), HOSTILE, max_size=4))
def test_quant_config_validate(method, values):
    """Any field values: validate() accepts them or raises UnibcqError, nothing else."""
    try:
        QuantConfig(method, **values).validate()
    except UnibcqError as exc:
        assert str(exc)


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("value", [1e30, -1e30, 3.4e38, 7e4])
@pytest.mark.parametrize("method", ["rtn", "bcq-greedy", "bcq-alternating", "dyngroup", "gptq"])
def test_regression_values_past_fp16_rejected(value, method):
    """1e30 gave inf fp16 scales and non-finite dequantized weights, silently."""
    weight = torch.tensor([[value, 0.5, -0.25, 1.0], [0.1, 0.2, 0.3, 0.4]])
    with pytest.raises(UnibcqError, match="fp16"):
        if method == "gptq":
            gptq_quantize(weight, torch.eye(4), 3, 2)
        else:
            PER_MATRIX_METHODS[method](weight, QuantConfig(method, bits=1 if method == "dyngroup" else 3,
                                                           group_size=-1 if method == "dyngroup" else 2))


@pytest.mark.parametrize("quantize", [
    lambda w: quantize_rtn(w, 1, -1),
    lambda w: gptq_quantize(w, torch.eye(4), 1, -1),
])
def test_regression_range_too_wide_for_fp16_step(quantize):
    """+-6e4 at 1 bit: the step 1.2e5 overflowed fp16 (inf alpha) although every value fits."""
    weight = torch.tensor([[6e4, -6e4, 1.0, 0.0]])
    with pytest.raises(UnibcqError, match="too wide for the fp16 scales"):
        quantize(weight)


@pytest.mark.parametrize("bad", BAD_DYNGROUP[:19], ids=repr)
def test_regression_dyngroup_parameter_types(bad):
    """max_groups=2.5 / "4", lam="x", window=1.5 ... raised TypeError or ran with a float count."""
    with pytest.raises(UnibcqError):
        dyngroup_quantize(torch.randn(3, 5), **bad)


@pytest.mark.parametrize("granularity", ["block:\u00b2", "block:\u0663", None, 5, "block:" + "9" * 5000, ["row"]])
def test_regression_granularity_strings(granularity):
    """'block:²' passed str.isdigit() and crashed int(); non-strings raised AttributeError."""
    with pytest.raises(UnibcqError) as info:
        parse_granularity(granularity)
    assert len(str(info.value)) < 200
    with pytest.raises(UnibcqError):
        QuantConfig("dyngroup", bits=1, group_size=-1, granularity=granularity).validate()
