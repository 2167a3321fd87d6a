"""`unibcq generate`, `generate_text`, `model_memory_bytes` and `unibcq bench kernels` on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import unibcq
from unibcq import compute_dtype
from unibcq import generate as generate_module
from unibcq.cli import main
from unibcq.generate import generate_text
from unibcq.memory import model_memory_bytes

SUMMARY_KEYS = ("text", "token_ids", "new_tokens", "prompt_tokens", "chat", "seconds", "tokens_per_second",
                "prefill_seconds", "decode_seconds", "decode_tokens_per_second", "rss_bytes", "model_bytes",
                "bits_per_weight", "model", "prompt", "max_new_tokens", "temperature", "seed")
KERNEL_KEYS = ("backend", "shape", "bits", "group_size", "batch", "seconds", "speedup_vs_fp32", "gbps",
               "weight_bytes", "bandwidth_gbps", "threads", "device", "gpu", "input_dtype", "note")
PROMPT = "w3 w10 w17 w24"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def quantized_dir(source: Path, out: Path, bits: int, group_size: int = 32) -> Path:
    """Quantize the tiny model saved at `source` with RTN and save it (with its tokenizer) to `out`."""
    model = unibcq.load_model(str(source))
    config = unibcq.QuantConfig("rtn", bits=bits, group_size=group_size)
    unibcq.quantize(model, config, show_progress=False)
    return unibcq.save(model, out, config, source_model=str(source), tokenizer=unibcq.load_tokenizer(str(source)))


@pytest.fixture
def w3_dir(tmp_path, tiny_model_dir) -> Path:
    return quantized_dir(tiny_model_dir, tmp_path / "w3", 3)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_greedy_tokens_match_model_generate(w3_dir, ignore_eos):
    """The streamed, timed path decodes exactly what transformers' greedy generate does (LUT decode steps)."""
    model, tokenizer = unibcq.load(w3_dir), unibcq.load_tokenizer(str(w3_dir))
    streamed: list[str] = []
    result = generate_text(model, tokenizer, PROMPT, max_new_tokens=12, on_text=streamed.append,
                           ignore_eos=ignore_eos)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    extra = {"min_new_tokens": 12} if ignore_eos else {}
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id, **extra)[0, ids.shape[1]:].tolist()
    assert result.token_ids == expected and result.new_tokens == len(expected)
    assert result.prompt_tokens == ids.shape[1] and not result.chat
    assert "".join(streamed).strip() == result.text.strip() == tokenizer.decode(expected, skip_special_tokens=True)
    if ignore_eos:
        assert result.new_tokens == 12 and result.decode_tokens_per_second > 0
    assert 0 < result.prefill_seconds <= result.seconds and result.decode_seconds <= result.seconds


def test_bfloat16_prefill_without_a_fast_bfloat16_gemm_runs_float32_gemms_and_decoding_keeps_torchs(w3_dir, monkeypatch):
    from linear_recorder import LinearDtypes

    monkeypatch.setattr(compute_dtype, "native_half_gemm", lambda dtype: False)
    monkeypatch.setattr(compute_dtype, "FLOAT32_GEMM_MIN_ROWS", 4)  # the prompt's 4 tokens
    # The packed layers' products through F.linear, as past the GEMV's row bound: on an AVX-512
    # CPU that bound is above the prompt's 4 rows, and the GEMV computes in float32 by itself.
    monkeypatch.setenv("UNIBCQ_BACKEND", "reference")
    monkeypatch.setattr(generate_module, "_warm_up", lambda model, input_ids: None)  # only generate's own products
    model, tokenizer = unibcq.load(w3_dir, dtype="bfloat16"), unibcq.load_tokenizer(str(w3_dir))
    with LinearDtypes() as seen:
        result = generate_text(model, tokenizer, PROMPT, 3, ignore_eos=True)
    assert result.new_tokens == 3
    prefill = seen.dtypes.count(torch.float32)  # the prompt's products, widened
    assert prefill and seen.dtypes[:prefill] == [torch.float32] * prefill
    assert seen.dtypes[prefill:] and set(seen.dtypes[prefill:]) == {torch.bfloat16}  # decode steps: torch's



