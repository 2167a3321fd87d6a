"""Streaming quantization: one weight at a time from safetensors shards, output in shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import unibcq
from unibcq import load
from unibcq.checkpoint import checkpoint_info, save_checkpoint
from unibcq.config import QuantConfig
from unibcq.errors import UnibcqError
from unibcq.methods import quantize_model
from unibcq.methods.streaming import parse_memory, quantize_streaming

BUDGET = 4 * 2**30


def saved_model(model: torch.nn.Module, folder: Path, shard: str | None = None) -> Path:
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tiny_model", ["llama", "qwen2"], indirect=True)
@pytest.mark.parametrize("method", ["rtn", "bcq-alternating", "dyngroup"])
def test_streaming_equals_in_memory(tmp_path, tiny_model, method, input_ids):
    source = saved_model(tiny_model(), tmp_path / "src", shard="60KB")
    assert len(list(source.glob("*.safetensors"))) > 1  # the source really is sharded
    bits = 1 if method == "dyngroup" else 3
    group = -1 if method == "dyngroup" else 32
    config = QuantConfig(method=method, bits=bits, group_size=group, max_groups=4)
    records = quantize_streaming(source, tmp_path / "streamed", config, "src", BUDGET, show_progress=False,
                                 shard_bytes=40_000)
    reference = tiny_model()
    quantize_model(reference, QuantConfig(method=method, bits=bits, group_size=group, max_groups=4),
                   show_progress=False)
    save_checkpoint(reference, tmp_path / "in-memory", config, "src")
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 1
    streamed = load(tmp_path / "streamed")
    expected = load(tmp_path / "in-memory")
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids).logits, expected(input_ids).logits, rtol=0, atol=0)
    info, ref_info = checkpoint_info(tmp_path / "streamed"), checkpoint_info(tmp_path / "in-memory")
    assert len(records) == len(ref_info.layers)
    assert info.quantized_bytes == ref_info.quantized_bytes
    assert info.bits_per_weight == pytest.approx(ref_info.bits_per_weight)


def test_streaming_stores_the_unquantized_tensors_in_the_asked_dtype(tmp_path, tiny_llama):
    """Default: the source's declared dtype; `dtype` overrides it, as `save_checkpoint` does."""
    source = saved_model(tiny_llama(), tmp_path / "src")
    config = QuantConfig(method="rtn", bits=3, group_size=32)
    quantize_streaming(source, tmp_path / "bf16", config, "src", BUDGET, show_progress=False, dtype=torch.bfloat16)
    reference = tiny_llama()
    quantize_model(reference, config, show_progress=False)
    save_checkpoint(reference, tmp_path / "in-memory", config, "src", dtype=torch.bfloat16)
    assert checkpoint_info(tmp_path / "bf16").dense_dtype == "bfloat16"
    streamed, expected = load(tmp_path / "bf16"), load(tmp_path / "in-memory")
    for (name, a), (_, b) in zip(streamed.state_dict().items(), expected.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name



@pytest.mark.parametrize("tie", [True, False])
def test_a_quantized_lm_head_streams_from_a_tied_source_too(tmp_path, tiny_llama, tie, input_ids):
    """A tied source stores the output layer only as the input embedding: --quantize-lm-head
    reads it there and gives what the in-memory run gives."""
    source = saved_model(tiny_llama(tie_word_embeddings=tie), tmp_path / "src")
    config = QuantConfig(method="rtn", bits=3, group_size=32, include_lm_head=True)
    quantize_streaming(source, tmp_path / "streamed", config, "src", BUDGET, show_progress=False)
    reference = tiny_llama(tie_word_embeddings=tie)
    quantize_model(reference, config, show_progress=False)
    save_checkpoint(reference, tmp_path / "in-memory", config, "src")
    streamed, expected = load(tmp_path / "streamed"), load(tmp_path / "in-memory")
    assert "lm_head" in checkpoint_info(tmp_path / "streamed").layers
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids).logits, expected(input_ids).logits, rtol=0, atol=0)

