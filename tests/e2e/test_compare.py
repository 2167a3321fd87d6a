"""`unibcq compare` end to end on a tiny model: cells, report, plots, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unibcq.cli import main
from unibcq.errors import UnibcqError
from unibcq.report import Cell, plan_cells

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _piqa_dir(root: Path) -> Path:
    piqa = root / "zeroshot" / "piqa"
    piqa.mkdir(parents=True)
    (piqa / "valid.jsonl").write_text("".join(
        json.dumps({"goal": f"w{i} w{i + 1}", "sol1": f"w{i + 2}", "sol2": f"w{i + 40} w{i + 41}"}) + "\n"
        for i in range(6)))
    (piqa / "valid-labels.lst").write_text("0\n1\n0\n1\n0\n1\n")
    return root


def test_plan_cells():
    assert plan_cells(["rtn", "dyngroup", "gptq"], [2, 3], 128) == [
        Cell("rtn", 2, 128), Cell("rtn", 3, 128), Cell("dyngroup", 1, -1), Cell("gptq", 2, 128), Cell("gptq", 3, 128)]
    assert Cell("rtn", 3, -1).name == "rtn-w3-g-1"
    with pytest.raises(UnibcqError, match="unknown method"):
        plan_cells(["rtn", "magic"], [3], 128)
    with pytest.raises(UnibcqError, match="at least one"):
        plan_cells([], [3], 128)


def test_a_one_bit_uniform_cell_takes_the_float_zero_point(tmp_path):
    """rtn and gptq at 1 bit with GPTQ's integer zero point put 0 on one of the two levels,
    which QuantConfig refuses; compare has no --float-zero, so such a cell takes it."""
    from unibcq.eval.suite import EvalSettings
    from unibcq.report import CompareSettings
    from unibcq.report.compare import cell_config

    settings = CompareSettings("m", ["rtn", "gptq"], [1, 2], 128, tmp_path, EvalSettings(["wikitext2"]))
    for cell in plan_cells(settings.methods, settings.bits, settings.group_size):
        assert cell_config(cell, settings).integer_zero == (cell.bits != 1)


def test_compare_report_end_to_end_and_resume(capsys, tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    data = _piqa_dir(tmp_path / "data")
    out = tmp_path / "report"
    argv = ["compare", str(tiny_model_dir), "--methods", "rtn,gptq,dyngroup", "--bits", "2,3", "--group-size", "32",
            "--out", str(out), "--ppl", str(corpus_file), "--seq-len", "32", "--max-windows", "2", "--tasks", "piqa",
            "--calib", str(corpus_file), "--data-dir", str(data), "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    names = ["unquantized", "rtn-w2-g32", "rtn-w3-g32", "dyngroup-w1-g-1", "gptq-w2-g32", "gptq-w3-g32"]
    results = {n: json.loads((out / "results" / f"{n}.json").read_text()) for n in names}
    fp = results["unquantized"]
    assert fp["kl_vs_ref"] is None and fp["tasks"]["piqa"]["n"] == 6
    for name in names[1:]:
        r = results[name]
        assert (out / "checkpoints" / name / "model.safetensors").is_file()
        assert r["kl_vs_ref"] > 0 and 0 <= r["tasks"]["piqa"]["acc"] <= 1
        assert r["bits_per_weight"] > r["bits"]  # scales and offsets (or group indices) are counted
        assert r["device"] == "cpu"
    assert results["rtn-w2-g32"]["bits_per_weight"] < results["rtn-w3-g32"]["bits_per_weight"]
    assert results["dyngroup-w1-g-1"]["bits_per_weight_paper"] < results["dyngroup-w1-g-1"]["bits_per_weight"]
    report = (out / "report.md").read_text()
    assert "unibcq compare" in report and "Machine" in report
    assert "(32 x 64 tokens)" in report  # the fast preset's 256-token windows, capped at the 64-position context
    assert all(f"| {n.split('-w')[0]} |" in report for n in names[1:])
    for plot in ("ppl_vs_bits.png", "accuracy_vs_bits.png"):
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC and f"]({plot})" in report

    # A rerun finishes nothing new: no quantization, no evaluation, the same results, also for a
    # result stored when quantization records listed every setting, read or not.
    import unibcq.report.compare as compare
    from unibcq.config import normalized_record

    earlier = json.loads((out / "results" / "rtn-w2-g32.json").read_text())
    assert "epochs" not in earlier["protocol"]["quantization"]
    earlier["protocol"]["quantization"] = normalized_record(earlier["protocol"]["quantization"]) | {"epochs": 9}
    (out / "results" / "rtn-w2-g32.json").write_text(json.dumps(earlier))

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished cell was redone")

    monkeypatch.setattr(compare, "quantize_model", forbidden)
    monkeypatch.setattr(compare, "evaluate_suite", forbidden)
    monkeypatch.setattr(compare, "context_window_of", forbidden)  # kept from the first run: no model needed
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "results" / "gptq-w3-g32.json").read_text()) == results["gptq-w3-g32"]
    # nor with a smaller batch (a rerun after running out of memory): speed, not what is measured
    assert main([*argv, "--batch-size", "2"]) == 0, capsys.readouterr().err

    # A different protocol re-evaluates every cell but reuses the checkpoints.
    monkeypatch.undo()
    monkeypatch.setattr(compare, "quantize_model", forbidden)
    argv[argv.index("--max-windows") + 1] = "1"
    assert main(argv) == 0, capsys.readouterr().err
    again = json.loads((out / "results" / "gptq-w3-g32.json").read_text())
    assert again["windows"][str(corpus_file)] == 1 and again["bits_per_weight"] == results["gptq-w3-g32"]["bits_per_weight"]


def test_a_reused_folder_never_passes_off_another_runs_checkpoints(capsys, tmp_path, tiny_model_dir, corpus_file,
                                                                    monkeypatch):
    """Checkpoints and results are reused only for the same model and the same quantization."""
    import shutil

    import unibcq.report.compare as compare

    out = tmp_path / "report"
    argv = ["compare", str(tiny_model_dir), "--methods", "rtn,gptq", "--bits", "3", "--group-size", "32",
            "--out", str(out), "--ppl", str(corpus_file), "--seq-len", "32", "--max-windows", "1",
            "--calib", str(corpus_file), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    quantized = []
    original = compare.quantize_model
    monkeypatch.setattr(compare, "quantize_model", lambda model, config, *a, **k: (
        quantized.append(config.method), original(model, config, *a, **k))[1])

    other_calib = tmp_path / "other.txt"
    other_calib.write_text(corpus_file.read_text()[::-1])
    argv[argv.index("--calib") + 1] = str(other_calib)
    assert main(argv) == 0, capsys.readouterr().err
    assert quantized == ["gptq"]  # rtn uses no calibration text, so its checkpoint stands

    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    argv[1] = str(other_model)
    quantized.clear()
    assert main(argv) == 0, capsys.readouterr().err
    assert quantized == ["rtn", "gptq"]
    stored = json.loads((out / "checkpoints" / "rtn-w3-g32" / "config.json").read_text())
    assert stored["quantization_config"]["source_model"] == str(other_model)
    assert "leaves out" not in capsys.readouterr().err

    argv[1] = str(tiny_model_dir)
    argv[argv.index("--methods") + 1] = "rtn"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"leaves out: gptq-w3-g32 (of {other_model})" in err  # left for the user, and whose it is
    assert (out / "checkpoints" / "gptq-w3-g32").is_dir()



def test_new_weights_or_text_under_the_same_names_are_measured_anew(capsys, tmp_path, tiny_model_dir, tiny_llama,
                                                                   corpus_file, monkeypatch):
    """A path names files, not their content: a model rewritten in place, or a relative --ppl file
    read from another folder, makes other numbers, never the stored ones."""
    import os

    import unibcq.report.compare as compare

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "text.txt").write_text(corpus_file.read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "text.txt").write_text(corpus_file.read_text()[::-1])
    out = tmp_path / "report"
    relative_model = Path("..") / tiny_model_dir.relative_to(tmp_path)  # the same folder from a/ and b/
    argv = ["compare", str(relative_model), "--methods", "rtn", "--bits", "3", "--group-size", "32",
            "--out", str(out), "--ppl", "text.txt", "--seq-len", "32", "--max-windows", "1", "--no-progress"]
    monkeypatch.chdir(tmp_path / "a")
    assert main(argv) == 0, capsys.readouterr().err
    first = json.loads((out / "results" / "unquantized.json").read_text())["ppl"]["text.txt"]
    quantized, measured = [], []
    original_quantize, original_evaluate = compare.quantize_model, compare.evaluate_suite
    monkeypatch.setattr(compare, "quantize_model", lambda *a, **k: quantized.append(1) or original_quantize(*a, **k))
    monkeypatch.setattr(compare, "evaluate_suite", lambda *a, **k: measured.append(1) or original_evaluate(*a, **k))

    monkeypatch.chdir(tmp_path / "b")
    assert main(argv) == 0, capsys.readouterr().err
    assert (quantized, len(measured)) == ([], 2)  # the checkpoint stands, both rows are measured on the new text
    assert json.loads((out / "results" / "unquantized.json").read_text())["ppl"]["text.txt"] != first

    measured.clear()
    tiny_llama(seed=5, vocab_size=256).save_pretrained(tiny_model_dir)  # new weights, same path
    os.utime(tiny_model_dir / "model.safetensors", ns=(1, 1))  # whatever the clock's resolution
    assert main(argv) == 0, capsys.readouterr().err
    assert (len(quantized), len(measured)) == (1, 2)

@pytest.mark.parametrize("extra,needle", [
    (["--methods", "rtn,nope"], "unknown method"),
    (["--methods", "rtn", "--bits", "3,x"], "--bits"),
    (["--methods", "rtn", "--bits", "12"], "bits"),
    (["--methods", "rtn", "--tasks", "nope"], "nope"),
    (["--methods", "rtn", "--group-size", "0"], "group"),
    (["--methods", "rtn", "--device", "cuda:9"], "--device cuda:9"),
    (["--methods", "rtn,gptq", "--workers", "0"], "--workers must be"),
])
def test_compare_bad_input(capsys, tmp_path, tiny_model_dir, extra, needle):
    capsys.readouterr()
    code = main(["compare", str(tiny_model_dir), "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and not (tmp_path / "r").exists()


def test_compare_caps_perplexity_windows_at_the_context(capsys, tmp_path, tiny_model_dir, corpus_file):
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(["compare", str(tiny_model_dir), "--methods", "rtn", "--bits", "3", "--group-size", "32", "--out",
                 str(out), "--ppl", str(corpus_file), "--seq-len", "128", "--max-windows", "1", "--no-progress"]) == 0
    assert json.loads((out / "results" / "rtn-w3-g32.json").read_text())["seq_len"] == 64
    assert "the first non-overlapping window of 64 tokens" in (out / "report.md").read_text()


@pytest.mark.parametrize("own_file", ["report.md", "notes.txt"])
def test_compare_keeps_out_of_a_folder_it_did_not_write(capsys, tmp_path, tiny_model_dir, own_file):
    """Every run rewrites report.md there; a user's own report would be lost."""
    out = tmp_path / "r"
    out.mkdir()
    (out / own_file).write_text("my notes\n")
    capsys.readouterr()
    code = main(["compare", str(tiny_model_dir), "--methods", "rtn", "--out", str(out), "--no-progress"])
    assert code == 2 and f"holds files compare did not write ({own_file})" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [own_file] and (out / own_file).read_text() == "my notes\n"