def test_timing_starts_after_a_warm_up_of_both_product_paths(w3_dir):
    """A process's first packed matmul compiles its kernel: one untimed forward of the prompt
    and one of a single token come first, so prefill time is the prefill's."""
    model, tokenizer = unibcq.load(w3_dir), unibcq.load_tokenizer(str(w3_dir))
    widths: list[int] = []

    def record(module, args, kwargs):
        widths.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate_text(model, tokenizer, PROMPT, 2, ignore_eos=True)
    finally:
        hook.remove()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids.shape[1]
    assert widths == [prompt, 1, prompt, 1]  # warm-up, then generate's prefill and one decode step

def test_sampling_is_seeded(w3_dir):
    model, tokenizer = unibcq.load(w3_dir), unibcq.load_tokenizer(str(w3_dir))
    runs = [generate_text(model, tokenizer, PROMPT, 10, temperature=1.5, seed=s, ignore_eos=True).token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_chat_template(w3_dir):
    model, tokenizer = unibcq.load(w3_dir), unibcq.load_tokenizer(str(w3_dir))
    plain = generate_text(model, tokenizer, PROMPT, 2)
    with pytest.raises(unibcq.UnibcqError, match="chat template"):
        generate_text(model, tokenizer, PROMPT, 2, chat=True)
    tokenizer.chat_template = "{% for m in messages %}w1 w2 {{ m['content'] }} w5{% endfor %}"
    templated = generate_text(model, tokenizer, PROMPT, 2)  # on by default once a template exists
    assert templated.chat and templated.prompt_tokens == plain.prompt_tokens + 3
    assert not generate_text(model, tokenizer, PROMPT, 2, chat=False).chat


def test_a_chat_turn_ends_at_the_tokenizers_eos_even_when_the_config_names_another(w3_dir):
    """Where generation_config's EOS is not the tokenizer's (the template's end of turn), the
    reply ran past the turn into the next one's text; hidden by skip_special_tokens."""
    model, tokenizer = unibcq.load(w3_dir), unibcq.load_tokenizer(str(w3_dir))
    tokenizer.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w5{% endfor %}"
    turn_end, other = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("w9")
    model.generation_config.eos_token_id = other
    forced = torch.full((model.config.vocab_size,), -1e4)
    forced[turn_end] = 1e4  # the model ends its turn at once
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + forced)
    try:
        chat = generate_text(model, tokenizer, PROMPT, 6)
        plain = generate_text(model, tokenizer, PROMPT, 6, chat=False)
    finally:
        hook.remove()
    assert chat.chat and chat.token_ids == [turn_end]
    assert plain.token_ids == [turn_end] * 6  # without a template the model's own EOS rules, as configured


def test_model_memory_counts_packed_storage(tmp_path, tiny_model_dir, tiny_llama):
    fp = unibcq.load_model(str(tiny_model_dir))
    w4 = unibcq.load(quantized_dir(tiny_model_dir, tmp_path / "w4", 4, group_size=-1))
    w2 = unibcq.load(quantized_dir(tiny_model_dir, tmp_path / "w2", 2, group_size=-1))
    sizes = [model_memory_bytes(m) for m in (w2, w4, fp)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] == sum(p.numel() * p.element_size() for p in fp.parameters()) + sum(
        b.numel() * b.element_size() for b in fp.buffers())
    # Packed layers count as stored: what the checkpoint file holds, plus the buffers it does not (rotary).
    saved = w4.state_dict()
    unsaved = sum(b.numel() * b.element_size() for name, b in w4.named_buffers() if name not in saved)
    info = unibcq.checkpoint_info(tmp_path / "w4")
    assert sizes[1] == info.quantized_bytes + info.dense_bytes + unsaved
    # Tied embeddings are one storage, counted once.
    tied = tiny_llama(tie_word_embeddings=True)
    assert model_memory_bytes(tied) == sum(p.numel() * p.element_size() for p in tied.parameters()) + sum(
        b.numel() * b.element_size() for b in tied.buffers())


