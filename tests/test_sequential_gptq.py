"""The block-by-block GPTQ pipeline: which layers share a Hessian pass, and true-sequential order."""

from __future__ import annotations

import copy

import pytest
import torch

import unibcq
from unibcq.methods.registry import HESSIAN_METHODS
from unibcq.methods.sequential import (
    accumulate_input_hessians,
    capture_block_inputs,
    input_groups,
)
from unibcq.models.architectures import block_linears, decoder_blocks, set_module
from unibcq.nn.qlinear import packed_module

CALIB = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("tiny_model", ["llama", "qwen2"], indirect=True)
def test_input_groups_follow_the_tensors_the_layers_read(tiny_model):
    model = tiny_model()
    layers = block_linears(model, 1)
    groups = input_groups(decoder_blocks(model)[1], layers, capture_block_inputs(model, CALIB), torch.device("cpu"))
    short = [[name.rsplit(".", 1)[1] for name in group] for group in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def _packed(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.get_submodule(name).state_dict().items()}


def test_true_sequential_calibrates_each_group_on_the_quantized_groups_before_it(tiny_llama):
    base = tiny_llama()
    runs = {}
    for true_sequential in (False, True):
        model = copy.deepcopy(base)
        config = unibcq.QuantConfig("gptq", bits=3, group_size=32, true_sequential=true_sequential)
        unibcq.quantize(model, config, CALIB, show_progress=False)
        runs[true_sequential] = model

    # The reference: block 0 by hand, q/k/v from the unquantized pass, then o_proj's Hessian
    # collected with q/k/v already replaced by their packed modules.
    manual = copy.deepcopy(base)
    block, layers = decoder_blocks(manual)[0], block_linears(manual, 0)
    inputs, cpu = capture_block_inputs(manual, CALIB), torch.device("cpu")
    config = unibcq.QuantConfig("gptq", bits=3, group_size=32)
    qkv = [name for name in layers if name.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")]
    hessians = accumulate_input_hessians(block, {name: layers[name] for name in qkv}, inputs, cpu)
    for name in qkv:
        set_module(manual, name, packed_module(HESSIAN_METHODS["gptq"](layers[name].weight.detach(),
                                                                        hessians[name], config), None))
    o_name = next(name for name in layers if name.endswith("o_proj"))
    h_o = accumulate_input_hessians(block, {o_name: layers[o_name]}, inputs, cpu)[o_name]
    expected_o = packed_module(HESSIAN_METHODS["gptq"](layers[o_name].weight.detach(), h_o, config), None).state_dict()

    for name in qkv:  # the first group reads the same unquantized input either way
        assert all(torch.equal(v, _packed(runs[False], name)[k]) for k, v in _packed(runs[True], name).items())
    assert all(torch.equal(v, _packed(runs[True], o_name)[k]) for k, v in expected_o.items())
    assert not all(torch.equal(v, _packed(runs[False], o_name)[k]) for k, v in expected_o.items())


@pytest.mark.parametrize("changes", [{"method": "rtn", "act_order": True},
                                     {"method": "uniquanf", "true_sequential": True}])
def test_gptq_only_options_are_refused_elsewhere(changes):
    with pytest.raises(unibcq.UnibcqError, match="apply to gptq and gptq-bcq"):
        unibcq.QuantConfig(**changes).validate()