def test_compare_cell_killed_mid_evaluation_keeps_its_finished_datasets(capsys, tmp_path, tiny_model_dir,
                                                                         corpus_file, monkeypatch):
    import unibcq.eval.perplexity as perplexity
    import unibcq.eval.tasks as tasks

    data = _piqa_dir(tmp_path / "data")
    out = tmp_path / "report"
    argv = ["compare", str(tiny_model_dir), "--methods", "rtn", "--bits", "3", "--group-size", "32", "--out", str(out),
            "--ppl", str(corpus_file), "--seq-len", "32", "--max-windows", "2", "--tasks", "piqa",
            "--data-dir", str(data), "--no-progress"]
    windows, run_one = perplexity.evaluate_windows, tasks._run_one
    calls: list[str] = []
    monkeypatch.setattr(perplexity, "evaluate_windows", lambda *a, **k: calls.append("ppl") or windows(*a, **k))

    def dies_in_the_quantized_cell(name, model, *args, **kwargs):
        if calls.count("ppl") == 2:  # the unquantized row and then the cell measured their perplexity
            raise KeyboardInterrupt
        return run_one(name, model, *args, **kwargs)

    monkeypatch.setattr(tasks, "_run_one", dies_in_the_quantized_cell)
    assert main(argv) == 130  # Ctrl-C
    partial = out / "results" / "rtn-w3-g32.partial"
    assert set(json.loads(partial.read_text())["pieces"]["ppl"]) == {str(corpus_file)}
    assert not (out / "results" / "rtn-w3-g32.json").exists()

    calls.clear()
    monkeypatch.setattr(tasks, "_run_one", run_one)
    assert main(argv) == 0, capsys.readouterr().err
    assert calls == [] and not partial.exists()
    result = json.loads((out / "results" / "rtn-w3-g32.json").read_text())
    assert result["kl_vs_ref"] > 0 and result["tasks"]["piqa"]["n"] == 6


