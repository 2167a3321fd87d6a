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
    # save_pretrained writes a checkpoint both loaders read back identically, whichever way the
    # packed model came about: from_pretrained, unibcq.load, or unibcq.quantize just now.
    for source, name in ((hf, "again"), (unibcq.load(tmp_path / "ck"), "from-load"), (model, "fresh")):
        source.save_pretrained(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(unibcq.load(tmp_path / name)(input_ids).logits, expected), name
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / name)(input_ids).logits, expected), name


def test_from_pretrained_checks_what_unibcq_load_checks(tiny_llama, tmp_path):
    """A flipped byte (caught by the manifest) and a NaN scale (caught after loading) are refused
    by both loaders, not turned into a model that computes garbage."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    config = unibcq.QuantConfig("rtn", bits=3, group_size=32)
    unibcq.quantize(model, config, show_progress=False)
    path = unibcq.save(model, tmp_path / "ck", config, source_model="tiny")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1
    weights.write_bytes(bytes(data))
    for loader in (unibcq.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(unibcq.CheckpointError, match="checksum"):
            loader(path)
    path = unibcq.save(model, tmp_path / "nan", config, source_model="tiny")
    tensors = load_file(path / "model.safetensors")
    key = next(k for k in tensors if k.endswith("bcq_alpha"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "manifest.json").unlink()  # a save_pretrained copy has no manifest either
    config_file = path / "config.json"
    config_file.write_text(config_file.read_text().replace('"manifest": "manifest.json",', ""))
    for loader in (unibcq.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(unibcq.CheckpointError, match="NaN"):
            loader(path)


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


def test_from_pretrained_of_a_subfolder_and_with_offloaded_weights(tiny_llama, tmp_path, input_ids):
    """The manifest checked is the loaded folder's (a subfolder beside a full-precision root),
    and weights a device map leaves on disk are not read to be checked."""
    model = tiny_llama()
    model.save_pretrained(tmp_path)  # the unquantized model at the root
    config = unibcq.QuantConfig("rtn", bits=3, group_size=32)
    unibcq.quantize(model, config, show_progress=False)
    path = unibcq.save(model, tmp_path / "w3", config, source_model="tiny")
    with torch.no_grad():
        expected = model(input_ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path, subfolder="w3")(input_ids).logits, expected)
        offloaded = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": "100KB"},
                                                         offload_folder=tmp_path / "offload")
        assert torch.allclose(offloaded(input_ids).logits, expected)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(unibcq.CheckpointError, match="checksum"):
        AutoModelForCausalLM.from_pretrained(tmp_path, subfolder="w3")


def test_a_model_without_a_source_records_none(tiny_llama, tmp_path, monkeypatch):
    """A model built from a config has no source: the working directory is not recorded as one."""
    import json

    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    unibcq.quantize(model, unibcq.QuantConfig("rtn", bits=3, group_size=32), show_progress=False)
    model.save_pretrained(tmp_path / "copy")
    stored = json.loads((tmp_path / "copy" / "config.json").read_text())["quantization_config"]
    assert stored["source_model"] == "" and stored["source_files"] is None


def test_stored_keys_never_replace_the_config_class_attributes():
    from unibcq.integrations.transformers import UnibcqHfConfig

    config = UnibcqHfConfig(layers={}, to_dict=1, __class__=2, _private=3, bits=3)
    assert config.bits == 3 and callable(config.to_dict) and not hasattr(config, "_private")