def test_generate_cli_summary_and_json(capsys, tmp_path, w3_dir):
    out = tmp_path / "g.json"
    code, stdout, err = run(capsys, "generate", w3_dir, "--prompt", PROMPT, "--max-new-tokens", "6", "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(SUMMARY_KEYS) <= set(report)
    assert report["text"] in stdout and report["new_tokens"] == len(report["token_ids"]) <= 6
    summary = stdout.strip().splitlines()[-1]
    assert f"{report['new_tokens']} new tokens" in summary and "decode" in summary and "RSS" in summary
    assert f"model {report['model_bytes'] / 2**20:.1f} MiB" in summary
    assert report["bits_per_weight"] == pytest.approx(unibcq.checkpoint_info(w3_dir).bits_per_weight)
    assert report["model_bytes"] == model_memory_bytes(unibcq.load(w3_dir)) and report["rss_bytes"] > 0


def test_generate_cli_full_precision_model(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "generate", tiny_model_dir, "--prompt", PROMPT, "--max-new-tokens", "3",
                       "--temperature", "0.7", "--seed", "1", "--json", tmp_path / "g.json")
    assert code == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["bits_per_weight"] == 32 and report["temperature"] == 0.7 and report["seed"] == 1


def test_generate_cli_in_bfloat16(capsys, tmp_path, w3_dir, monkeypatch):
    """--dtype sets what the unquantized tensors compute in; packed weights stay packed."""
    monkeypatch.setattr(compute_dtype, "native_half_gemm", lambda dtype: False)
    code, stdout, err = run(capsys, "generate", w3_dir, "--prompt", PROMPT, "--max-new-tokens", "3", "--dtype",
                            "bfloat16", "--json", tmp_path / "g.json")
    assert code == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["dtype"] == "bfloat16" and report["device"] == "cpu" and 1 <= report["new_tokens"] <= 3
    assert report["gpu_peak_bytes"] is None and "GPU peak" not in stdout
    fp32 = unibcq.load(w3_dir)
    assert report["model_bytes"] < model_memory_bytes(fp32)  # the unquantized tensors in 2 bytes, not 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_cli_on_a_gpu_reports_its_memory(capsys, tmp_path, w3_dir):
    code, stdout, err = run(capsys, "generate", w3_dir, "--prompt", PROMPT, "--max-new-tokens", "3", "--device",
                            "cuda", "--dtype", "bfloat16", "--json", tmp_path / "g.json")
    assert code == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["device"].startswith("cuda") and report["gpu_peak_bytes"] > 0 and "GPU peak" in stdout


@pytest.mark.parametrize("extra,needle", [
    ([], "missing-dir"),
    (["--device", "tpu"], "--device"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "inf"], "finite"),
    (["--temperature", "1e-40"], "use 0 for greedy"),  # logits / 1e-40 overflowed into a sampling traceback
])
def test_generate_cli_bad_input(capsys, tmp_path, extra, needle):
    code, stdout, err = run(capsys, "generate", tmp_path / "missing-dir", "--prompt", "hi", *extra)
    assert code == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unibcq: error:") and needle in lines[0]


def test_generate_cli_chat_without_template(capsys, w3_dir):
    code, _, err = run(capsys, "generate", w3_dir, "--prompt", PROMPT, "--chat")
    assert code == 2 and "chat template" in err


def test_bench_kernels_cli(capsys, tmp_path):
    out = tmp_path / "k.json"
    code, stdout, err = run(capsys, "bench", "kernels", "--shape", "64x128", "--bits", "3", "--batch", "1",
                            "--repeats", "2", "--no-progress", "--json", out)
    assert code == 0, err
    entries = json.loads(out.read_text())
    assert isinstance(entries, list) and {"dense-fp32", "dense-bf16", "reference"} <= {e["backend"] for e in entries}
    for entry in entries:
        assert set(KERNEL_KEYS) <= set(entry)
        assert entry["shape"] == [64, 128] and entry["batch"] == 1 and entry["bandwidth_gbps"] > 0
        assert entry["device"] == "cpu" and entry["gpu"] is None
        if entry["backend"].startswith("dense"):
            assert entry["bits"] is None and entry["group_size"] is None
        else:
            assert entry["bits"] == 3 and entry["group_size"] == 128
        if entry["note"] is None:
            assert entry["seconds"] > 0 and entry["gbps"] > 0 and entry["speedup_vs_fp32"] > 0
        else:
            assert entry["seconds"] is None and entry["backend"] in stdout
    fp32 = next(e for e in entries if e["backend"] == "dense-fp32")
    assert fp32["speedup_vs_fp32"] == 1.0 and fp32["weight_bytes"] == 64 * 128 * 4
    assert "dense-fp32" in stdout and "GB/s" in stdout
    assert {e["input_dtype"] for e in entries if e["bits"]} == {"float32"}
    assert {e["input_dtype"] for e in entries if e["bits"] is None} == {None}


