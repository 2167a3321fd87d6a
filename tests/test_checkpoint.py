"""Quantize tiny models end to end, save, load, inspect, and reject broken checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import unibcq
import unibcq.checkpoint as checkpoint_module
from unibcq.checkpoint import WEIGHTS_FILE, quantized_layers
from unibcq.errors import CheckpointError, UnibcqError, UnsupportedModelError
from unibcq.nn import BCQLinear

METHODS = ("rtn", "bcq-greedy", "bcq-refined", "bcq-alternating")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(model, config):
    return unibcq.quantize(model, config, show_progress=False)


def fast_config(method="rtn", bits=3, group_size=32, **kwargs):
    if method == "bcq-alternating":
        kwargs.setdefault("iters", 4)
    return unibcq.QuantConfig(method, bits=bits, group_size=group_size, **kwargs)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tiny_model", ["llama", "qwen2"], indirect=True)
def test_save_load_bit_identical(tiny_model, method, ckpt_dir, logits_of, hidden_entries):
    model = tiny_model()
    reference = logits_of(model)
    config = fast_config(method)
    records = quantize(model, config)
    assert len(records) == 2 * len(LINEARS)
    layers = quantized_layers(model)
    assert len(layers) == 2 * len(LINEARS)
    assert all(0 < r.rel_error < 1 for r in records)
    expected = logits_of(model)
    assert not torch.equal(expected, reference)  # quantization changed something ...
    assert torch.isfinite(expected).all()

    out = ckpt_dir()
    assert unibcq.save(model, out, config, source_model="tiny", tokenizer=None) == out
    assert (out / WEIGHTS_FILE).is_file() and (out / "config.json").is_file()
    assert hidden_entries(out.parent) == []

    loaded = unibcq.load(out)
    assert not loaded.training
    assert type(loaded) is type(model)
    loaded_layers = quantized_layers(loaded)
    assert set(loaded_layers) == set(layers)
    for name, layer in layers.items():
        other = loaded_layers[name]
        assert (other.bits, other.group_size, other.in_features, other.out_features) == (
            layer.bits, layer.group_size, layer.in_features, layer.out_features,
        )
        for key, tensor in layer.weight_tensor().tensors().items():
            assert torch.equal(getattr(other, key), tensor), (name, key)
        if layer.bias is not None:
            assert torch.equal(other.bias, layer.bias)
    assert torch.equal(logits_of(loaded), expected)

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "unibcq"
    assert qcfg["method"] == method and qcfg["bits"] == 3 and qcfg["group_size"] == 32
    assert qcfg["source_model"] == "tiny"


def test_saving_twice_writes_identical_weight_files(tiny_llama, ckpt_dir):
    """Users compare checkpoints by hash; safetensors orders a multi-key metadata at random."""
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    dirs = [unibcq.save(model, ckpt_dir(f"c{i}"), config, source_model="tiny") for i in range(8)]
    files = [(d / WEIGHTS_FILE).read_bytes() for d in dirs]
    assert all(f == files[0] for f in files)
    (dirs[0] / "config.json").unlink()
    assert checkpoint_module.has_unibcq_weights(dirs[0])  # recognised by its packed tensors


def test_a_checkpoint_is_known_by_its_content_not_its_files_times(tiny_llama, ckpt_dir, tmp_path):
    """Saved progress (eval journals) follows a checkpoint quantized again, bit for bit the same,
    on a fresh clone; the run's own entries (source times, duration) do not count, weights do."""
    from unibcq.models.fingerprint import files_fingerprint

    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    source = tmp_path / "source.gguf"
    source.write_bytes(b"source weights")
    first = unibcq.save(model, ckpt_dir("a"), config, source_model=str(source), extra={"quantize_seconds": 1.0})
    identity = files_fingerprint(first)
    assert identity is not None and all(len(entry[2]) == 64 for entry in identity)  # sha256, not mtimes
    os.utime(source, ns=(1, 1))
    model.config._name_or_path = "/another/cache/folder"  # where the source was loaded from on another machine
    again = unibcq.save(model, ckpt_dir("b"), config, source_model=str(source), extra={"quantize_seconds": 2.0})
    assert files_fingerprint(again) == identity
    with torch.no_grad():
        next(iter(quantized_layers(model).values())).bcq_alpha.mul_(1.5)
    changed = unibcq.save(model, ckpt_dir("c"), config, source_model=str(source), extra={"quantize_seconds": 1.0})
    assert files_fingerprint(changed) != identity
    model.generation_config.max_new_tokens = 7  # every file the manifest lists counts, not only the weights
    other_generation = unibcq.save(model, ckpt_dir("d"), config, source_model=str(source))
    assert files_fingerprint(other_generation) not in (identity, files_fingerprint(changed))
    (again / "manifest.json").unlink()  # no manifest: known by its files' times again
    assert files_fingerprint(again)[0][2] == (again / "config.json").stat().st_mtime_ns



