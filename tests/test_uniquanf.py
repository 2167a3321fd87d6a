"""UniQuanF / FlexRound: initialisation, mapping, gradients, unification export, the engine."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import unibcq
from unibcq.nn.fake_quant import FlexRoundLinear, UniQuanFLinear
from unibcq.nn.qlinear import PackedLinear
from unibcq.quantizers import quantize_bcq, quantize_rtn
from unibcq.quantizers.bcq import level_values
from unibcq.quantizers.uniquanf import clipping_grid, global_remap, local_remap, unified_init


def _linear(out_features: int = 24, in_features: int = 72, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def _train_steps(layer: nn.Module, steps: int = 6, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [p for group in layer.param_groups().values() for p in group]
    opt = torch.optim.Adam(params, lr=1e-2)
    target = copy.deepcopy(layer.grouped_weight)
    layer.train()
    for _ in range(steps):
        x = torch.randn(8, layer.in_features, generator=gen)
        ref = x @ _ungroup(target, layer.in_features).T
        loss = (layer(x) - ref).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()


def _ungroup(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
def test_unification_export_equals_trained_fake_quant(bits, group_size):
    layer = UniQuanFLinear(_linear(), bits, group_size, init_iters=3)
    _train_steps(layer)
    with torch.no_grad():
        fake = layer.weight_hat()
    planes, alpha, offset = layer.unified()
    cols = torch.arange(72) // (32 if group_size == 32 else 72)
    dense = offset[:, cols].clone()
    for i in range(bits):
        dense += torch.where(planes[i], alpha[:, cols, i], -alpha[:, cols, i])
    scale = layer.grouped_weight.abs().max()
    assert (dense - fake).abs().max() <= 1e-6 * scale
    # Stored as fp16 like every BCQ model: the packed weight differs only by that rounding.
    packed = layer.export()
    assert (packed.dequantize() - fake).abs().max() <= 2e-3 * scale


def test_uniquanf_costs_exactly_plain_bcq(tiny_llama, tmp_path):
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for method in ("uniquanf", "bcq-alternating"):
        model = tiny_llama()
        config = unibcq.QuantConfig(method, bits=3, group_size=32, epochs=1, iters=2)
        unibcq.quantize(model, config, calib, show_progress=False)
        unibcq.save(model, tmp_path / method, config, source_model="tiny")
        info = unibcq.checkpoint_info(tmp_path / method)
        sizes[method] = (info.bits_per_weight, info.quantized_bytes)
    assert sizes["uniquanf"] == sizes["bcq-alternating"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unified_init_never_worse_than_min_max_uq(bits):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(bits))
    init = unified_init(x, bits, clipping_grid(1), iters=5)
    c = (2**bits - 1) / 2
    u = x / init.scale[:, None] + init.zero[:, None] - c
    levels = level_values(init.alpha)
    k = global_remap(u, init.alpha)
    w_hat = init.scale[:, None] * (levels.gather(1, k) + c - init.zero[:, None])
    uq = quantize_rtn(x, bits, -1, integer_zero=False).dequantize()
    err = (x - w_hat).abs().pow(2.4).mean(1)
    err_uq = (x - uq).abs().pow(2.4).mean(1)
    assert (err <= err_uq * (1 + 1e-3) + 1e-12).all()


def test_clipping_grid():
    assert clipping_grid(1) == [1.0]
    assert clipping_grid(5) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_local_remap_uses_value_neighbours():
    # alpha = (1.0, 0.9) is not super-increasing: levels by index k are
    # k0: -1.9, k1: +0.1 (b1=+1, b2=-1), k2: -0.1, k3: +1.9. Index neighbours of k1 are k0, k2;
    # its value neighbours are -0.1 (k2) and +1.9 (k3).
    alpha = torch.tensor([[1.0, 0.9]])
    previous = torch.tensor([[1]])
    u = torch.tensor([[1.5]])
    assert local_remap(u, alpha, previous).item() == 3
    assert global_remap(u, alpha).item() == 3
    # Far away values move one value-step per re-mapping, never jump.
    assert local_remap(torch.tensor([[-5.0]]), alpha, previous).item() == 2


def test_local_remap_steps_past_levels_of_equal_value():
    """Equal alphas (unified init gives them to a group of two distinct weights) make levels of
    equal value: the step is to the next other value, not a copy, else u = 3.4 stayed at 1.17."""
    alpha = torch.full((1, 3), 7 / 6)  # levels -3.5, -7/6 (x3), +7/6 (x3), +3.5
    levels = global_remap(torch.tensor([[7 / 6]]), alpha)
    current, u = levels, torch.tensor([[3.4]])
    for _ in range(2):
        current = local_remap(u, alpha, current)
    assert torch.equal(current, global_remap(u, alpha))  # reached +3.5 in one step, and stays


def test_gradient_filtering_and_alpha_gradient():
    layer = UniQuanFLinear(_linear(), 2, 32, init_iters=2)
    layer.eval()
    with torch.no_grad():
        layer.d2[0, 0, :4] = -3.0  # shrink the divisor: these weights land far outside the grid
    w = layer.grouped_weight_hat()
    w.sum().backward()
    u = layer.transformed().detach()
    level = (layer.alpha.unsqueeze(2) * layer.patterns[layer.index]).sum(-1).detach()
    clipped = (u - level).abs() > layer.alpha.detach().abs().min(-1, keepdim=True).values
    assert clipped[0, 0, :4].all()
    assert (layer.d2.grad[clipped] == 0).all()
    assert (layer.d2.grad[~clipped] != 0).any()
    # d(sum w_hat)/d alpha_i = s * sum over unclipped weights of b_i(k*).
    b = layer.patterns[layer.index]
    expected = (torch.exp(layer.d1).detach() * (b * (~clipped).unsqueeze(-1)).sum(2))
    torch.testing.assert_close(layer.alpha.grad, expected)


def test_periodic_remapping(monkeypatch):
    layer = UniQuanFLinear(_linear(), 2, 32, init_iters=1, remap_every=3)
    calls = []
    original = layer.remap
    monkeypatch.setattr(layer, "remap", lambda local=True: (calls.append(local), original(local))[1])
    layer.train()
    for _ in range(7):
        layer.weight_hat()
    assert len(calls) == 3 and all(calls)  # steps 0, 3, 6; local by default
    direct = UniQuanFLinear(_linear(), 2, 32, init_iters=1, mapping="direct")
    direct_calls = []
    original_direct = direct.remap
    monkeypatch.setattr(direct, "remap", lambda local=True: (direct_calls.append(local),
                                                             original_direct(local))[1])
    direct.train()
    for _ in range(4):
        direct.weight_hat()
    assert direct_calls == [False] * 4


@pytest.mark.parametrize("make", [lambda l: UniQuanFLinear(l, 3, 32, init_iters=2), lambda l: FlexRoundLinear(l, 3, 32)],
                         ids=["uniquanf", "flexround"])
def test_export_refuses_scales_that_overflow_fp16(make):
    layer = make(_linear())
    log_scale = layer.d1 if isinstance(layer, UniQuanFLinear) else layer.log_s1
    with torch.no_grad():
        log_scale.add_(15.0)  # scales times e^15 ~ 3e6: past fp16's 65504, as a diverged training would
    with pytest.raises(unibcq.UnibcqError, match="too wide for the fp16 scales"):
        layer.export()


def test_flexround_starts_at_rtn_with_clipping_search_and_exports_exactly():
    linear = _linear()
    layer = FlexRoundLinear(linear, 3, 32)
    rtn = quantize_rtn(linear.weight.detach(), 3, 32, clip_search=True).dequantize()
    with torch.no_grad():
        start = layer.weight_hat()
    assert (start - rtn).abs().max() <= 2e-3 * linear.weight.abs().max()
    _train_steps(layer)
    with torch.no_grad():
        fake = layer.weight_hat()
    assert (layer.export().dequantize() - fake).abs().max() <= 2e-3 * linear.weight.abs().max()


@pytest.mark.parametrize("method", ["uniquanf", "flexround"])
def test_reconstruction_engine(tiny_llama, tmp_path, input_ids, method):
    from unibcq.methods.reconstruction import reconstruct_blocks

    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    base = tiny_llama()
    with torch.no_grad():
        ref = base(input_ids).logits
    config = unibcq.QuantConfig(method, bits=2, group_size=32, epochs=4, iters=3, u_lr=1e-2, b_lr=1e-3)
    model = copy.deepcopy(base)
    layers, blocks = reconstruct_blocks(model, config, calib, show_progress=False)
    assert len(layers) == 14 and len(blocks) == 2
    assert all(b.final_loss < b.initial_loss for b in blocks)
    assert not any(isinstance(m, (UniQuanFLinear, FlexRoundLinear)) for m in model.modules())
    with torch.no_grad():
        out = model(input_ids).logits
    # The same method without training (learning rates 0: the initialisation alone).
    untrained = copy.deepcopy(base)
    reconstruct_blocks(untrained, dataclasses.replace(config, u_lr=0.0, b_lr=0.0), calib, show_progress=False)
    with torch.no_grad():
        assert (out - ref).pow(2).mean() < (untrained(input_ids).logits - ref).pow(2).mean()
    unibcq.save(model, tmp_path / "ck", config, source_model="tiny")
    with torch.no_grad():
        assert torch.equal(unibcq.load(tmp_path / "ck")(input_ids).logits, out)



@pytest.mark.parametrize("method", ["uniquanf", "flexround"])
def test_half_precision_model_reconstructs_in_float32(tiny_llama, input_ids, method):
    """A bfloat16 model (the Python API takes models as loaded) trains each block in float32 and
    keeps its own dtype: its packed layers come out as from the float32 copy of the same weights,
    the only difference being the bfloat16 activations that enter the first block."""
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    config = unibcq.QuantConfig(method, bits=3, group_size=32, epochs=2, iters=2)
    half = tiny_llama(dtype=torch.bfloat16)
    full = copy.deepcopy(half).float()
    unibcq.quantize(half, config, calib, show_progress=False)
    unibcq.quantize(full, config, calib, show_progress=False)
    assert half.model.norm.weight.dtype == half.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert half(input_ids).logits.dtype == torch.bfloat16
        for (name, a), b in zip(_packed_weights(half).items(), _packed_weights(full).values()):
            assert (a - b).abs().mean() <= 0.01 * b.abs().mean(), name


def _packed_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight_tensor().dequantize() for name, module in model.named_modules()
            if isinstance(module, PackedLinear)}

def test_same_seed_same_checkpoint(tiny_llama):
    calib = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    states = []
    for _ in range(2):
        model = tiny_llama()
        unibcq.quantize(model, unibcq.QuantConfig("uniquanf", bits=2, group_size=32, epochs=2, iters=2, seed=7),
                        calib, show_progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_flexround_ignores_the_settings_it_does_not_record(tiny_llama):
    """FlexRound's checkpoints leave UniQuanF's own settings out of their record: they must not
    shape its result."""
    calib = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    config = unibcq.QuantConfig("flexround", bits=2, group_size=32, epochs=2, seed=7)
    recorded = config.recorded()
    states = []
    for changes in ({}, {"iters": 3, "b_lr": 0.1, "remap_every": 1, "grid_points": 3, "p_norm": 3.0,
                         "mapping": "global", "shift": True, "offset": False, "symmetric": True, "damp": 0.5}):
        assert not set(changes) & recorded.keys()
        model = tiny_llama()
        unibcq.quantize(model, dataclasses.replace(config, **changes), calib, show_progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("changes,needle", [
    ({"epochs": 0}, "epochs"), ({"input_prob": 1.5}, "input_prob"), ({"mapping": "nearest"}, "mapping"),
    ({"u_lr": -1.0}, "u_lr"), ({"batch_size": 0}, "batch_size"),
])
def test_reconstruction_config_validation(changes, needle):
    config = unibcq.QuantConfig("uniquanf", bits=3)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(unibcq.UnibcqError, match=needle):
        config.validate()


class _InputRecorder(nn.Module):
    """A "block" around one fake-quant layer that keeps the inputs it was trained on."""

    def __init__(self, fake: nn.Module):
        super().__init__()
        self.fake, self.seen = fake, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fake(x)


@pytest.mark.parametrize("input_prob,expected", [(1.0, 0.0), (0.0, 1.0), (0.25, 0.75)])
def test_input_prob_is_the_chance_of_the_quantized_input(input_prob, expected):
    from unibcq.methods.reconstruction import _train_block, make_fake_quant

    config = unibcq.QuantConfig("flexround", bits=3, group_size=32, epochs=2, input_prob=input_prob)
    block = _InputRecorder(make_fake_quant(_linear(8, 64), config))
    q_in, fp_in = [torch.zeros(1, 16, 64)] * 4, [torch.ones(1, 16, 64)] * 4  # fp elements are 1, quantized 0
    targets = [torch.zeros(1, 16, 8)] * 4
    _train_block(block, {"fake": block.fake}, q_in, fp_in, targets, {}, config, torch.device("cpu"),
                 torch.Generator().manual_seed(0), lambda loss: None)
    assert len(block.seen) == 8
    assert float(torch.cat(block.seen).mean()) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("calibration,needle", [
    (None, "needs calibration data"),
    (torch.randint(0, 256, (16,)), r"shape \(windows, tokens\), got \(16,\)"),
    (torch.rand(2, 16), "torch.float32"),
    (torch.randint(0, 256, (2, 16), dtype=torch.uint8), "torch.uint8"),
    ([[1, 2, 3]], "got list"),
    (torch.randint(0, 256, (2, 16)) + 256, r"\[0, 256\)"),
])
def test_calibrated_method_needs_token_ids(tiny_llama, calibration, needle):
    """Calibration that is not (windows, tokens) ids of this vocabulary is named before any work,
    not met as a size mismatch in attention or an index error in the embedding."""
    model = tiny_llama()
    with pytest.raises(unibcq.UnibcqError, match=needle):
        unibcq.quantize(model, unibcq.QuantConfig("gptq", bits=3), calibration, show_progress=False)
    assert not any(isinstance(m, unibcq.BCQLinear) for m in model.modules())


def test_gptq_on_the_sequential_pipeline_beats_rtn(tiny_llama, input_ids):
    calib = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(3))
    base = tiny_llama()
    with torch.no_grad():
        ref = base(input_ids).logits
    errors = {}
    for method in ("rtn", "gptq", "gptq-bcq"):
        model = copy.deepcopy(base)
        unibcq.quantize(model, unibcq.QuantConfig(method, bits=3, group_size=32), calib, show_progress=False)
        with torch.no_grad():
            errors[method] = float((model(input_ids).logits - ref).pow(2).mean())
    assert errors["gptq"] < errors["rtn"] and errors["gptq-bcq"] < errors["rtn"]


def test_bcq_alternating_reference_for_uniquanf_init():
    """UniQuanF's init is BCQ in the UQ domain: its weight error is comparable to bcq-alternating's."""
    linear = _linear(48, 64, seed=4)
    layer = UniQuanFLinear(linear, 3, 32, init_iters=15)
    with torch.no_grad():
        err = (layer.weight_hat() - linear.weight).norm() / linear.weight.norm()
    alt = quantize_bcq(linear.weight.detach(), 3, 32, offset=False)
    err_alt = (alt.dequantize() - linear.weight).norm() / linear.weight.norm()
    assert err <= 1.3 * err_alt


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_local_mapping_equals_direct_for_small_moves(bits):
    """When levels and values move by less than half the smallest level gap, re-mapping to the
    previous level or a value neighbour finds the same level as a search over all levels."""
    gen = torch.Generator().manual_seed(bits)
    alpha = torch.rand(50, bits, generator=gen) + 0.2
    u = (torch.rand(50, 40, generator=gen) - 0.5) * 2 * alpha.sum(1, keepdim=True)
    previous = global_remap(u, alpha)
    levels = torch.sort(level_values(alpha), dim=1).values
    gap = (levels[:, 1:] - levels[:, :-1]).min(1).values
    scale = (gap / 4 / bits)[:, None]
    new_alpha = alpha + scale * (torch.rand(alpha.shape, generator=gen) - 0.5)
    new_u = u + scale * (torch.rand(u.shape, generator=gen) - 0.5)
    assert torch.equal(local_remap(new_u, new_alpha, previous), global_remap(new_u, new_alpha))