def test_the_report_names_the_machine_each_cell_was_measured_on():
    """Each result records its machine; a report reusing cells of a run elsewhere credits them
    there, not to the machine that renders it. Older results record only their device."""
    from unibcq.report.render import machine_line, machines_note

    here = machine_line("cpu")
    results = [{"name": "fp", "device": "cpu", "machine": here}, {"name": "rtn-w3-g32", "device": "cpu"},
               {"name": "gptq-w3-g32", "device": "cuda", "machine": "16 CPU cores (Xeon), NVIDIA H100"},
               {"name": "rtn-w2-g32", "device": "cuda"}]
    assert machines_note(results[:2], "cpu") == here
    assert machines_note(results, "cpu") == (f"{here} (fp, rtn-w3-g32); 16 CPU cores (Xeon), NVIDIA H100 (gptq-w3-g32); "
                                             "a machine with cuda (not recorded) (rtn-w2-g32)")


def test_the_kept_context_window_belongs_to_its_model(tmp_path, monkeypatch):
    import unibcq.report.compare as compare

    looked_up = []
    monkeypatch.setattr(compare, "context_window_of", lambda model: looked_up.append(model) or 2048)
    assert compare._model_context("org/a", tmp_path) == (2048, False)
    compare._keep_context("org/a", 2048, tmp_path)
    assert compare._model_context("org/a", tmp_path) == (2048, True) and looked_up == ["org/a"]
    assert compare._model_context("org/b", tmp_path) == (2048, False) and looked_up == ["org/a", "org/b"]
    (tmp_path / compare.CONTEXT_FILE).write_text("{not json")
    assert compare._model_context("org/a", tmp_path) == (2048, False)


def test_compare_refuses_a_quantized_checkpoint_before_any_work(capsys, tmp_path, tiny_model_dir, corpus_file):
    checkpoint = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--out", str(checkpoint),
                 "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["compare", str(checkpoint), "--methods", "rtn", "--bits", "2", "--ppl", str(corpus_file),
                 "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "already a unibcq checkpoint" in err and not (tmp_path / "r").exists()


def test_a_diverged_cell_is_named_in_the_plot_not_silently_dropped(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from unibcq.report.render import _plot

    drawn = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, x, y, **kw: drawn.append((list(x), list(y), kw.get("label")))
                        or original(ax, x, y, **kw))
    results = [{"method": "rtn", "bits": b, "bits_per_weight": bpw, "ppl": ppl}
               for b, bpw, ppl in ((2, 2.406, float("inf")), (3, 3.542, 285.8), (4, 4.117, float("nan")))]
    assert _plot(tmp_path / "p.png", results, lambda r: r["ppl"], "ppl", "t", log_y=True)
    assert drawn == [([3.542], [285.8], "rtn (not finite at 2.41, 4.12 bits)")]
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