def test_a_loaded_checkpoint_stops_and_samples_as_its_source(tiny_llama, ckpt_dir):
    """The source's generation config (several EOS ids, top-k) is saved, and loading uses it:
    `from_config` alone would rebuild one from config.json and generate otherwise."""
    model = tiny_llama()
    model.generation_config.eos_token_id = [2, 6]
    model.generation_config.do_sample, model.generation_config.top_k = True, 1
    config = fast_config("rtn", bits=3)
    quantize(model, config)
    loaded = unibcq.load(unibcq.save(model, ckpt_dir("g"), config, source_model="tiny"))
    assert loaded.generation_config.eos_token_id == [2, 6] and loaded.generation_config.top_k == 1
    assert loaded.generation_config.do_sample
    (ckpt_dir("g") / "generation_config.json").write_text("{not json")
    _expect_checkpoint_error(ckpt_dir("g"), "generation_config.json")  # the manifest sees the change

def test_save_refuses_a_config_the_layers_were_not_quantized_with(tiny_llama, ckpt_dir):
    model = tiny_llama()
    config = fast_config("rtn", bits=4, overrides={"*.mlp.down_proj": {"bits": 2}})
    quantize(model, config)
    for wrong, needle in ((fast_config("rtn", bits=3), "holds 4-bit BCQ in groups of 32, but the config describes "
                                                       "rtn at 3 bits"),
                          (fast_config("rtn", bits=4), "down_proj holds 2-bit"),
                          (fast_config("rtn", bits=4, group_size=64), "in groups of 64"),
                          (unibcq.QuantConfig("dyngroup", bits=1, group_size=-1), "describes dyngroup")):
        with pytest.raises(UnibcqError, match=needle):
            unibcq.save(model, ckpt_dir("wrong"), wrong, source_model="tiny")
        assert not ckpt_dir("wrong").exists()
    unibcq.save(model, ckpt_dir("right"), config, source_model="tiny")
    for wrong, needle in ((fast_config("bcq-greedy", bits=4, overrides={"*.mlp.down_proj": {"bits": 2}}),
                           "quantized with rtn, but the config describes bcq-greedy"),
                          (unibcq.QuantConfig("nope", bits=4, group_size=32), "unknown method 'nope'")):
        with pytest.raises(UnibcqError, match=needle):
            unibcq.save(model, ckpt_dir("other-method"), wrong, source_model="tiny")
    assert not ckpt_dir("other-method").exists()


