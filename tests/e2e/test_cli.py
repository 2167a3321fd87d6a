"""End-to-end CLI runs on a tiny model: quantize -> info -> eval, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from unibcq.cli import main
from unibcq.errors import UnibcqError


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (e.g. transformers' save progress bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("method", ["rtn", "bcq-greedy", "bcq-refined", "bcq-alternating"])
def test_quantize_info_eval(capsys, tmp_path, tiny_model_dir, corpus_file, method):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_model_dir, "--method", method, "--bits", "3",
                            "--group-size", "32", "--out", out, "--no-progress", "--json", tmp_path / "q.json")
    assert code == 0, err
    assert "bits/weight" in stdout and "rel. error" in stdout
    summary = json.loads((tmp_path / "q.json").read_text())
    assert len(summary["layers"]) == 14

    code, stdout, err = run(capsys, "info", out, "--json", tmp_path / "info.json")
    assert code == 0, err
    info = json.loads((tmp_path / "info.json").read_text())
    for key in ("method", "bits", "group_size", "bits_per_weight", "quantized_params", "file_bytes"):
        assert key in info
    assert info["method"] == method and info["bits"] == 3 and info["group_size"] == 32
    # 3 bit-planes (72 columns pad to 72) + 3 fp16 alphas + 1 fp16 offset per group of 32
    # (72 = 32 + 32 + 8 -> 3 groups a row); down_proj has 136 = 4 x 32 + 8 -> 5 groups.
    assert 3 + 16 * 4 * 3 / 72 - 0.5 < info["bits_per_weight"] < 3 + 16 * 4 * 5 / 136 + 0.5

    code, stdout, err = run(capsys, "eval", out, "--ppl", corpus_file, "--seq-len", "32", "--max-windows", "3",
                            "--no-progress", "--json", tmp_path / "eval.json")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    for key in ("ppl", "kl_vs_ref", "top1_agreement", "seq_len", "windows", "bits_per_weight"):
        assert key in report
    ppl = report["ppl"][str(corpus_file)]
    assert 1 < ppl < 1e4
    assert report["kl_vs_ref"] > 0 and 0 <= report["top1_agreement"] <= 1
    assert report["windows"][str(corpus_file)] == 3 and report["seq_len"] == 32
    assert report["bits_per_weight"] == pytest.approx(info["bits_per_weight"])
    settings = report["settings"]  # what was measured: a --max-windows run must not read as a full one
    assert (settings["max_windows"], settings["seq_len"], settings["datasets"]) == (3, 32, [str(corpus_file)])
    assert settings["limit"] is None and settings["device"] == "cpu"


def test_save_dtype_defaults_to_the_published_dtype(capsys, tmp_path, tiny_model_dir, corpus_file):
    """A bf16 model's checkpoint keeps bf16 embeddings (auto); eval computes in fp32 regardless."""
    source = tmp_path / "bf16-llama"
    shutil.copytree(tiny_model_dir, source)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(source)
    infos = {}
    for save_dtype in ("auto", "float32"):
        out = tmp_path / save_dtype
        code, _, err = run(capsys, "quantize", source, "--method", "rtn", "--bits", "3", "--group-size", "32",
                           "--out", out, "--no-progress", "--save-dtype", save_dtype)
        assert code == 0, err
        code, stdout, err = run(capsys, "info", out, "--json", tmp_path / f"{save_dtype}.json")
        assert code == 0, err
        infos[save_dtype] = json.loads((tmp_path / f"{save_dtype}.json").read_text())
    assert "bfloat16" in run(capsys, "info", tmp_path / "auto")[1]
    assert (infos["auto"]["dense_dtype"], infos["float32"]["dense_dtype"]) == ("bfloat16", "float32")
    assert infos["auto"]["file_bytes"] < infos["float32"]["file_bytes"]
    assert infos["auto"]["bits_per_weight"] == infos["float32"]["bits_per_weight"]
    figures = []
    for save_dtype in ("auto", "float32"):
        code, _, err = run(capsys, "eval", tmp_path / save_dtype, "--ppl", corpus_file, "--seq-len", "32",
                           "--max-windows", "2", "--no-progress", "--json", tmp_path / f"e-{save_dtype}.json")
        assert code == 0, err
        report = json.loads((tmp_path / f"e-{save_dtype}.json").read_text())
        figures.append((report["ppl"][str(corpus_file)], report["kl_vs_ref"]))
    assert figures[0] == figures[1]  # the bf16 values were exact, so both evaluate the same model
    code, _, err = run(capsys, "eval", source, "--ppl", corpus_file, "--seq-len", "32", "--max-windows", "2",
                       "--no-progress", "--json", tmp_path / "e-source.json")
    assert code == 0, err  # the unquantized model's bits/weight are as published, though computed in float32
    assert json.loads((tmp_path / "e-source.json").read_text())["bits_per_weight"] == 16


def test_published_dtype_is_read_from_the_weights_not_the_config(tmp_path, tiny_model_dir):
    """A config that says bfloat16 over float32 weights must not make `auto` round them."""
    from unibcq.models.loading import declared_dtype

    assert declared_dtype(str(tiny_model_dir)) == torch.float32
    config_file = tiny_model_dir / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"dtype": "bfloat16"}))
    assert declared_dtype(str(tiny_model_dir)) == torch.float32
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    assert declared_dtype(str(bf16)) == torch.bfloat16
    (bf16 / "model.safetensors").unlink()  # no local weights: the config decides
    assert declared_dtype(str(bf16)) == torch.bfloat16


