"""GPTQ (Frantar et al. 2022): quantize columns one by one, pushing each column's error
onto the not-yet-quantized columns so the layer output X W^T changes as little as possible.

With H = 2 X^T X / n (inputs X (n, in), see `accumulate_hessian`) and U the upper Cholesky
factor of H^-1 (H^-1 = U^T U), quantizing column j to q_j and updating

    err = (w_j - q_j) / U[j, j],    W[:, k] -= err * U[j, k]  for every k > j

is the optimal (OBS) compensation for the remaining columns. Updates are applied lazily:
inside a block of `block_size` columns column by column, and to the columns after the block
once per block, as one matrix product (same result, far fewer memory passes).

Grid per group. A group's grid is fixed when its first column is reached, fitted to the
group's CURRENT weights, i.e. including the compensation of every earlier column. The
reference code fits on a copy that misses the updates of the earlier columns of the same
lazy block when a group starts mid-block; here the missing part is added, so the result
does not depend on `block_size` (only on the float rounding of the sums).

act_order processes columns by decreasing diag(H) (the most sensitive inputs first, while
there are most columns left to absorb their error). Groups stay defined by the ORIGINAL
column index, because the stored format says group g covers columns [g*gs, (g+1)*gs) of
each row; with a shuffled order a group's columns are reached at scattered times, so every
grid is fitted up front to the original weights (the reference's "static groups" variant).

inner="uniform" is GPTQ proper: a min-max n-bit grid per group (`minmax_params`), stored
exactly as BCQ. inner="bcq" ("gptq-bcq", our extension) fits 2^n BCQ levels per group with
alternating BCQ and rounds each column to the nearest level. In both cases the error
feedback uses the value the stored (fp16) scales and offset decode to, computed exactly as
`BCQTensor.dequantize` does, so the compensation targets what is really served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import STORAGE_DTYPE, BCQTensor, effective_group_size, group_index, num_groups
from unibcq.quantizers.bcq import bcq_alternating_groups, nearest_codes
from unibcq.quantizers.grouping import check_stored, check_weight
from unibcq.quantizers.uniform import check_bits, minmax_params, quantize_to_grid, uniform_to_bcq

INNER_QUANTIZERS = ("uniform", "bcq")
# Extra attempts, each with 10x the previous damping, when H is too ill-conditioned to factor.
DAMP_RETRIES = 3
# Damping the retries start from when the caller asked for none (damp=0).
RETRY_DAMP_FLOOR = 1e-4


def accumulate_hessian(
    h: torch.Tensor | None, x: torch.Tensor, count: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running H = 2 X^T X / n.

    x has shape (..., in); every leading index is one sample (token), so n counts tokens.
    The update H <- H * n / (n + m) + 2 / (n + m) * x^T x keeps H an average, so it stays
    in range however many batches arrive (a plain sum grows without bound in float32).
    GPTQ is invariant to the overall scale of H (damping is relative to its mean diagonal),
    so counting tokens rather than sequences changes nothing in the result.

    `h` (None on the first call) is updated IN PLACE, so wide layers never hold a second
    (in, in) matrix, and returned with the new count. A new H has `dtype` (float32 as in
    the reference; float64 for long calibration runs) and lives on x's device.
    """
    if x.dim() < 1 or x.shape[-1] == 0:
        raise UnibcqError(f"layer inputs must have shape (..., in_features), got {tuple(x.shape)}")
    if not isinstance(count, int) or count < 0:
        raise UnibcqError(f"sample count must be a non-negative integer, got {count!r}")
    in_features = x.shape[-1]
    if h is None:
        if count:
            raise UnibcqError(f"no Hessian given but the sample count is {count}; start from count 0")
        h = torch.zeros(in_features, in_features, dtype=dtype, device=x.device)
    elif tuple(h.shape) != (in_features, in_features):
        raise UnibcqError(
            f"Hessian has shape {tuple(h.shape)} but the inputs have {in_features} features"
        )
    rows = x.detach().reshape(-1, in_features).to(device=h.device, dtype=h.dtype)
    if not torch.isfinite(rows).all():
        raise UnibcqError("layer inputs contain NaN/inf: a weight before this layer holds NaN/inf, or the calibration "
                          "forward pass overflowed")
    m = rows.shape[0]
    if m == 0:
        return h, count
    total = count + m
    h.mul_(count / total)
    h.addmm_(rows.T, rows, alpha=2.0 / total)
    return h, total