def test_bench_kernels_times_the_packed_backends_on_the_input_dtype_asked_for(monkeypatch):
    from unibcq.bench import kernels

    seen = []
    real = kernels.bcq_matmul

    def spy(x, *args):
        seen.append(x.dtype)
        return real(x, *args)

    monkeypatch.setattr(kernels, "bcq_matmul", spy)
    entries = kernels.benchmark_kernels([(32, 64)], [2], [1], 32, ["reference"], repeats=1, show_progress=False,
                                        input_dtype=torch.bfloat16)
    packed = [e for e in entries if e["backend"] == "reference"]
    assert packed and all(e["input_dtype"] == "bfloat16" and e["seconds"] for e in packed)
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("extra,needle", [
    (["--shape", "64by128"], "OUTxIN"),
    (["--shape", "64x128", "--bits", "9"], "bits"),
    (["--shape", "64x128", "--backends", "cublas"], "unknown backend"),
    (["--shape", "64x128", "--batch", "0"], "batch"),
    (["--shape", "64x128", "--device", "tpu"], "--device"),
])
def test_bench_kernels_bad_input(capsys, extra, needle):
    code, _, err = run(capsys, "bench", "kernels", "--no-progress", *extra)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_kernel_timing_waits_for_the_device_after_every_timed_span():
    """On a GPU a call returns when its kernels are queued; each span must end with a sync."""
    from unibcq.bench.kernels import time_calls

    events: list[str] = []
    seconds = time_calls([lambda: events.append("call")], repeats=3, threads=torch.get_num_threads(),
                         sync=lambda: events.append("sync"))
    assert seconds > 0
    assert events[:5] == ["sync", "call", "sync", "call", "sync"]  # nothing earlier counted; warm-up calls one by one
    spans = "".join("c" if e == "call" else "|" for e in events[1:]).split("|")[:-1]
    assert all(spans) and events[-1] == "sync"  # every span of calls is closed by a sync
    assert "".join(spans).count("|") == 0 and len(spans) == events.count("sync") - 1


def test_every_measurement_and_the_bandwidth_go_through_the_device_sync(monkeypatch):
    from unibcq.bench import kernels

    syncs = []
    monkeypatch.setattr(kernels, "device_sync", lambda device: lambda: syncs.append(device))
    entries = kernels.benchmark_kernels([(32, 64)], [2], [1], 32, ["reference"], repeats=1, show_progress=False)
    timed = [e for e in entries if e["seconds"] is not None]
    assert len(timed) == 3  # dense fp32, dense bf16, reference
    # one opening sync, at least two warm-up calls and one repeat each: bandwidth plus every measurement
    assert len(syncs) >= 4 * (1 + len(timed))


def test_generation_stops_at_the_context_window(capsys, tmp_path, w3_dir):
    """The tiny model's context is 64 positions: new tokens stop there (with a note), and a prompt
    that fills it is refused rather than run past what the model was trained on."""
    code, _, err = run(capsys, "generate", w3_dir, "--prompt", PROMPT, "--no-chat", "--max-new-tokens", "500",
                       "--json", tmp_path / "g.json")
    assert code == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    room = 64 - report["prompt_tokens"]
    assert report["max_new_tokens"] == room and report["new_tokens"] <= room
    assert report["requested_max_new_tokens"] == 500  # what was asked for is kept beside what ran
    assert "--max-new-tokens 500 was capped there" in err
    code, _, err = run(capsys, "generate", w3_dir, "--prompt", " ".join([PROMPT] * 20), "--no-chat")
    assert code == 2 and "context window 64" in err


def test_a_mistyped_kernel_backend_is_one_error_line(capsys, monkeypatch, w3_dir):
    monkeypatch.setenv("UNIBCQ_BACKEND", "fastest")
    code, _, err = run(capsys, "generate", w3_dir, "--prompt", PROMPT, "--max-new-tokens", "2")
    assert code == 2 and "UNIBCQ_BACKEND='fastest'" in err and "Traceback" not in err, err


def test_a_tokenizer_of_another_model_is_named(tiny_model_dir, tiny_llama):
    tokenizer = unibcq.load_tokenizer(str(tiny_model_dir))
    with pytest.raises(unibcq.UnibcqError, match="past the model's vocabulary of 8"):
        generate_text(tiny_llama(vocab_size=8), tokenizer, PROMPT, max_new_tokens=2, chat=False)