def test_kl_reference_too_big_for_float32_runs_as_published_or_is_refused(capsys, tmp_path, tiny_model_dir,
                                                                          corpus_file, monkeypatch):
    """The reference's float32 size is read from its headers and checked before it loads."""
    import unibcq.memory

    source = tmp_path / "bf16-llama"
    shutil.copytree(tiny_model_dir, source)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(source)
    code, _, err = run(capsys, "quantize", source, "--method", "rtn", "--bits", "3", "--group-size", "32",
                       "--out", tmp_path / "q", "--no-progress")
    assert code == 0, err
    from unibcq.models.loading import float32_bytes

    needed = float32_bytes(str(source))
    assert needed == 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(source).parameters())
    evaluate = ["eval", tmp_path / "q", "--ppl", corpus_file, "--seq-len", "32", "--max-windows", "2", "--no-progress"]
    reports = {}
    for name, available in (("roomy", 100 * needed), ("half", needed)):
        monkeypatch.setattr(unibcq.memory, "available_memory_bytes", lambda device, a=available: a)
        code, _, err = run(capsys, *evaluate, "--json", tmp_path / f"{name}.json")
        assert code == 0, err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert "unibcq: note: the KL reference" in err and "runs in bfloat16, as published" in err
    assert (reports["roomy"]["ref_dtype"], reports["half"]["ref_dtype"]) == ("float32", "bfloat16")
    assert reports["half"]["kl_vs_ref"] == pytest.approx(reports["roomy"]["kl_vs_ref"], rel=0.2, abs=1e-3)
    monkeypatch.setattr(unibcq.memory, "available_memory_bytes", lambda device: needed // 4)
    code, _, err = run(capsys, *evaluate, "--json", tmp_path / "none.json")
    assert code == 2 and "--kl-ref none" in err and not (tmp_path / "none.json").exists()
    code, _, err = run(capsys, *evaluate, "--kl-ref", "none", "--json", tmp_path / "ppl.json")
    assert code == 0, err


def test_reference_dtype_follows_an_interrupted_run_and_the_gpu(tmp_path, tiny_model_dir, monkeypatch):
    """A resumed eval keeps the reference dtype its journal was measured with while it fits,
    and with --device cuda the GPU's free memory counts too."""
    import unibcq.memory
    from unibcq.cli import _reference_dtype
    from unibcq.models.loading import float32_bytes

    source = tmp_path / "bf16-llama"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(source)
    needed = float32_bytes(str(source))
    memory = {"cpu": 100 * needed, "cuda": 100 * needed}
    monkeypatch.setattr(unibcq.memory, "available_memory_bytes", lambda device: memory[device.type])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _reference_dtype(str(source), cpu) == torch.float32
    assert _reference_dtype(str(source), cpu, earlier=torch.bfloat16) == torch.bfloat16
    memory["cuda"] = needed
    assert _reference_dtype(str(source), cpu) == torch.float32
    assert _reference_dtype(str(source), cuda) == torch.bfloat16
    assert _reference_dtype(str(source), cuda, earlier=torch.float32) == torch.bfloat16  # no longer fits
    memory["cuda"] = needed // 4
    with pytest.raises(UnibcqError, match="--kl-ref none"):
        _reference_dtype(str(source), cuda)


def test_reference_size_reads_the_index_not_every_file(tmp_path, tiny_model_dir):
    from unibcq.models.loading import float32_bytes

    single = float32_bytes(str(tiny_model_dir))
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="60KB")
    shutil.copy(tiny_model_dir / "model.safetensors", sharded / "consolidated.safetensors")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert float32_bytes(str(sharded)) == single


@pytest.mark.parametrize("value", ["float64", "int8"])
def test_save_dtype_rejects_other_dtypes(capsys, tmp_path, tiny_model_dir, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(tiny_model_dir), "--method", "rtn", "--out", str(tmp_path / "q"), "--save-dtype", value])
    assert exit_info.value.code == 2
    assert "--save-dtype: invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_eval_full_precision_model_has_no_kl(capsys, tmp_path, tiny_model_dir, corpus_file):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", corpus_file, "--seq-len", "32",
                       "--max-windows", "2", "--no-progress", "--json", tmp_path / "e.json")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["kl_vs_ref"] is None and report["bits_per_weight"] == 32


def test_eval_kl_against_itself_is_zero(capsys, tmp_path, tiny_model_dir, corpus_file):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", corpus_file, "--seq-len", "32",
                       "--max-windows", "2", "--kl-ref", tiny_model_dir, "--no-progress", "--json", tmp_path / "e.json")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["kl_vs_ref"] == pytest.approx(0, abs=1e-6) and report["top1_agreement"] == 1.0


@pytest.mark.skipif(not os.environ.get("UNIBCQ_DATA_DIR"), reason="needs UNIBCQ_DATA_DIR (the shared datasets)")
def test_eval_on_wikitext2_and_ptb(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", "wikitext2,ptb", "--seq-len", "32",
                       "--max-windows", "2", "--no-progress", "--json", tmp_path / "e.json")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert set(report["ppl"]) == {"wikitext2", "ptb"}


def test_overrides_and_lm_head(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", "2", "--group-size", "-1",
                       "--override", "*.mlp.down_proj:bits=4,group_size=64", "--quantize-lm-head",
                       "--out", out, "--no-progress")
    assert code == 0, err
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["bits"] == 4
    assert layers["model.layers.0.mlp.down_proj"]["group_size"] == 64
    assert layers["model.layers.0.mlp.up_proj"]["bits"] == 2
    assert "lm_head" in layers


BAD_QUANTIZE = [
    (["--bits", "9"], "bits"),
    (["--bits", "0"], "bits"),
    (["--bits", "-1"], "bits"),
    (["--group-size", "0"], "group size"),
    (["--group-size", "-2"], "group size"),
    (["--method", "awq"], "unknown method"),
    (["--override", "nocolon"], "override"),
    (["--override", "*:bits=x"], "integer"),
    (["--override", "*:bits=2,bits=4"], "bits is given twice"),
    (["--override", "*.down_proj:bits=4", "--override", "*.down_proj:group_size=64"], "'*.down_proj' is given twice"),
    (["--method", "dyngroup", "--override", "*.down_proj:bits=2"], "got 2 (--override *.down_proj)"),
]