def test_a_home_relative_path_is_the_one_checked_and_written(tiny_llama, tmp_path, monkeypatch):
    """`~/x` was written to ./~/x while --overwrite checked $HOME/x, so a folder of notes at
    ./~/x could be replaced; load and info did not expand it either."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    (work / "~" / "notes").mkdir(parents=True)
    (work / "~" / "notes" / "mine.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    assert unibcq.save(model, "~/notes", config, source_model="tiny", overwrite=True) == home / "notes"
    assert (home / "notes" / "config.json").is_file()
    assert (work / "~" / "notes" / "mine.txt").read_text() == "keep me"
    assert unibcq.checkpoint_info("~/notes").bits == 3
    assert type(unibcq.load("~/notes").model.layers[0].self_attn.q_proj) is BCQLinear


def test_save_and_load_refuse_a_dtype_that_is_not_a_float_type(tiny_llama, ckpt_dir):
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    for dtype in (torch.int8, 32):
        with pytest.raises(UnibcqError, match="dtype must be a floating-point torch dtype"):
            unibcq.save(model, ckpt_dir("int"), config, source_model="tiny", dtype=dtype)
    path = unibcq.save(model, ckpt_dir("half"), config, source_model="tiny", dtype="bfloat16")
    assert unibcq.load(path).get_input_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(UnibcqError, match="dtype must be a floating-point torch dtype"):
        unibcq.load(path, dtype=torch.int8)


def test_a_calibrated_quantization_names_a_device_it_cannot_use(tiny_llama):
    model = tiny_llama()
    calibration = torch.randint(0, model.config.vocab_size, (2, 16))
    for device in ("tpu", *(() if torch.cuda.is_available() else ("cuda",))):
        with pytest.raises(UnibcqError, match=rf"--device.*\b{device}\b"):
            unibcq.quantize(model, fast_config("gptq"), calibration, show_progress=False, device=device)


def test_load_takes_a_dtype_name_and_names_a_missing_tokenizer(tiny_llama, ckpt_dir):
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    path = unibcq.save(model, ckpt_dir("a"), config, source_model="tiny")
    assert unibcq.load(path, dtype="bfloat16").get_input_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(UnibcqError, match="or one of float32, bfloat16, float16, got 'int8'"):
        unibcq.load(path, dtype="int8")
    with pytest.raises(UnibcqError, match="holds no tokenizer"):
        unibcq.load_tokenizer(str(path))


@pytest.mark.parametrize("method", ["rtn", "dyngroup"])
def test_casting_a_packed_model_keeps_its_scales_in_storage_precision(tiny_llama, ckpt_dir, input_ids, method):
    """`model.to(torch.bfloat16)` computes in bfloat16 but leaves the fp16 scales as stored, so the
    model saves to a checkpoint that loads, and casting back to float32 restores it exactly."""
    model = tiny_llama()
    config = fast_config(method, bits=1, group_size=-1, max_groups=4, window=8) if method == "dyngroup" \
        else fast_config(method)
    quantize(model, config)
    scales = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.float16}
    assert scales
    model.to(torch.bfloat16)
    assert all(b.dtype == torch.float16 and torch.equal(b, scales[n]) for n, b in model.named_buffers() if n in scales)
    with torch.no_grad():
        assert model(input_ids).logits.dtype == torch.bfloat16
    path = unibcq.save(model, ckpt_dir("bf16"), config, source_model="tiny")
    assert unibcq.load(path).get_input_embeddings().weight.dtype == torch.bfloat16
    model.float()
    assert all(torch.equal(b, scales[n]) for n, b in model.named_buffers() if n in scales)


def test_save_with_overwrite_replaces_only_an_earlier_checkpoint(tiny_llama, ckpt_dir, tmp_path, monkeypatch):
    """The Python API keeps what the CLI keeps: overwrite=True never deletes a user's folder,
    the working directory or the source model, nor files added to a checkpoint."""
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("mine")
    source = tmp_path / "source-model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    for out, source_model, needle in ((notes, "src", "not a unibcq checkpoint"), (work, "src", "working directory"),
                                      (tmp_path, "src", "working directory"), (source, str(source), "holds the model")):
        with pytest.raises(UnibcqError, match=needle):
            unibcq.save(model, out, config, source_model=source_model, overwrite=True)
    assert (notes / "mine.txt").read_text() == "mine" and (work / "sub").is_dir() and (source / "config.json").is_file()
    first = unibcq.save(model, ckpt_dir("a"), config, source_model="src")
    assert unibcq.save(model, first, config, source_model="src", overwrite=True) == first
    (first / "eval.json").write_text("{}")
    with pytest.raises(UnibcqError, match="did not write"):
        unibcq.save(model, first, config, source_model="src", overwrite=True)
    assert (first / "eval.json").is_file()


def test_a_checkpoint_records_only_its_methods_settings_and_keeps_its_identity(tiny_llama, ckpt_dir):
    """An earlier checkpoint listed every setting, read or not, and keeps the identity it had (its
    journals stay valid); one saved now lists only its method's and is the same checkpoint as an
    earlier one whose unread settings were at their defaults."""
    import hashlib

    from unibcq.models.fingerprint import QUANT_RUN_ENTRIES, RUN_ENTRIES, files_fingerprint

    def as_written(config: dict) -> tuple[str, int, str]:  # how every config was hashed before
        stable = {k: v for k, v in config.items() if k not in RUN_ENTRIES}
        stable["quantization_config"] = {k: v for k, v in config["quantization_config"].items()
                                         if k not in QUANT_RUN_ENTRIES}
        text = json.dumps(stable, sort_keys=True).encode()
        return ("config.json", len(text), hashlib.sha256(text).hexdigest())

    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    path = unibcq.save(model, ckpt_dir("a"), config, source_model="src")
    stored = json.loads((path / "config.json").read_text())
    qcfg = stored["quantization_config"]
    assert {"symmetric", "clip_search", "integer_zero"} <= qcfg.keys()
    assert not {"epochs", "u_lr", "iters", "offset", "lam", "damp", "calib", "seed"} & qcfg.keys()
    identity = files_fingerprint(path)
    for earlier in ({}, {"epochs": 9}, {"seed": 3}):  # RTN never read these
        stored["quantization_config"] = {**json.loads(json.dumps(config.to_dict())), **qcfg, **earlier}
        (path / "config.json").write_text(json.dumps(stored))
        assert files_fingerprint(path)[-1] == as_written(stored)
        assert (files_fingerprint(path) == identity) == (not earlier)
    stored["quantization_config"] = qcfg | {"clip_search": not qcfg["clip_search"]}  # RTN reads this one
    (path / "config.json").write_text(json.dumps(stored))
    assert files_fingerprint(path) != identity


def test_a_relative_source_path_is_recorded_absolutely(tiny_llama, ckpt_dir, tmp_path, monkeypatch):
    """A checkpoint's tokenizer and default KL reference come from its source: a path relative
    to where it was saved would point elsewhere from any other working directory."""
    from unibcq.checkpoint import QUANT_KEY, read_config

    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    out = unibcq.save(model, ckpt_dir("rel"), config, source_model="src")
    assert read_config(out)[QUANT_KEY]["source_model"] == str((tmp_path / "src").resolve())
    hub = unibcq.save(model, ckpt_dir("hub"), config, source_model="org/not-a-local-path")
    assert read_config(hub)[QUANT_KEY]["source_model"] == "org/not-a-local-path"


def test_checkpoints_and_json_get_the_modes_of_plain_files(tiny_llama, ckpt_dir, tmp_path):
    """Temporary files are private (0600); a shared checkpoint must not stay so after the rename."""
    from unibcq.atomic import write_json_atomic

    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    old = os.umask(0o022)
    try:
        out = unibcq.save(model, ckpt_dir(), config, source_model="tiny")
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_qwen2_biases_and_tied_embeddings_survive(tiny_qwen2, ckpt_dir, logits_of):
    model = tiny_qwen2()
    assert model.config.tie_word_embeddings
    quantize(model, fast_config("rtn"))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, BCQLinear) and q.bias is not None
    unibcq.save(model, ckpt_dir(), fast_config("rtn"), source_model="tiny")
    loaded = unibcq.load(ckpt_dir())
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.bias, q.bias)
    assert torch.equal(logits_of(loaded), logits_of(model))


@pytest.mark.parametrize("method", ["bcq-greedy", "bcq-alternating"])
def test_offset_free_bcq_round_trip(tiny_llama, method, ckpt_dir, logits_of):
    model = tiny_llama()
    config = fast_config(method, bits=2, group_size=-1, offset=False)
    quantize(model, config)
    assert all(m.bcq_offset is None for m in quantized_layers(model).values())
    unibcq.save(model, ckpt_dir(), config, source_model="tiny")
    loaded = unibcq.load(ckpt_dir())
    assert all(m.bcq_offset is None for m in quantized_layers(loaded).values())
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_bfloat16_llama_round_trip(tiny_llama, ckpt_dir, logits_of):
    model = tiny_llama(dtype=torch.bfloat16)
    config = fast_config("rtn")
    quantize(model, config)
    expected = logits_of(model)
    assert expected.dtype == torch.bfloat16
    unibcq.save(model, ckpt_dir(), config, source_model="tiny")
    loaded = unibcq.load(ckpt_dir())
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits_of(loaded), expected)


def test_bfloat16_qwen2_round_trip(tiny_qwen2, ckpt_dir, logits_of):
    model = tiny_qwen2(dtype=torch.bfloat16)
    config = fast_config("rtn")
    quantize(model, config)
    expected = logits_of(model)
    unibcq.save(model, ckpt_dir(), config, source_model="tiny")
    loaded = unibcq.load(ckpt_dir())
    assert torch.equal(logits_of(loaded), expected)


def _stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in load_file(path / WEIGHTS_FILE).items()}


@pytest.mark.parametrize("tiny_model", ["llama", "qwen2"], indirect=True)
def test_bfloat16_source_quantized_in_float32_is_stored_in_bfloat16_losslessly(tiny_model, ckpt_dir, logits_of):
    """A bf16 model quantized in fp32 (as `quantize` loads it) gains nothing from fp32 embeddings."""
    model = tiny_model(dtype=torch.bfloat16).to(torch.float32)
    config = fast_config("rtn")
    quantize(model, config)
    unibcq.save(model, ckpt_dir("fp32"), config, source_model="tiny")
    unibcq.save(model, ckpt_dir("bf16"), config, source_model="tiny", dtype=torch.bfloat16)
    wide, narrow = _stored_dtypes(ckpt_dir("fp32")), _stored_dtypes(ckpt_dir("bf16"))
    assert wide.keys() == narrow.keys()
    packed = {k for k in wide if checkpoint_module.is_packed_key(k, checkpoint_module.layer_layout(model))}
    assert packed and all(wide[k] == narrow[k] for k in packed)  # codes, scales and offsets as they were
    assert {narrow[k] for k in wide.keys() - packed} == {torch.bfloat16}
    info_wide, info_narrow = unibcq.checkpoint_info(ckpt_dir("fp32")), unibcq.checkpoint_info(ckpt_dir("bf16"))
    assert (info_wide.dense_dtype, info_narrow.dense_dtype) == ("float32", "bfloat16")
    assert info_narrow.dense_bytes * 2 == info_wide.dense_bytes
    assert info_narrow.quantized_bytes == info_wide.quantized_bytes
    assert info_narrow.bits_per_weight == info_wide.bits_per_weight
    # Stored as published, computed in fp32 again: exactly the model that was quantized.
    loaded = unibcq.load(ckpt_dir("bf16"), dtype=torch.float32)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(logits_of(loaded), logits_of(model))
    assert unibcq.load(ckpt_dir("bf16")).model.embed_tokens.weight.dtype == torch.bfloat16


def test_save_dtype_float16_rounds_only_the_unquantized_tensors(tiny_llama, ckpt_dir):
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    unibcq.save(model, ckpt_dir(), config, source_model="tiny", dtype=torch.float16)
    loaded = unibcq.load(ckpt_dir(), dtype=torch.float32)
    expected = model.model.embed_tokens.weight.detach().to(torch.float16).to(torch.float32)
    assert torch.equal(loaded.model.embed_tokens.weight, expected)
    for name, layer in quantized_layers(loaded).items():
        original = quantized_layers(model)[name]
        assert torch.equal(layer.bcq_planes, original.bcq_planes) and torch.equal(layer.bcq_alpha, original.bcq_alpha)


def test_save_dtype_overflow_is_refused_before_writing(tiny_llama, ckpt_dir):
    """float16 ends at 65504: a larger finite value would be stored as inf, a checkpoint that
    loading rejects as corrupt, so saving names the tensor instead."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = 1e5
    config = fast_config("rtn")
    quantize(model, config)
    with pytest.raises(UnibcqError, match="model.norm.weight .*float16"):
        unibcq.save(model, ckpt_dir(), config, source_model="tiny", dtype=torch.float16)
    assert not ckpt_dir().exists()
    unibcq.save(model, ckpt_dir("bf16"), config, source_model="tiny", dtype=torch.bfloat16)
    with pytest.raises(UnibcqError, match="model.norm.weight .*float16"):
        unibcq.load(ckpt_dir("bf16"), dtype=torch.float16)