@dataclass
class _GroupGrid:
    """One group's quantizer for all rows: the stored (fp16-valued) BCQ levels.

    alpha (out, bits) and offset (out,) hold exactly the fp16 values that get stored;
    scale / zero are the uniform grid's parameters (None for inner="bcq").
    """

    alpha: torch.Tensor
    offset: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None

    def signs(self, column: torch.Tensor) -> torch.Tensor:
        """Codes of one column (out,) as bool (out, bits), True meaning +1."""
        bits = self.alpha.shape[1]
        if self.scale is not None:
            q = quantize_to_grid(column[:, None], self.scale, self.zero, bits)
            return uniform_to_bcq(q, self.scale, self.zero, bits).signs[:, 0, :]
        return nearest_codes(column[:, None], self.alpha, self.offset)[:, 0, :] > 0

    def value(self, signs: torch.Tensor) -> torch.Tensor:
        """What the codes decode to, summed in the same order as `BCQTensor.dequantize`."""
        out = torch.zeros_like(self.offset)
        for i in range(self.alpha.shape[1]):
            out += torch.where(signs[:, i], self.alpha[:, i], -self.alpha[:, i])
        return out + self.offset


def _fit_grid(
    x: torch.Tensor, bits: int, inner: str, symmetric: bool, integer_zero: bool, bcq_iters: int
) -> _GroupGrid:
    """Fit one group's grid to its weights x (out, width)."""
    if inner == "uniform":
        scale, zero = minmax_params(x, bits, symmetric, integer_zero=integer_zero)
        codes = uniform_to_bcq(quantize_to_grid(x, scale, zero, bits), scale, zero, bits)
    else:
        codes = bcq_alternating_groups(x.contiguous(), bits, offset=True, iters=bcq_iters)
        scale = zero = None
    return _GroupGrid(
        alpha=codes.alpha.to(STORAGE_DTYPE).float(),
        offset=codes.offset.to(STORAGE_DTYPE).float(),
        scale=scale,
        zero=zero,
    )


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1, lambda = damp * mean(diag H).

    Factored in float64: for wide layers with nearly collinear inputs float32 loses the
    small eigen-directions that the error feedback relies on. If H (or its inverse) is
    still not positive definite, retries with 10x the damping, DAMP_RETRIES times.
    """
    h64 = h.double()
    mean_diag = h64.diagonal().mean()
    eye = torch.eye(h64.shape[0], dtype=h64.dtype, device=h64.device)
    attempts = [damp] + [max(damp, RETRY_DAMP_FLOOR) * 10**k for k in range(1, DAMP_RETRIES + 1)]
    for lam in attempts:
        chol, info = torch.linalg.cholesky_ex(h64 + lam * mean_diag * eye)
        if int(info) != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if int(info) == 0 and torch.isfinite(upper).all():
            return upper.float()
    raise UnibcqError(
        f"GPTQ: the Hessian is not positive definite even with damping {attempts[-1]:g} x its "
        "mean diagonal; collect more calibration samples or raise the damping"
    )


def _check_args(
    hessian: torch.Tensor, in_features: int, bits: int, group_size: int, damp: float, block_size: int,
    inner: str, symmetric: bool, integer_zero: bool, bcq_iters: int,
) -> torch.Tensor:
    """Validate everything but the weight; return H as float32 on its own device."""
    check_bits(bits)
    effective_group_size(in_features, group_size)
    if inner not in INNER_QUANTIZERS:
        raise UnibcqError(f"unknown GPTQ inner quantizer {inner!r}; choose one of {list(INNER_QUANTIZERS)}")
    if inner == "bcq" and (symmetric or integer_zero):
        raise UnibcqError("symmetric / integer_zero describe a uniform grid; they do not apply to inner='bcq'")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise UnibcqError(f"GPTQ damping must be a finite number >= 0, got {damp!r}")
    for name, value, low in (("block size", block_size, 1), ("BCQ iterations", bcq_iters, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UnibcqError(f"GPTQ {name} must be an integer >= {low}, got {value!r}")
    if tuple(hessian.shape) != (in_features, in_features):
        raise UnibcqError(
            f"Hessian has shape {tuple(hessian.shape)}, expected ({in_features}, {in_features}) "
            "for this weight; was it collected on this layer's inputs?"
        )
    if not hessian.is_floating_point() or not torch.isfinite(hessian).all():
        raise UnibcqError("Hessian must be a finite floating-point matrix (it has NaN/inf or is not float)")
    # float64 stays float64 for the factorization (accumulate_hessian(dtype=torch.float64)).
    return hessian.detach().to(torch.promote_types(hessian.dtype, torch.float32))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    symmetric: bool = False,
    integer_zero: bool | None = None,
    inner: str = "uniform",
    bcq_iters: int = 15,
) -> BCQTensor:
    """GPTQ-quantize one weight (out, in) given H = 2 X^T X / n (in, in); see the module doc.

    Inputs that never fire (H[i, i] == 0) cannot affect the output: their weights are set
    to 0 and H[i, i] to 1 so H stays invertible. `symmetric` / `integer_zero` shape the
    uniform grid as in `quantize_rtn` (`integer_zero` left as None means the reference's integer
zero point for inner="uniform" and does not apply to BCQ levels); `bcq_iters` is the alternating-BCQ iteration count
    for inner="bcq". Neither input is modified.
    """
    w = check_weight(weight).clone()
    out_features, in_features = w.shape
    if integer_zero is None:
        integer_zero = inner == "uniform"
    h = _check_args(
        hessian, in_features, bits, group_size, damp, block_size, inner, symmetric, integer_zero, bcq_iters
    ).to(w.device).clone()

    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0

    def fit(x: torch.Tensor) -> _GroupGrid:
        return _fit_grid(x, bits, inner, symmetric, integer_zero, bcq_iters)

    gs = effective_group_size(in_features, group_size)
    n_groups = num_groups(in_features, group_size)
    grids: list[_GroupGrid | None] = [None] * n_groups
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        grids = [fit(w[:, g * gs : (g + 1) * gs]) for g in range(n_groups)]
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(in_features, device=w.device)
    u = _inverse_cholesky(h, damp)

    columns = perm.tolist()
    group_of = group_index(in_features, group_size).tolist()
    signs = torch.zeros(bits, out_features, in_features, dtype=torch.bool, device=w.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            j = i1 + i
            col = columns[j]
            if not act_order and col % gs == 0:
                # Group start: the group's current weights are the block's copy (which has
                # this block's updates so far) plus, for columns past the block, W less the
                # updates of this block's first i columns (applied to W only at block end).
                end = min(col + gs, in_features)
                current = block[:, i : end - i1]
                if end > i2:
                    rest = w[:, i2:end] - errors[:, :i] @ u[i1:j, i2:end]
                    current = torch.cat([current, rest], dim=1)
                grids[group_of[col]] = fit(current)
            grid = grids[group_of[col]]
            column = block[:, i]
            codes = grid.signs(column)
            signs[:, :, col] = codes.T
            err = (column - grid.value(codes)) / u[j, j]
            block[:, i + 1 :] -= err[:, None] * u[j, j + 1 : i2][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]

    alpha = torch.stack([g.alpha for g in grids], dim=1)
    offset = torch.stack([g.offset for g in grids], dim=1)
    return check_stored(BCQTensor.from_codes(signs, alpha, offset, group_size), weight)