@pytest.mark.parametrize("extra,needle", BAD_QUANTIZE, ids=[" ".join(e) for e, _ in BAD_QUANTIZE])
def test_bad_quantize_flags(capsys, tmp_path, tiny_model_dir, extra, needle):
    out = tmp_path / "q"
    args = ["quantize", tiny_model_dir, "--method", "rtn", "--out", out, "--no-progress"]
    code, _, err = run(capsys, *args, *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unibcq: error:") and needle in lines[0].lower()
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("argv,needle", [
    (["generate", "somewhere"], "the following arguments are required: --prompt (see unibcq generate --help)"),
    (["quantize", "m", "--method", "rtn", "--out", "o", "--bits", "2.5"], "argument --bits: invalid int value: '2.5'"),
    (["generate", "m", "--prompt", "p", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    # an unknown flag points at the help of the subcommand that was given it, not at the top level's
    (["quantize", "m", "--method", "rtn", "--out", "o", "--bogus"],
     "unrecognized arguments: --bogus (see unibcq quantize --help)"),
    (["bench", "kernels", "--bogus"], "unrecognized arguments: --bogus (see unibcq bench kernels --help)"),
    # no abbreviations: --sym set --symmetric past the note naming the flags a method ignores
    (["quantize", "m", "--method", "bcq-alternating", "--out", "o", "--sym"],
     "unrecognized arguments: --sym (see unibcq quantize --help)"),
])
def test_usage_errors_are_one_line_too(capsys, argv, needle):
    """argparse's own errors read like every other unibcq error: one line, exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("unibcq: error: ") and needle in err


def test_every_argument_of_every_subcommand_has_help_text():
    import argparse

    from unibcq.cli import build_parser

    def undocumented(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield from undocumented(subparser, f"{name} {sub}")
            elif not action.help:
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"

    assert list(undocumented(build_parser(), "unibcq")) == []


def test_version(capsys):
    from unibcq import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"unibcq {__version__}"


@pytest.mark.parametrize("method", ["gptq", "uniquanf"])
def test_nan_weights_are_named_before_calibration(capsys, tmp_path, nan_model_dir, corpus_file, method):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", nan_model_dir, "--method", method, "--out", out, "--calib", corpus_file,
                       "--calib-samples", "2", "--seq-len", "16", "--no-progress")
    assert code == 2 and "layers.1.mlp.up_proj.weight has 1 NaN/inf" in err
    assert not out.exists() and not (tmp_path / "q.partial").exists()



def test_nan_weights_are_named_by_eval_and_generate(capsys, tmp_path, nan_model_dir, tiny_model_dir, corpus_file):
    """Run as it is, a model with a NaN weight gives perplexity NaN or empty text: say why instead."""
    for argv in (("eval", nan_model_dir, "--ppl", corpus_file, "--kl-ref", "none", "--no-progress"),
                 ("eval", tiny_model_dir, "--ppl", corpus_file, "--kl-ref", nan_model_dir, "--no-progress"),
                 ("generate", nan_model_dir, "--prompt", "w1")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "layers.1.mlp.up_proj.weight has 1 NaN/inf" in err, argv


def test_a_foreign_folder_where_the_run_state_goes_is_refused(capsys, tmp_path, tiny_model_dir, corpus_file):
    """OUT.partial is where a calibrated run keeps its progress and what it deletes when done: a
    folder of other files there (even the source model) is refused, not adopted and deleted."""
    notes = tmp_path / "q.partial" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    for resume in ((), ("--resume",)):
        code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "gptq", "--out", tmp_path / "q", "--calib",
                           corpus_file, "--calib-samples", "2", "--seq-len", "16", "--no-progress", *resume)
        assert code == 2 and "holds other files" in err
        assert notes.read_text() == "mine" and not (tmp_path / "q").exists()


@pytest.mark.parametrize("extra", [["--method", "rtn"], ["--method", "gptq", "--data-dir", "missing"],
                                   ["--method", "rtn", "--max-memory", "1GiB"]])
def test_an_unsupported_architecture_is_refused_from_its_config(capsys, tmp_path, corpus_file, extra):
    """Before its weights are read (for a Hub id, downloaded) or any calibration text: a folder
    holding a GPT-2 config alone gets the refusal, not a complaint about what it lacks."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, _, err = run(capsys, "quantize", tmp_path / "gpt2", "--out", tmp_path / "q", "--no-progress", *extra)
    assert code == 2 and "unsupported architecture 'gpt2'" in err
    code, _, err = run(capsys, "compare", tmp_path / "gpt2", "--methods", "rtn", "--bits", "3", "--ppl", corpus_file,
                       "--out", tmp_path / "c", "--no-progress")
    assert code == 2 and "unsupported architecture 'gpt2'" in err

def test_windows_past_the_context_are_capped_or_refused(capsys, tmp_path, tiny_model_dir, corpus_file):
    """The tiny model's context is 64 positions: past it nothing was trained."""
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", corpus_file, "--max-windows", "1", "--no-progress",
                       "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "capped there (--seq-len 2048)" in err and json.loads((tmp_path / "e.json").read_text())["seq_len"] == 64

    common = ["quantize", tiny_model_dir, "--method", "gptq", "--calib", corpus_file, "--calib-samples", "2",
              "--group-size", "32", "--no-progress"]
    code, _, err = run(capsys, *common, "--out", tmp_path / "explicit", "--seq-len", "65")
    assert code == 2 and "calibration windows of 65 tokens exceed the model's context window of 64" in err
    assert not (tmp_path / "explicit").exists() and not (tmp_path / "explicit.partial").exists()
    code, _, err = run(capsys, *common, "--out", tmp_path / "preset")  # fast preset: 256-token windows
    assert code == 0, err
    assert "preset's 256-token calibration windows exceed the model's context; using 64" in err
    stored = json.loads((tmp_path / "preset" / "config.json").read_text())["quantization_config"]
    assert stored["calib_seq_len"] == 64


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "max-memory"])
@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"])
def test_nan_outside_the_linear_layers_is_refused(capsys, tmp_path, nan_model_dir, tensor, streaming):
    """A NaN embedding or norm is not quantized, but a checkpoint holding it would be called corrupt
    on load: refuse it at quantize time, naming the tensor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nan_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.nan_to_num_(0.0)
        model.get_parameter(tensor)[1] = float("nan")
    source = nan_model_dir
    model.save_pretrained(source)
    out = tmp_path / "q"
    extra = ["--max-memory", "2GiB"] if streaming else []
    code, _, err = run(capsys, "quantize", source, "--method", "rtn", "--out", out, "--no-progress", *extra)
    assert code == 2 and tensor in err and "NaN/inf" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_nan_weights_fail_cleanly(capsys, tmp_path, nan_model_dir):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", nan_model_dir, "--method", "bcq-greedy", "--out", out, "--no-progress")
    assert code == 2
    assert "model.layers.1.mlp.up_proj" in err and "NaN" in err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("model", ["no-such-alias-or/dir/x", "./missing-dir", "missing.gguf"])
def test_unknown_model(capsys, tmp_path, model):
    code, _, err = run(capsys, "quantize", model, "--method", "rtn", "--out", tmp_path / "q", "--no-progress")
    assert code == 2 and err.startswith("unibcq: error:")
    assert not (tmp_path / "q").exists()


def test_missing_data_file(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", tmp_path / "nope.txt", "--no-progress")
    assert code == 2 and "not found" in err


def test_missing_known_dataset(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", "ptb", "--data-dir", tmp_path, "--no-progress")
    assert code == 2 and "ptb" in err and "not found" in err


def test_existing_output_is_kept(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--out", out, "--no-progress")
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_an_earlier_checkpoint(capsys, tmp_path, tiny_model_dir, monkeypatch):
    quantize = ("quantize", tiny_model_dir, "--method", "rtn", "--no-progress", "--overwrite", "--out")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    code, _, err = run(capsys, *quantize, mine)
    assert code == 2 and "not a unibcq checkpoint" in err and (mine / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, *quantize, tiny_model_dir)
    assert code == 2 and "model being quantized" in err and (Path(tiny_model_dir) / "config.json").is_file()
    monkeypatch.chdir(mine)
    code, _, err = run(capsys, *quantize, ".")
    assert code == 2 and "working directory" in err and (mine / "keep.txt").is_file()
    earlier = tmp_path / "earlier"
    assert run(capsys, *quantize, earlier)[0] == 0
    assert run(capsys, *quantize, earlier)[0] == 0  # an earlier checkpoint is what --overwrite is for
    (earlier / "eval_results").mkdir()
    (earlier / "eval_results" / "wikitext2.json").write_text("{}")  # a user's report kept inside it
    code, _, err = run(capsys, *quantize, earlier)
    assert code == 2 and "files the checkpoint did not write (eval_results/wikitext2.json)" in err
    assert (earlier / "eval_results" / "wikitext2.json").read_text() == "{}"


def test_a_truncated_source_model_is_a_clear_error(capsys, tmp_path, tiny_model_dir, corpus_file):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run(capsys, "quantize", bad, "--method", "rtn", "--out", tmp_path / "q", "--no-progress")
    assert code == 2 and "truncated or corrupt" in err and not (tmp_path / "q").exists()
    code, _, err = run(capsys, "eval", tiny_model_dir, "--kl-ref", bad, "--ppl", corpus_file, "--seq-len", "16",
                       "--no-progress")
    assert code == 2 and "truncated or corrupt" in err


def test_a_kl_reference_without_perplexity_is_refused_not_ignored(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", "none", "--tasks", "piqa", "--kl-ref",
                       tmp_path / "nowhere", "--no-progress")
    assert code == 2 and "--kl-ref applies to perplexity" in err


def test_a_kl_reference_with_another_vocabulary_is_refused(capsys, tmp_path, tiny_model_dir, corpus_file, tiny_llama):
    other = tmp_path / "other-vocab"
    tiny_llama(seed=3, vocab_size=300).save_pretrained(other)
    code, _, err = run(capsys, "eval", tiny_model_dir, "--kl-ref", other, "--ppl", corpus_file, "--seq-len", "16",
                       "--no-progress")
    assert code == 2 and "same vocabulary" in err and "300" in err


def test_perplexity_windows_fit_the_kl_reference_too(capsys, tmp_path, tiny_model_dir, corpus_file, tiny_llama):
    short = tmp_path / "short-context"
    tiny_llama(seed=1, vocab_size=256, max_position_embeddings=32).save_pretrained(short)
    code, _, err = run(capsys, "eval", tiny_model_dir, "--kl-ref", short, "--ppl", corpus_file, "--seq-len", "64",
                       "--max-windows", "1", "--no-progress", "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "the KL reference's context holds 32 positions" in err
    assert json.loads((tmp_path / "e.json").read_text())["seq_len"] == 32


def test_output_paths_that_cannot_be_written_fail_before_any_work(capsys, tmp_path, tiny_model_dir, corpus_file):
    quantize = ("quantize", tiny_model_dir, "--method", "rtn", "--no-progress")
    code, _, err = run(capsys, *quantize, "--out", corpus_file / "q")
    assert code == 2 and "is a file" in err
    code, _, err = run(capsys, *quantize, "--out", corpus_file)
    assert code == 2 and "--out" in err and "is a file" in err
    code, _, err = run(capsys, *quantize, "--out", tmp_path / "q", "--json", tmp_path)
    assert code == 2 and "is a directory" in err and not (tmp_path / "q").exists()
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", corpus_file, "--json", corpus_file / "e.json")
    assert code == 2 and "--json" in err


def test_a_checkpoint_whose_source_model_is_gone_names_the_kl_reference(capsys, tmp_path, tiny_model_dir,
                                                                         corpus_file):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    out = tmp_path / "q"
    assert run(capsys, "quantize", source, "--method", "rtn", "--out", out, "--no-progress")[0] == 0
    shutil.rmtree(source)
    eval_args = ("eval", out, "--ppl", corpus_file, "--seq-len", "16", "--max-windows", "1", "--no-progress")
    code, _, err = run(capsys, *eval_args)
    assert code == 2 and "default KL reference" in err and "--kl-ref none" in err
    assert run(capsys, *eval_args, "--kl-ref", "none")[0] == 0


def test_a_source_model_that_cannot_be_loaded_is_named_as_the_checkpoints_source(capsys, tmp_path, tiny_model_dir,
                                                                                  corpus_file):
    """A checkpoint saved from Python with a source that does not resolve here: the error says
    that it is the recorded source (tokenizer, default KL reference) and what to do."""
    import unibcq

    model = unibcq.load_model(str(tiny_model_dir))
    config = unibcq.QuantConfig("rtn", bits=3, group_size=32)
    unibcq.quantize(model, config)
    bare = unibcq.save(model, tmp_path / "bare", config, source_model="no-such-source-model")
    eval_args = ("--ppl", corpus_file, "--seq-len", "16", "--max-windows", "1", "--no-progress")
    code, _, err = run(capsys, "eval", bare, *eval_args, "--kl-ref", "none")
    assert code == 2 and "holds no tokenizer" in err and "'no-such-source-model'" in err
    tokenizer = unibcq.load_tokenizer(str(tiny_model_dir))
    with_tokenizer = unibcq.save(model, tmp_path / "tok", config, source_model="no-such-source-model",
                                 tokenizer=tokenizer)
    code, _, err = run(capsys, "eval", with_tokenizer, *eval_args)
    assert code == 2 and "recorded source model 'no-such-source-model'" in err and "--kl-ref none" in err
    assert run(capsys, "eval", with_tokenizer, *eval_args, "--kl-ref", "none")[0] == 0


@pytest.mark.parametrize(("method", "hint"), [("gptq", True), ("rtn", False)])
def test_an_interrupted_calibrated_run_points_at_resume(capsys, tmp_path, tiny_model_dir, monkeypatch, method, hint):
    import unibcq.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "quantize", interrupted)
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", method, "--out", tmp_path / "q")
    assert code == 130 and err.startswith("unibcq: interrupted") and ("--resume" in err) == hint


def test_flags_the_method_does_not_read_are_reported(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--no-offset", "--epochs", "3",
                       "--symmetric", "--out", tmp_path / "q", "--no-progress")
    assert code == 0 and "rtn does not read --no-offset, --epochs; ignored" in err
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "bcq-greedy", "--out", tmp_path / "b",
                       "--no-progress")
    assert code == 0 and "does not read" not in err
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "dyngroup", "--group-size", "32",
                       "--workers", "2", "--out", tmp_path / "d", "--no-progress")
    assert code == 0 and "dyngroup does not read --group-size; ignored" in err, err


def test_corrupt_checkpoint_cli(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    assert run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--out", out, "--no-progress")[0] == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    text = tmp_path / "x.txt"
    text.write_text("w1 w2 w3 " * 50)
    for command in (["info", out], ["eval", out, "--ppl", text]):
        code, _, err = run(capsys, *command)
        assert code == 2 and ("corrupt" in err.lower() or "truncated" in err.lower())
    (out / "config.json").write_text("{not json")
    code, _, err = run(capsys, "info", out)
    assert code == 2 and "JSON" in err


def test_console_script(tmp_path, tiny_model_dir):
    """The installed entry point runs and maps errors to exit code 2."""
    exe = Path(sys.executable).with_name("unibcq")
    result = subprocess.run([str(exe), "quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "12",
                             "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("unibcq: error: bits")


@pytest.mark.parametrize("rule", ["objective", "paper"])
def test_dyngroup_cli_reports_three_bit_counts(capsys, tmp_path, tiny_model_dir, rule):
    out = tmp_path / "dg"
    code, stdout, err = run(capsys, "quantize", tiny_model_dir, "--method", "dyngroup", "--max-groups", "4",
                            "--window", "8", "--merge-rule", rule, "--raw-lambda", "--out", out, "--no-progress")
    assert code == 0, err
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["merge_rule"] == rule and qcfg["normalize_lambda"] is False
    assert "bits paper" in stdout and "bits entropy" in stdout
    code, stdout, err = run(capsys, "info", out, "--json", tmp_path / "info.json")
    assert code == 0, err
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["method"] == "dyngroup" and info["bits"] == 1
    assert info["bits_per_weight_paper"] < info["bits_per_weight_entropy"] <= info["bits_per_weight_fixed"]
    # The file stores a fixed-length 2-bit index: 1 + 2 + scales.
    assert info["bits_per_weight"] == pytest.approx(info["bits_per_weight_fixed"], rel=0.02)
    assert "paper: no index" in stdout and "dynamic (unstructured groups)" in stdout


def test_dyngroup_rejects_other_bit_widths(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "dyngroup", "--bits", "2",
                       "--out", tmp_path / "dg", "--no-progress")
    assert code == 2 and "1-bit" in err and not (tmp_path / "dg").exists()


@pytest.mark.parametrize("method,extra", [
    ("gptq", ["--act-order"]),
    ("gptq-bcq", ["--true-sequential"]),
    ("uniquanf", ["--epochs", "1", "--iters", "2"]),
    ("flexround", ["--epochs", "1"]),
])
def test_calibrated_methods(capsys, tmp_path, tiny_model_dir, corpus_file, method, extra):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_model_dir, "--method", method, "--bits", "3",
                            "--group-size", "32", "--calib", corpus_file, "--calib-samples", "4", "--seq-len", "16",
                            "--out", out, "--no-progress", "--json", tmp_path / "q.json", *extra)
    assert code == 0, err
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["method"] == method and qcfg["calib"] == str(corpus_file)
    layers = json.loads((tmp_path / "q.json").read_text())["layers"]
    # a layer trained jointly with its block has no time of its own (the block table gives it)
    assert all((r["seconds"] is None) == (method in ("uniquanf", "flexround")) for r in layers)
    assert qcfg["calib_samples"] == 4 and qcfg["calib_seq_len"] == 16
    code, _, err = run(capsys, "eval", out, "--ppl", corpus_file, "--seq-len", "32", "--max-windows", "2",
                       "--no-progress")
    assert code == 0, err


@pytest.mark.parametrize("method", ["gptq", "uniquanf"])
def test_max_memory_onloads_calibrated_methods_to_the_same_checkpoint(capsys, tmp_path, tiny_model_dir, corpus_file,
                                                                       method):
    common = ["--method", method, "--bits", "3", "--group-size", "32", "--calib", corpus_file, "--calib-samples", "4",
              "--seq-len", "16", "--epochs", "1", "--no-progress"]
    code, _, err = run(capsys, "quantize", tiny_model_dir, *common, "--out", tmp_path / "in-memory")
    assert code == 0, err
    code, stdout, err = run(capsys, "quantize", tiny_model_dir, *common, "--max-memory", "4GiB",
                            "--out", tmp_path / "onloaded")
    assert code == 0, err
    expected = load_file(str(tmp_path / "in-memory" / "model.safetensors"))
    got = load_file(str(tmp_path / "onloaded" / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("method,checks_before_block_2", [("gptq", 1 + 2 * 7), ("uniquanf", 1 + 2 * 5)])
def test_max_memory_is_enforced_while_the_run_goes(capsys, tmp_path, deep_model_dir, corpus_file, monkeypatch,
                                                   method, checks_before_block_2):
    """A run whose memory passes the budget mid-way stops with its finished blocks kept, and
    --resume (with room) finishes it to the checkpoint of a run that never stopped."""
    import unibcq.memory

    common = ["--method", method, "--bits", "3", "--group-size", "32", "--calib", corpus_file, "--calib-samples", "4",
              "--seq-len", "16", "--epochs", "1", "--no-progress", "--max-memory", "4GiB"]
    checks = []

    def peak_in_block_2() -> int:  # the cap's first reading, then one per layer (gptq) or step + block end
        checks.append(None)
        return 5 * 2**30 if len(checks) > checks_before_block_2 else 2**30

    monkeypatch.setattr(unibcq.memory, "peak_resident_bytes", peak_in_block_2)
    code, _, err = run(capsys, "quantize", deep_model_dir, *common, "--out", tmp_path / "q")
    assert code == 2
    assert "5120 MiB in " in err and "past the --max-memory budget of 4096 MiB" in err and "--resume" in err
    assert not (tmp_path / "q").exists()
    assert json.loads((tmp_path / "q.partial" / "state.json").read_text())["completed"] == 2
    monkeypatch.undo()
    code, _, err = run(capsys, "quantize", deep_model_dir, *common, "--out", tmp_path / "q", "--resume")
    assert code == 0, err
    code, _, err = run(capsys, "quantize", deep_model_dir, *common, "--out", tmp_path / "whole")
    assert code == 0, err
    resumed, whole = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_max_memory_spills_activations_when_only_they_do_not_fit(capsys, tmp_path, tiny_model_dir, corpus_file,
                                                                 monkeypatch):
    import unibcq.methods.onload as onload
    from unibcq.memory import peak_resident_bytes
    from unibcq.methods.onload import memory_estimate, onload_model

    # The budget is enforced on the whole process while the run goes: count this test
    # process's own footprint (a pytest worker outgrows a fresh CLI's) as the baseline.
    monkeypatch.setattr(onload, "BASELINE_BYTES", max(onload.BASELINE_BYTES, peak_resident_bytes() + 2**29))

    common = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--calib", corpus_file, "--calib-samples", "4",
              "--seq-len", "16", "--no-progress"]
    model, _ = onload_model(tiny_model_dir)
    budget = memory_estimate(model, "gptq", 4, 16, 3, spill=True)  # below the in-memory estimate
    code, _, err = run(capsys, "quantize", tiny_model_dir, *common, "--out", tmp_path / "in-memory")
    assert code == 0, err
    code, _, err = run(capsys, "quantize", tiny_model_dir, *common, "--max-memory", str(budget),
                       "--out", tmp_path / "spilled")
    assert code == 0, err
    assert "unibcq: note: calibration activations go to disk" in err
    code, _, err = run(capsys, "quantize", tiny_model_dir, *common, "--max-memory", str(budget - 1),
                       "--out", tmp_path / "refused")
    assert code == 2 and "even with the calibration activations on disk" in err
    expected = load_file(str(tmp_path / "in-memory" / "model.safetensors"))
    got = load_file(str(tmp_path / "spilled" / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_spill_activations_is_refused_for_per_matrix_methods(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", "3", "--group-size", "32",
                       "--spill-activations", "--out", out, "--no-progress")
    assert code == 2 and "--spill-activations is for calibrated methods" in err and not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["--preset", "huge"], "preset"),
    (["--input-prob", "2"], "input_prob"),
    (["--epochs", "0"], "epochs"),
    (["--calib", "missing-file.txt"], "not found"),
    (["--device", "cuda:7"], "cuda"),
])
def test_calibrated_bad_input(capsys, tmp_path, tiny_model_dir, extra, needle):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "uniquanf", "--calib-samples", "2",
                       "--seq-len", "8", "--out", out, "--no-progress", *extra)
    assert code == 2 and needle in err.lower() and not out.exists()
    assert leftovers(tmp_path) == []


def test_sigkilled_run_resumes_to_the_same_checkpoint(capsys, tmp_path, deep_model_dir, corpus_file):
    """SIGKILL a real `unibcq quantize` after its first block; --resume finishes it identically."""
    from safetensors.torch import load_file

    flags = ["--method", "uniquanf", "--bits", "2", "--group-size", "32", "--calib", str(corpus_file),
             "--calib-samples", "4", "--seq-len", "16", "--epochs", "12", "--iters", "2", "--no-progress"]
    killed_out = tmp_path / "killed"
    state = tmp_path / "killed.partial"
    exe = Path(sys.executable).with_name("unibcq")
    proc = subprocess.Popen([str(exe), "quantize", str(deep_model_dir), *flags, "--out", str(killed_out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (state / "state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished (or failed) before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert not killed_out.exists()
    assert json.loads((state / "state.json").read_text())["completed"] in (1, 2, 3)

    code, _, err = run(capsys, "quantize", deep_model_dir, *flags, "--out", killed_out)
    assert code == 2 and "--resume" in err and state.is_dir()
    code, _, err = run(capsys, "quantize", deep_model_dir, *flags, "--out", killed_out, "--resume")
    assert code == 0, err
    assert not state.exists()
    code, _, err = run(capsys, "quantize", deep_model_dir, *flags, "--out", tmp_path / "whole")
    assert code == 0, err
    resumed, whole = load_file(str(killed_out / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.parametrize("extra,hint", [([], True), (["--max-memory", "4GiB"], False)])
def test_a_per_matrix_method_on_a_gpu_says_it_runs_on_the_cpu(capsys, tmp_path, tiny_model_dir, monkeypatch,
                                                              extra, hint):
    """--device names where calibrated blocks run; rtn never moves, and says so (the hint to use
    --workers is left out where streaming refuses it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # rtn never touches the GPU
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", "3", "--group-size", "32",
                       "--device", "cuda", "--out", tmp_path / "rtn", "--no-progress", *extra)
    assert code == 0, err
    assert "rtn quantizes each matrix on the CPU" in err and ("--workers" in err) == hint


@pytest.mark.parametrize("command,inside", [("quantize", "model"), ("quantize", "out"), ("eval", "data"),
                                            ("eval", "model")])
def test_json_never_lands_on_what_the_command_reads(capsys, tmp_path, tiny_model_dir, corpus_file, command, inside):
    """--json pointed at an input (the model's weights, the text being scored) or into --out would
    replace it with the report; it is refused before any work, and every file is left as it was."""
    out = tmp_path / "q"
    target = {"model": Path(tiny_model_dir) / "model.safetensors", "out": out / "config.json",
              "data": Path(corpus_file)}[inside]
    before = {path: path.read_bytes() for path in (target, Path(corpus_file)) if path.exists()}
    args = (["quantize", tiny_model_dir, "--method", "rtn", "--out", out] if command == "quantize"
            else ["eval", tiny_model_dir, "--ppl", corpus_file, "--kl-ref", "none", "--max-windows", "1"])
    code, _, err = run(capsys, *args, "--json", target, "--no-progress")
    assert code == 2 and "--json" in err and "which this command reads or writes" in err
    assert {path: path.read_bytes() for path in before} == before and not out.exists()


def test_json_never_lands_on_a_checkpoints_source_model(capsys, tmp_path, tiny_model_dir, corpus_file):
    """A checkpoint's source model is read too (the default KL reference); a report beside the
    checkpoint, or beside the source model under a new name, stays allowed."""
    out = tmp_path / "q"
    assert run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--group-size", "32", "--out", out,
               "--no-progress")[0] == 0
    config = Path(tiny_model_dir) / "config.json"
    before = config.read_bytes()
    eval_args = ["eval", out, "--ppl", corpus_file, "--max-windows", "1", "--no-progress", "--json"]
    code, _, err = run(capsys, *eval_args, config)
    assert code == 2 and "which this command reads or writes" in err and config.read_bytes() == before
    for allowed in (out / "eval.json", Path(tiny_model_dir) / "eval-of-q.json"):
        code, _, err = run(capsys, *eval_args, allowed)
        assert code == 0 and allowed.is_file(), err


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """`kill` and `timeout` send SIGTERM: the write in progress is removed, not left as a hidden
    full-size folder, and the exit says what happened (143, as a shell reports SIGTERM)."""
    script = f"""
import os, signal, sys, time
from unibcq import cli
from unibcq.atomic import atomic_directory

def writing_when_killed(args):
    with atomic_directory(args.out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 4096)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

cli.COMMANDS["quantize"] = writing_when_killed
sys.exit(cli.main(["quantize", "any-model", "--method", "rtn", "--out", {str(tmp_path / "q")!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "unibcq: terminated", proc.stderr
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", ["disk full", "safetensors I/O"])
def test_a_write_the_machine_refuses_is_one_line_and_leaves_nothing(capsys, tmp_path, tiny_model_dir, monkeypatch,
                                                                   failure):
    from safetensors import SafetensorError

    from unibcq import checkpoint

    def refuse(*args, **kwargs):
        if failure == "disk full":
            raise OSError(28, "No space left on device", str(args[1]))
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(checkpoint, "save_file", refuse)
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--out", out, "--no-progress")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("unibcq: error:"), err
    assert ("No space left" if failure == "disk full" else "File too large") in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_misaimed_paths_are_named_for_what_they_are(capsys, tmp_path, tiny_model_dir):
    a_file, a_folder = tmp_path / "notes.txt", tmp_path / "texts"
    a_file.write_text("hello")
    a_folder.mkdir()
    code, _, err = run(capsys, "info", a_file)
    assert code == 2 and "is a file; a checkpoint is the directory" in err
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", a_folder, "--kl-ref", "none", "--no-progress")
    assert code == 2 and "is a directory; give a text file" in err


@pytest.mark.parametrize("extra", [[], ["--max-memory", "2GiB"]], ids=["in-memory", "max-memory"])
def test_a_model_without_decoder_layers_is_refused_for_what_it_is(capsys, tmp_path, tiny_llama, tiny_model_dir,
                                                                   extra):
    empty = tmp_path / "no-layers"
    tiny_llama(seed=0, num_hidden_layers=0).save_pretrained(empty)
    for tokenizer_file in Path(tiny_model_dir).glob("tokenizer*"):
        shutil.copy(tokenizer_file, empty)
    code, _, err = run(capsys, "quantize", empty, "--method", "rtn", "--out", tmp_path / "q", "--no-progress",
                       *extra)
    assert code == 2 and "no decoder linear layers to quantize" in err and not (tmp_path / "q").exists()


def test_more_workers_than_cpus_get_a_note(capsys, monkeypatch):
    from unibcq import cli

    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cli._check_workers(2)
    assert capsys.readouterr().err == ""
    cli._check_workers(3)
    assert "--workers 3 exceeds the 2 CPUs" in capsys.readouterr().err
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: object() if name == "ray" else real(name, *a))
    cli._check_workers(64, backend="ray")
    assert capsys.readouterr().err == ""


def test_budget_and_backend_mistakes_are_refused_before_the_model_loads(capsys, tmp_path, tiny_model_dir,
                                                                        corpus_file, monkeypatch):
    """Without Ray, --backend ray failed only once the model had loaded; --backend ray under
    --max-memory ran locally without a word; an empty --max-memory meant no budget at all."""
    import unibcq.models
    from unibcq import cli

    monkeypatch.setattr(unibcq.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    quantize = ["quantize", tiny_model_dir, "--out", tmp_path / "q", "--no-progress"]
    code, _, err = run(capsys, *quantize, "--method", "rtn", "--backend", "ray")
    assert code == 2 and "--backend ray needs Ray" in err
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: object() if name == "ray" else real(name, *a))
    code, _, err = run(capsys, *quantize, "--method", "rtn", "--backend", "ray", "--max-memory", "4GiB")
    assert code == 2 and "drop --workers and --backend" in err
    code, _, err = run(capsys, *quantize, "--method", "gptq", "--calib", corpus_file, "--max-memory", "")
    assert code == 2 and "is not a memory size" in err
    assert not (tmp_path / "q").exists()


def test_a_dead_worker_process_is_one_clear_error(tiny_llama, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    import unibcq
    from unibcq.methods import per_matrix

    def broken(*args, **kwargs):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")
        yield  # a generator, as the real one

    monkeypatch.setattr(per_matrix, "_bounded", broken)
    with pytest.raises(unibcq.UnibcqError, match="a worker process died .* fewer --workers"):
        unibcq.quantize(tiny_llama(), unibcq.QuantConfig("rtn", group_size=32), show_progress=False, workers=2)


def test_eval_notes_when_the_source_model_changed_since_quantizing(capsys, tmp_path, tiny_model_dir, corpus_file):
    out = tmp_path / "q"
    assert run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--group-size", "32", "--out", out,
               "--no-progress")[0] == 0
    eval_args = ["eval", out, "--ppl", corpus_file, "--max-windows", "1", "--no-progress"]
    code, _, err = run(capsys, *eval_args)
    assert code == 0 and "changed" not in err
    config = Path(tiny_model_dir) / "config.json"
    config.write_text(config.read_text() + "\n")
    code, _, err = run(capsys, *eval_args)
    assert code == 0 and "the default KL reference, changed" in err


def test_from_preset_builds_what_the_cli_builds(tmp_path, tiny_model_dir, corpus_file, capsys):
    from unibcq.config import QuantConfig

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--method", "gptq", "--bits", "2", "--group-size", "32",
                 "--calib", str(corpus_file), "--calib-samples", "4", "--seq-len", "16", "--out", str(out),
                 "--no-progress"]) == 0, capsys.readouterr().err
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    built = QuantConfig.from_preset("gptq", calib=str(corpus_file), bits=2, group_size=32, calib_samples=4,
                                    calib_seq_len=16)
    assert {k: v for k, v in stored.items() if k in built.to_dict()} == json.loads(json.dumps(built.recorded()))


def test_a_missing_data_source_is_refused_before_any_model_loads(capsys, tmp_path, tiny_model_dir, corpus_file,
                                                                  monkeypatch):
    """eval --ppl, quantize --calib and compare --calib name a missing file at once, not after
    loading the model (compare: after measuring the unquantized row, possibly for hours)."""
    import unibcq.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the data source was checked")

    monkeypatch.setattr(unibcq.models, "load_model", no_loading)
    missing = tmp_path / "nosuch.txt"
    for argv in (("eval", tiny_model_dir, "--ppl", missing, "--no-progress"),
                 ("quantize", tiny_model_dir, "--method", "gptq", "--calib", missing, "--out", tmp_path / "q",
                  "--no-progress"),
                 ("compare", tiny_model_dir, "--methods", "rtn,gptq", "--bits", "3", "--calib", missing,
                  "--ppl", corpus_file, "--out", tmp_path / "report", "--no-progress")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"data file {missing} not found" in err, argv
    code, _, err = run(capsys, "eval", tiny_model_dir, "--ppl", tmp_path / "rows.json", "--no-progress")
    assert code == 2 and "give JSON lines (.jsonl" in err