# --------------------------------------------------------------------------- size accounting


@pytest.mark.parametrize("method", ["rtn", "bcq-greedy"])
def test_checkpoint_info_accounts_for_file_size(tiny_llama, ckpt_dir, method):
    # A larger vocabulary makes the safetensors JSON header (~10 kB here) < 1% of the file.
    model = tiny_llama(vocab_size=4096)
    config = fast_config(method, bits=3, group_size=32)
    records = quantize(model, config)
    unibcq.save(model, ckpt_dir(), config, source_model="tiny")
    info = unibcq.checkpoint_info(ckpt_dir())

    quantized_params = sum(r.numel for r in records)
    assert info.quantized_params == quantized_params
    assert info.method == method and info.bits == 3 and info.group_size == 32
    estimate = info.bits_per_weight * info.quantized_params / 8 + info.dense_bytes
    assert abs(estimate - info.file_bytes) <= 0.01 * info.file_bytes, (estimate, info.file_bytes)

    # Exactly: file = 8-byte header length + JSON header + tensor bytes.
    with open(ckpt_dir() / WEIGHTS_FILE, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    assert info.file_bytes == 8 + header_len + info.quantized_bytes + info.dense_bytes

    # Per-layer numbers agree with the in-memory tensors and the quantize records.
    by_name = {r.name: r for r in records}
    for name, layer in quantized_layers(model).items():
        entry = info.layers[name]
        assert entry["bytes"] == layer.weight_tensor().nbytes
        assert entry["bits_per_weight"] == pytest.approx(by_name[name].bits_per_weight)
    # Hand formula for the down_proj (in = 136 = 4 * 32 + 8 -> 5 groups, 17 bytes per row).
    down = info.layers["model.layers.0.mlp.down_proj"]
    assert down["groups_per_row"] == 5
    assert down["bits_per_weight"] == pytest.approx(3 * 17 * 8 / 136 + 16 * 4 * 5 / 136)
    # Dense part: embeddings + lm_head + norms, in fp32.
    hidden, vocab = 72, 4096
    assert info.dense_params == 2 * vocab * hidden + (2 * 2 + 1) * hidden
    assert info.dense_bytes == 4 * info.dense_params
    assert info.to_dict()["bits_per_weight"] == info.bits_per_weight


# --------------------------------------------------------------------------- overrides, lm_head


def test_per_layer_overrides_survive_save_load(tiny_llama, ckpt_dir, logits_of):
    model = tiny_llama()
    config = fast_config(
        "bcq-refined",
        bits=3,
        group_size=32,
        overrides={"*.mlp.down_proj": {"bits": 4}, "model.layers.1.self_attn.q_proj": {"group_size": -1}},
    )
    records = quantize(model, config)
    by_name = {r.name: r for r in records}
    assert by_name["model.layers.0.mlp.down_proj"].bits == 4
    assert by_name["model.layers.1.mlp.down_proj"].bits == 4
    assert by_name["model.layers.0.mlp.up_proj"].bits == 3
    assert by_name["model.layers.1.self_attn.q_proj"].group_size == -1
    assert by_name["model.layers.0.self_attn.q_proj"].group_size == 32

    unibcq.save(model, ckpt_dir(), config, source_model="tiny")
    loaded = unibcq.load(ckpt_dir())
    for name, layer in quantized_layers(loaded).items():
        assert layer.bits == by_name[name].bits, name
        assert layer.group_size == by_name[name].group_size, name
    assert torch.equal(logits_of(loaded), logits_of(model))

    info = unibcq.checkpoint_info(ckpt_dir())
    assert info.layers["model.layers.1.mlp.down_proj"]["bits"] == 4
    assert info.layers["model.layers.1.self_attn.q_proj"]["groups_per_row"] == 1
    qcfg = json.loads((ckpt_dir() / "config.json").read_text())["quantization_config"]
    assert qcfg["overrides"]["*.mlp.down_proj"] == {"bits": 4}
    assert unibcq.QuantConfig.from_dict(qcfg).overrides == config.overrides


def test_invalid_override_rejected(tiny_llama):
    model = tiny_llama()
    with pytest.raises(UnibcqError):
        quantize(model, fast_config("rtn", overrides={"*.mlp.*": {"bits": 9}}))
    with pytest.raises(UnibcqError):
        quantize(model, fast_config("rtn", overrides={"*.mlp.*": {"method": "bcq-greedy"}}))
    assert not quantized_layers(model)


def test_override_matching_no_layer_rejected(tiny_llama):
    """A typo in a pattern would otherwise quantize every layer at the default bits silently."""
    model = tiny_llama()
    with pytest.raises(UnibcqError, match=r"\*\.mlp\.down_prj.*match no quantized layer"):
        quantize(model, fast_config("rtn", overrides={"*.mlp.down_prj": {"bits": 4}}))
    with pytest.raises(UnibcqError, match="--quantize-lm-head"):
        quantize(model, fast_config("rtn", overrides={"lm_head": {"bits": 4}}))
    assert not quantized_layers(model)


@pytest.mark.parametrize("tiny_model", ["qwen2", "llama"], indirect=True)
def test_include_lm_head_with_tied_embeddings(tiny_model, ckpt_dir, logits_of):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    embed_before = model.model.embed_tokens.weight.detach().clone()
    config = fast_config("bcq-greedy", include_lm_head=True)
    records = quantize(model, config)
    assert records[-1].name == "lm_head"
    assert isinstance(model.lm_head, BCQLinear)
    # The input embedding stays dense and unchanged.
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    expected = logits_of(model)

    unibcq.save(model, ckpt_dir(), config, source_model="tiny")
    loaded = unibcq.load(ckpt_dir())
    assert isinstance(loaded.lm_head, BCQLinear)
    assert torch.equal(loaded.model.embed_tokens.weight, embed_before)
    assert torch.equal(logits_of(loaded), expected)
    info = unibcq.checkpoint_info(ckpt_dir())
    assert "lm_head" in info.layers


# --------------------------------------------------------------------------- broken checkpoints


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    """One small RTN checkpoint, built once; tests copy it before breaking it."""
    from transformers import LlamaConfig

    from tiny_models import _build, _tiny_config_kwargs

    model = _build(LlamaConfig(**_tiny_config_kwargs(False)), seed=0)
    config = fast_config("rtn")
    quantize(model, config)
    out = tmp_path_factory.mktemp("saved") / "ckpt"
    unibcq.save(model, out, config, source_model="tiny")
    return out


@pytest.fixture
def broken(saved_checkpoint, tmp_path) -> Path:
    """A fresh copy of the saved checkpoint to corrupt."""
    target = tmp_path / "broken"
    shutil.copytree(saved_checkpoint, target)
    return target


def _expect_checkpoint_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        unibcq.load(path)
    message = str(info.value)
    assert message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, UnibcqError)
    return message


