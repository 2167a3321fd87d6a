"""`import unibcq` registers the checkpoint format with transformers' AutoModel loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import unibcq
from unibcq.nn.qlinear import PackedLinear


@pytest.mark.parametrize("tiny_model", ["llama", "qwen2"], indirect=True)
@pytest.mark.parametrize("config", [
    unibcq.QuantConfig("rtn", bits=3, group_size=32),
    unibcq.QuantConfig("bcq-alternating", bits=2, group_size=-1, iters=3),
    unibcq.QuantConfig("dyngroup", bits=1, group_size=-1, max_groups=4, window=8),
])
def test_from_pretrained_equals_unibcq_load(tiny_model, tmp_path, input_ids, config):
    model = tiny_model()
    unibcq.quantize(model, config, show_progress=False)
    unibcq.save(model, tmp_path / "ck", config, source_model="tiny")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert sum(isinstance(m, PackedLinear) for m in hf.modules()) == 14
    with torch.no_grad():
        expected = unibcq.load(tmp_path / "ck")(input_ids).logits
        assert torch.equal(hf(input_ids).logits, expected)
    # save_pretrained writes a checkpoint both loaders read back identically.
    hf.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(unibcq.load(tmp_path / "again")(input_ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(input_ids).logits, expected)


def test_from_pretrained_rejects_a_layout_for_a_missing_layer(tiny_llama, tmp_path):
    import json

    model = tiny_llama()
    config = unibcq.QuantConfig("rtn", bits=3, group_size=32)
    unibcq.quantize(model, config, show_progress=False)
    unibcq.save(model, tmp_path / "ck", config, source_model="tiny")
    cfg_file = tmp_path / "ck" / "config.json"
    data = json.loads(cfg_file.read_text())
    layers = data["quantization_config"]["layers"]
    layers["model.layers.7.mlp.up_proj"] = layers.pop("model.layers.1.mlp.up_proj")
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(unibcq.CheckpointError, match="layers.7"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
