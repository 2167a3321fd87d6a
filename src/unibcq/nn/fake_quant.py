"""Trainable fake-quant linear layers used during block-wise reconstruction.

`UniQuanFLinear` trains BCQ through the UQ transform (see `unibcq.quantizers.uniquanf`);
`FlexRoundLinear` is its uniform-grid counterpart (Lee et al., FlexRound). Both wrap a
frozen full-precision weight, expose their trainable parameters in two groups ("mapping":
scales and divisors, "levels": BCQ alphas) so the optimiser can give them separate learning
rates, and `export()` the trained result into the packed BCQ format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unibcq.formats.bcq import BCQTensor
from unibcq.quantizers.bcq import sign_patterns
from unibcq.quantizers.grouping import check_stored, from_padded_groups, group_parts, to_padded_groups
from unibcq.quantizers.uniform import search_clipping, uniform_to_bcq
from unibcq.quantizers.uniquanf import clipping_grid, global_remap, local_remap, unified_init

MAPPINGS = ("local", "global", "direct")


def _per_group_init(weight: torch.Tensor, group_size: int, fn) -> list[torch.Tensor]:
    """Run a per-group init `fn(x (R, g)) -> tensors with leading dim R` on the full groups and
    on the shorter tail group separately (so padding never biases a fit), returning tensors
    of shape (out, G, ...)."""
    out_features = weight.shape[0]
    results = [[t.reshape(out_features, groups, *t.shape[1:]) for t in fn(x)]
               for x, groups, _ in group_parts(weight, group_size)]
    return [torch.cat(ts, dim=1) for ts in zip(*results)]


class UniQuanFLinear(nn.Module):
    def __init__(
        self,
        linear: nn.Linear,
        bits: int,
        group_size: int,
        grid_points: int = 1,
        init_iters: int = 15,
        p: float = 2.4,
        shift: bool = False,
        mapping: str = "local",
        remap_every: int = 2,
    ) -> None:
        super().__init__()
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}")
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.mapping, self.remap_every = bits, group_size, mapping, remap_every
        self.c = (2**bits - 1) / 2
        grouped, mask = to_padded_groups(weight, group_size)
        self.register_buffer("grouped_weight", grouped)
        scale, zero, alpha, beta = _per_group_init(
            weight, group_size,
            lambda x: vars(unified_init(x, bits, clipping_grid(grid_points), init_iters, p, shift)).values(),
        )
        self.d1 = nn.Parameter(scale.log().unsqueeze(-1))
        self.d2 = nn.Parameter(torch.zeros_like(grouped))
        self.d3 = nn.Parameter(torch.zeros_like(scale).unsqueeze(-1))
        self.alpha = nn.Parameter(alpha)
        self.register_buffer("zero", zero.unsqueeze(-1))
        self.register_buffer("beta", beta.unsqueeze(-1))
        self.register_buffer("patterns", sign_patterns(bits))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("index", torch.zeros(grouped.shape, dtype=torch.int64))
        self.steps = 0
        self.remap(local=False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"mapping": [self.d1, self.d2, self.d3], "levels": [self.alpha]}

    def transformed(self) -> torch.Tensor:
        """u = W / D + z - beta - c, shape (out, G, gs)."""
        divisor = torch.exp(self.d1 + self.d2 + self.d3)
        return self.grouped_weight / divisor + self.zero - self.beta - self.c

    @torch.no_grad()
    def remap(self, local: bool = True) -> None:
        """Re-choose each weight's level k* (locally: previous level or a value neighbour)."""
        u = self.transformed()
        out_features, groups, gs = u.shape
        flat_u, flat_alpha = u.reshape(-1, gs), self.alpha.reshape(-1, self.bits)
        if local:
            index = local_remap(flat_u, flat_alpha, self.index.reshape(-1, gs))
        else:
            index = global_remap(flat_u, flat_alpha)
        self.index = index.reshape(out_features, groups, gs)

    def _levels(self) -> torch.Tensor:
        """Levels of the current k*, differentiable in alpha: (out, G, gs)."""
        return (self.alpha.unsqueeze(2) * self.patterns[self.index]).sum(-1)

    def grouped_weight_hat(self) -> torch.Tensor:
        if self.training:
            if self.mapping == "direct":
                self.remap(local=False)
            elif self.steps % self.remap_every == 0:
                self.remap(local=self.mapping == "local")
            self.steps += 1
        u = self.transformed()
        level = self._levels()
        # Straight-through: the value is the level, the gradient w.r.t. u is 1 and w.r.t.
        # alpha_i is b_i(k*). Gradient filtering: a clipped weight (further from its level
        # than the smallest alpha) passes no gradient through either path.
        clipped = (u - level).abs() > self.alpha.abs().min(dim=-1, keepdim=True).values
        ste = level + (u - u.detach())
        q = torch.where(clipped, level.detach(), ste)
        return torch.exp(self.d1) * (q + self.beta + self.c - self.zero)

    def weight_hat(self) -> torch.Tensor:
        return from_padded_groups(self.grouped_weight_hat(), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat(), self.bias)

    @torch.no_grad()
    def unified(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unification theorem, in float32: (signs (bits, out, in), alpha' (out, G, bits),
        offset (out, G)) with alpha' = s alpha, offset = s (beta + c - z), non-negative alphas."""
        scale = torch.exp(self.d1)
        alpha = scale * self.alpha
        offset = (scale * (self.beta + self.c - self.zero)).squeeze(-1)
        signs = self.patterns[self.index] > 0
        flip = alpha < 0
        signs = signs ^ flip.unsqueeze(2)
        planes = from_padded_groups(signs, self.in_features).permute(2, 0, 1)
        return planes, alpha.abs(), offset

    def export(self) -> BCQTensor:
        planes, alpha, offset = self.unified()
        return check_stored(BCQTensor.from_codes(planes, alpha, offset, self.group_size),
                            from_padded_groups(self.grouped_weight, self.in_features))


class FlexRoundLinear(nn.Module):
    """W_hat = s1 * (clamp(round(W / (s1 * S2 * s3 * s4) + z), 0, 2^n - 1) - z).

    s1: common scale per group, S2: element-wise, s3: per output row, s4: per input column,
    all learned in log space; z fixed after a min-max + clipping-search init.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        grouped, _ = to_padded_groups(weight, group_size)
        self.register_buffer("grouped_weight", grouped)
        scale, zero = _per_group_init(weight, group_size, lambda x: search_clipping(x, bits, symmetric=False))
        self.log_s1 = nn.Parameter(scale.log().unsqueeze(-1))
        self.log_s2 = nn.Parameter(torch.zeros_like(grouped))
        self.log_s3 = nn.Parameter(torch.zeros(grouped.shape[0], 1, 1))
        self.log_s4 = nn.Parameter(torch.zeros(1, *grouped.shape[1:]))
        self.register_buffer("zero", zero.unsqueeze(-1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"mapping": [self.log_s1, self.log_s2, self.log_s3, self.log_s4], "levels": []}

    def codes(self) -> torch.Tensor:
        divisor = torch.exp(self.log_s1 + self.log_s2 + self.log_s3 + self.log_s4)
        v = self.grouped_weight / divisor + self.zero
        rounded = v + (torch.round(v) - v).detach()
        return torch.clamp(rounded, 0, 2**self.bits - 1)

    def weight_hat(self) -> torch.Tensor:
        grouped = torch.exp(self.log_s1) * (self.codes() - self.zero)
        return from_padded_groups(grouped, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat(), self.bias)

    @torch.no_grad()
    def export(self) -> BCQTensor:
        q = self.codes()
        out_features, groups, gs = q.shape
        scale = torch.exp(self.log_s1).reshape(-1)
        codes = uniform_to_bcq(q.reshape(-1, gs), scale, self.zero.reshape(-1), self.bits)
        signs = from_padded_groups(codes.signs.reshape(out_features, groups, gs, self.bits), self.in_features)
        packed = BCQTensor.from_codes(signs.permute(2, 0, 1), codes.alpha.reshape(out_features, groups, self.bits),
                                      codes.offset.reshape(out_features, groups), self.group_size)
        return check_stored(packed, from_padded_groups(self.grouped_weight, self.in_features))