def test_copy_of_saved_checkpoint_loads(broken):
    assert quantized_layers(unibcq.load(broken))


def test_missing_directory(tmp_path):
    _expect_checkpoint_error(tmp_path / "nope", "not found")
    with pytest.raises(CheckpointError):
        unibcq.checkpoint_info(tmp_path / "nope")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    _expect_checkpoint_error(broken, "config.json")


def test_invalid_json_config(broken):
    cfg = broken / "config.json"
    cfg.write_text(cfg.read_text()[:-20] + "{,,")
    _expect_checkpoint_error(broken, "JSON")
    with pytest.raises(CheckpointError):
        unibcq.checkpoint_info(broken)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits="3"),
        lambda d: d["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits=3.0),
        lambda d: d["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits=0),
        lambda d: d["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(group_size=0),
        lambda d: d["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].pop("in_features"),
        lambda d: d["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(in_features=64),
        lambda d: d["quantization_config"]["layers"].update({"model.layers.0.mlp.nope": {
            "bits": 3, "group_size": 32, "in_features": 72, "out_features": 72}}),
        lambda d: d["quantization_config"].update(layers={}),
        lambda d: d["quantization_config"].update(format_version=99),
        lambda d: d["quantization_config"].update(quant_method="gptq"),
        lambda d: d.pop("quantization_config"),
    ],
    ids=["bits-string", "bits-float", "bits-0", "group-0", "no-in", "wrong-in", "extra-layer",
         "no-layers", "version", "not-unibcq", "no-qcfg"],
)
def test_bad_quantization_config(broken, edit):
    cfg = broken / "config.json"
    data = json.loads(cfg.read_text())
    edit(data)
    cfg.write_text(json.dumps(data))
    _expect_checkpoint_error(broken)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(model_type="no-such-model"),
        lambda d: d.pop("model_type"),
        lambda d: d.update(hidden_size="big"),
        lambda d: d["quantization_config"]["layers"].update({"model.norm": {
            "bits": 3, "group_size": 32, "in_features": 72, "out_features": 72}}),
    ],
    ids=["unknown-model-type", "no-model-type", "hidden-size-string", "layer-not-linear"],
)
def test_corrupt_model_config_raises_checkpoint_error(broken, edit):
    cfg = broken / "config.json"
    data = json.loads(cfg.read_text())
    edit(data)
    cfg.write_text(json.dumps(data))
    _expect_checkpoint_error(broken)


def test_bits_string_names_the_layer(broken):
    cfg = broken / "config.json"
    data = json.loads(cfg.read_text())
    data["quantization_config"]["layers"]["model.layers.1.mlp.up_proj"]["bits"] = "3"
    cfg.write_text(json.dumps(data))
    _expect_checkpoint_error(broken, "model.layers.1.mlp.up_proj")
    with pytest.raises(CheckpointError):
        unibcq.checkpoint_info(broken)


def test_config_not_an_object(broken):
    (broken / "config.json").write_text("[1, 2, 3]\n")
    _expect_checkpoint_error(broken)


def test_missing_weights_file(broken):
    (broken / WEIGHTS_FILE).unlink()
    _expect_checkpoint_error(broken, WEIGHTS_FILE)
    with pytest.raises(CheckpointError):
        unibcq.checkpoint_info(broken)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8 / 1e9])