def test_budget_too_small_fails_before_writing(tmp_path, tiny_llama):
    source = saved_model(tiny_llama(), tmp_path / "src")
    with pytest.raises(UnibcqError, match="too small"):
        quantize_streaming(source, tmp_path / "out", QuantConfig(method="rtn"), "src", 2**20, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_sharded_checkpoint_with_a_damaged_config_is_still_recognised(tmp_path, tiny_llama):
    """Its first shard holds only the embedding; the packed tensors are in later ones."""
    from safetensors import safe_open

    from unibcq.checkpoint import has_unibcq_weights, weight_files

    source = saved_model(tiny_llama(), tmp_path / "src")
    quantize_streaming(source, tmp_path / "q", QuantConfig(method="rtn", group_size=32), "src", BUDGET,
                       show_progress=False, shard_bytes=40_000)
    with safe_open(str(weight_files(tmp_path / "q")[0]), "pt") as f:
        assert list(f.keys()) == ["model.embed_tokens.weight"]
    (tmp_path / "q" / "config.json").write_text("[1]")
    assert has_unibcq_weights(tmp_path / "q")


def test_streaming_refuses_an_override_matching_no_layer(tmp_path, tiny_llama):
    source = saved_model(tiny_llama(), tmp_path / "src")
    config = QuantConfig(method="rtn", overrides={"*.down_prj": {"bits": 4}})
    with pytest.raises(UnibcqError, match="match no quantized layer"):
        quantize_streaming(source, tmp_path / "out", config, "src", BUDGET, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_streaming_refuses_calibrated_methods(tmp_path, tiny_llama):
    """They onload whole blocks instead (`methods.onload`), which needs calibration."""
    source = saved_model(tiny_llama(), tmp_path / "src")
    with pytest.raises(UnibcqError, match="per-matrix methods"):
        quantize_streaming(source, tmp_path / "out", QuantConfig(method="gptq"), "src", BUDGET, show_progress=False)


def test_missing_shard_is_a_clear_error(tmp_path, tiny_llama):
    source = saved_model(tiny_llama(), tmp_path / "src", shard="60KB")
    next(source.glob("model-*.safetensors")).unlink()
    with pytest.raises(UnibcqError, match="missing"):
        quantize_streaming(source, tmp_path / "out", QuantConfig(method="rtn"), "src", BUDGET, show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("512M", 512 * 2**20), ("1.5g", 3 * 2**29),
                                            ("1000", 1000), ("2Gi", 2 * 2**30)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "8XB", "1e400", "0.5", "1e-12G"])
def test_parse_memory_rejects_nonsense(text):
    with pytest.raises(UnibcqError, match="not a memory size"):
        parse_memory(text)


def test_cli_max_memory_streams_and_reports(tmp_path, tiny_llama, capsys):
    from unibcq.cli import main

    source = saved_model(tiny_llama(), tmp_path / "src", shard="60KB")
    report = tmp_path / "q.json"
    code = main(["quantize", str(source), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "--max-memory", "4GiB", "--out", str(tmp_path / "out"), "--no-progress", "--json", str(report)])
    assert code == 0
    assert "peak memory" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["max_memory_mib"] == 4096 and data["peak_rss_mib"] > 0
    assert unibcq.load(tmp_path / "out") is not None


def test_cli_max_memory_rejects_gguf(tmp_path, capsys):
    from unibcq.cli import main

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    code = main(["quantize", str(gguf), "--method", "rtn", "--max-memory", "4GiB", "--out", str(tmp_path / "o")])
    assert code == 2 and "cannot be streamed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tiny_model", ["llama", "qwen2"], indirect=True)
@pytest.mark.parametrize("method", ["gptq", "uniquanf"])
def test_onloaded_calibrated_run_equals_in_memory(tmp_path, tiny_model, method, input_ids):
    """Blocks read from disk one at a time give exactly the in-memory result."""
    from unibcq.methods.onload import onload_model

    source = saved_model(tiny_model(), tmp_path / "src", shard="60KB")
    windows = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    settings = dict(method=method, bits=3, group_size=32, epochs=1, calib_samples=4, calib_seq_len=16)
    reference = tiny_model()
    quantize_model(reference, QuantConfig(**settings), windows, show_progress=False)
    model, onload = onload_model(source)
    assert all(p.is_meta for p in model.model.layers[0].parameters())  # blocks stay on disk until their turn
    quantize_model(model, QuantConfig(**settings), windows, show_progress=False, onload=onload)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, rtol=0, atol=0)


def test_cli_calibrated_max_memory_too_small(tmp_path, tiny_llama, capsys):
    from unibcq.cli import main

    source = saved_model(tiny_llama(), tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("w1 w2 w3 " * 100)
    code = main(["quantize", str(source), "--method", "gptq", "--max-memory", "100MiB", "--out", str(tmp_path / "o"),
                 "--calib", str(calib)])
    assert code == 2 and "too small" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_max_memory_refuses_a_config_transformers_cannot_build_in_one_line(tmp_path, tiny_llama, capsys, method):
    from unibcq.cli import main

    source = saved_model(tiny_llama(), tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "bogus", "rope_theta": 10000.0}  # loads, but cannot build
    (source / "config.json").write_text(json.dumps(config))
    calib = tmp_path / "calib.txt"
    calib.write_text("w1 w2 w3 " * 100)
    code = main(["quantize", str(source), "--method", method, "--max-memory", "4GiB", "--out", str(tmp_path / "o"),
                 "--no-progress", *(["--calib", str(calib)] if method == "gptq" else [])])
    err = capsys.readouterr().err
    assert code == 2 and f"{source} is not a causal LM transformers can build" in err, err
    assert not (tmp_path / "o").exists()


def test_the_budget_counts_the_largest_unquantized_tensor_and_does_not_hold_it(tmp_path, tiny_llama):
    """A 20,000-word embedding outweighs every linear layer of the tiny model: a budget that fits
    the largest linear's quantization but not the embedding's read is refused, and an output
    tensor larger than a shard is written at once rather than held through the next layers."""
    import unibcq.methods.streaming as streaming

    source = saved_model(tiny_llama(vocab_size=20000), tmp_path / "src")
    largest_linear = max(p.numel() for n, p in tiny_llama().named_parameters() if "layers." in n and p.dim() == 2) * 4
    budget = streaming.BASELINE_BYTES + (streaming.QUANTIZER_COPIES + 2) * largest_linear
    with pytest.raises(UnibcqError, match="largest unquantized tensor"):
        quantize_streaming(source, tmp_path / "out", QuantConfig(method="rtn"), "src", budget, show_progress=False)
    writer = streaming._ShardWriter(tmp_path, shard_bytes=100)
    writer.add("big", torch.zeros(1000))
    assert writer.held == {} and len(writer.files) == 1