def test_truncated_weights(broken, keep):
    weights = broken / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: max(int(len(data) * keep), 4)])
    _expect_checkpoint_error(broken, WEIGHTS_FILE)


def test_truncated_weights_checkpoint_info(broken):
    weights = broken / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        unibcq.checkpoint_info(broken)


def _rewrite(path: Path, change) -> None:
    weights = path / WEIGHTS_FILE
    tensors = load_file(str(weights))
    change(tensors)
    weights.unlink()
    save_file(tensors, str(weights), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "key,new",
    [
        ("model.layers.0.mlp.up_proj.bcq_alpha", lambda t: t[:, :2].contiguous()),
        ("model.layers.0.mlp.up_proj.bcq_planes", lambda t: t[:2].contiguous()),
        ("model.norm.weight", lambda t: t[:-1].contiguous()),
        ("model.embed_tokens.weight", lambda t: t.T.contiguous()),
        ("model.layers.1.self_attn.o_proj.bcq_offset", lambda t: t.float()),
    ],
    ids=["alpha-groups", "planes-bits", "norm", "embed-transposed", "offset-dtype"],
)
def test_tensor_shape_or_dtype_mismatch(broken, key, new):
    _rewrite(broken, lambda ts: ts.__setitem__(key, new(ts[key])))
    _expect_checkpoint_error(broken, key)


def test_missing_and_unexpected_tensors(broken, saved_checkpoint):
    _rewrite(broken, lambda ts: ts.pop("model.layers.0.mlp.up_proj.bcq_offset"))
    _expect_checkpoint_error(broken, "missing")
    shutil.rmtree(broken)
    shutil.copytree(saved_checkpoint, broken)
    _rewrite(broken, lambda ts: ts.__setitem__("model.layers.0.mlp.extra", torch.zeros(3)))
    _expect_checkpoint_error(broken, "unexpected")


# --------------------------------------------------------------------------- atomic save


def test_save_refuses_existing_dir(tiny_llama, ckpt_dir, hidden_entries):
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    out = ckpt_dir()
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UnibcqError) as info:
        unibcq.save(model, out, config, source_model="tiny")
    assert "exists" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert hidden_entries(out.parent) == []

    with pytest.raises(UnibcqError, match="not a unibcq checkpoint"):  # overwrite replaces checkpoints only
        unibcq.save(model, out, config, source_model="tiny", overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    unibcq.save(model, out, config, source_model="tiny", overwrite=True)
    assert quantized_layers(unibcq.load(out))
    assert hidden_entries(out.parent) == []


class _Boom(RuntimeError):
    pass


def _failing_save_file(*args, **kwargs):
    raise _Boom("disk full (simulated)")


def test_failed_save_leaves_nothing_behind(tiny_llama, ckpt_dir, hidden_entries, monkeypatch):
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    out = ckpt_dir()
    out.parent.mkdir(parents=True)
    monkeypatch.setattr(checkpoint_module, "save_file", _failing_save_file)
    with pytest.raises(_Boom):
        unibcq.save(model, out, config, source_model="tiny")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
    assert hidden_entries(out.parent) == []


def test_failed_overwrite_keeps_old_checkpoint(tiny_llama, ckpt_dir, hidden_entries, monkeypatch, logits_of):
    model = tiny_llama()
    config = fast_config("rtn")
    quantize(model, config)
    out = ckpt_dir()
    unibcq.save(model, out, config, source_model="tiny")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(checkpoint_module, "save_file", _failing_save_file)
    with pytest.raises(_Boom):
        unibcq.save(model, out, config, source_model="tiny", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hidden_entries(out.parent) == []
    assert torch.equal(logits_of(unibcq.load(out)), logits_of(model))


def test_save_requires_quantized_model(tiny_llama, ckpt_dir):
    with pytest.raises(UnibcqError, match="quantize"):
        unibcq.save(tiny_llama(), ckpt_dir(), fast_config("rtn"), source_model="tiny")
    assert not ckpt_dir().exists()


# --------------------------------------------------------------------------- bad models


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_weight_names_the_layer(tiny_llama, bad):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(UnibcqError) as info:
        quantize(model, fast_config("bcq-greedy"))
    assert "model.layers.1.mlp.up_proj" in str(info.value)


def test_quantizing_twice_rejected(tiny_llama):
    model = tiny_llama()
    quantize(model, fast_config("rtn"))
    with pytest.raises(UnibcqError, match="already quantized"):
        quantize(model, fast_config("rtn"))


def test_unknown_method_rejected(tiny_llama):
    with pytest.raises(UnibcqError, match="unknown method"):
        quantize(tiny_llama(), unibcq.QuantConfig("bcq-magic", bits=3, group_size=32))


@pytest.mark.parametrize("bits,group_size", [(0, 32), (9, 32), ("3", 32), (3, 0), (3, -2)])
def test_bad_config_rejected(tiny_llama, bits, group_size):
    model = tiny_llama()
    with pytest.raises(UnibcqError):
        quantize(model, unibcq.QuantConfig("rtn", bits=bits, group_size=group_size))
    assert not quantized_layers(model)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        quantize(model, fast_config("rtn"))
    message = str(info.value)
    assert "gpt2" in message
    for supported in ("llama", "qwen2", "mistral"):
        assert supported in message
    assert isinstance(info.value, UnibcqError)


def test_cache_dir_fixture_isolated(unibcq_cache_dir):
    from unibcq.models.loading import cache_root

    assert unibcq_cache_dir is not None
    assert cache_root() == unibcq_cache_dir
    assert os.environ["UNIBCQ_CACHE_DIR"] == str(unibcq_cache_dir)


# --------------------------------------------------------------------------- manifest


def test_manifest_lists_every_file(saved_checkpoint):
    manifest = json.loads((saved_checkpoint / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in saved_checkpoint.iterdir() if p.name != "manifest.json"}
    assert set(manifest) == on_disk and WEIGHTS_FILE in manifest


def test_flipped_bit_in_tensor_data_is_caught(broken):
    weights = broken / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: the layout stays valid
    weights.write_bytes(bytes(data))
    _expect_checkpoint_error(broken, "checksum", WEIGHTS_FILE)


def test_missing_manifest_or_listed_file(broken, saved_checkpoint):
    (broken / "manifest.json").unlink()
    _expect_checkpoint_error(broken, "manifest.json is missing")
    shutil.rmtree(broken)
    shutil.copytree(saved_checkpoint, broken)
    (broken / "generation_config.json").unlink()
    _expect_checkpoint_error(broken, "generation_config.json is missing")


def test_checkpoint_without_manifest_key_still_loads(broken):
    """Checkpoints written before manifests existed load without verification."""
    cfg = broken / "config.json"
    data = json.loads(cfg.read_text())
    data["quantization_config"].pop("manifest")
    cfg.write_text(json.dumps(data))
    (broken / "manifest.json").unlink()
    assert quantized_layers(unibcq.load(broken))


@pytest.mark.parametrize("method,bits,group_size", [("dyngroup", 1, -1), ("rtn", 3, 128), ("uniquanf", 3, 128)])
def test_config_defaults_follow_the_method(method, bits, group_size):
    config = unibcq.QuantConfig(method).validate()
    assert (config.bits, config.group_size) == (bits, group_size)
    assert unibcq.QuantConfig.from_dict(config.recorded()) == config


def test_dyngroup_config_with_defaults_quantizes(tiny_llama):
    model = tiny_llama()
    records = quantize(model, unibcq.QuantConfig("dyngroup", window=16))
    assert records and all(r.bits == 1 and r.group_size == -1 for r in records)


def test_an_override_without_a_value_is_refused():
    with pytest.raises(UnibcqError, match="gives no value for bits"):
        unibcq.QuantConfig("rtn", overrides={"*.down_proj": {"bits": None}}).validate()
