"""`unibcq compare`: quantize a model with several methods and bit widths, evaluate all, report.

Every (method, bits) cell is quantized with the same group size, preset and calibration
windows, saved as a normal checkpoint under OUT/checkpoints/, and evaluated with the same
`EvalSettings` as the unquantized model (which is also the KL reference). Results go to
OUT/results/<cell>.json, each written atomically as soon as the cell is done, so a rerun
skips finished cells, reuses finished checkpoints made from the same model with the same
quantization settings (others are quantized anew) and re-evaluates a cell only when the
evaluation protocol or its quantization changed; within a cell, finished datasets and tasks are kept in
OUT/results/<cell>.partial until the cell is done, so even a cell killed mid-evaluation
resumes. OUT/report.md and the plots are rebuilt from all results.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from unibcq.atomic import write_json_atomic
from unibcq.checkpoint import (
    QUANT_KEY, check_output_dir, checkpoint_info, is_checkpoint, load_checkpoint, read_config, save_checkpoint,
)
from unibcq.config import QuantConfig, normalized_record
from unibcq.errors import UnibcqError
from unibcq.eval.journal import EvalJournal
from unibcq.eval.suite import EvalSettings, evaluate_suite, piece_name, placed_on
from unibcq.methods import CALIBRATED, quantize_model
from unibcq.methods.presets import apply_preset, cap_calibration_length, preset_values
from unibcq.methods.run_state import RunState, state_dir_for
from unibcq.methods.registry import check_method
from unibcq.models.fingerprint import files_fingerprint, source_spec
from unibcq.models.loading import check_supported, context_window_of, declared_dtype
from unibcq.progress import progress_bar
from unibcq.report.render import ACCURACY_PLOT, PPL_PLOT, REPORT_FILE, REPORT_TITLE, machine_line, write_report

FP_NAME = "unquantized"
CONTEXT_FILE = "model-context.json"  # in results/


@dataclass(frozen=True)
class Cell:
    """One quantized configuration of the comparison."""

    method: str
    bits: int
    group_size: int

    @property
    def name(self) -> str:
        return f"{self.method}-w{self.bits}-g{self.group_size}"


@dataclass
class CompareSettings:
    """Everything `unibcq compare` varies or holds fixed."""

    model: str
    methods: list[str]
    bits: list[int]
    group_size: int
    out: Path
    evaluation: EvalSettings
    preset: str = "fast"
    calib: str = "wikitext2"
    seed: int = 0
    workers: int = 1
    device: str = "cpu"
    command: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser()  # what is checked is what is written (--out=~/r is not expanded)


def plan_cells(methods: Sequence[str], bits: Sequence[int], group_size: int) -> list[Cell]:
    """Methods x bits; dyngroup is 1-bit by definition, so it gets one cell whatever --bits says."""
    if not methods:
        raise UnibcqError("--methods needs at least one method")
    if not bits:
        raise UnibcqError("--bits needs at least one bit width")
    cells: list[Cell] = []
    for method in methods:
        check_method(method)
        for b in ([1] if method == "dyngroup" else bits):
            cell = Cell(method, b, -1 if method == "dyngroup" else group_size)
            if cell not in cells:
                cells.append(cell)
    return cells


def cell_config(cell: Cell, settings: CompareSettings, context: int | None = None) -> QuantConfig:
    """The cell's settings: the preset's, with calibration windows capped at the model's `context`.
    A 1-bit uniform cell (rtn, gptq) takes the float zero point: with GPTQ's integer one, 0 is
    one of its two levels (`QuantConfig` refuses that)."""
    one_bit_uniform = cell.bits == 1 and cell.method in ("rtn", "gptq")
    config = QuantConfig(cell.method, bits=cell.bits, group_size=cell.group_size, seed=settings.seed,
                         integer_zero=not one_bit_uniform)
    config = apply_preset(config, preset_values(settings.preset, {}), settings.calib)
    cap_calibration_length(config, context)
    return config.validate()


def _protocol(settings: CompareSettings) -> dict[str, Any]:
    """The evaluation settings a stored result must match to be reused, with what the names in
    them stand for: the model's files (new weights under the same path), the data folder and
    the local text files (a relative --ppl path run from another folder) as they are now."""
    evaluation = settings.evaluation
    identity = {"reference_files": files_fingerprint(settings.model),
                "data_dir": evaluation.journal_key()["data_dir"],
                "datasets": {piece_name(d): files_fingerprint(d) for d in evaluation.datasets}}
    protocol = evaluation.record() | {"reference": settings.model, "identity": identity}
    return json.loads(json.dumps(protocol))  # as a stored result reads back (tuples become lists)


def _read_result(path: Path, protocol: dict[str, Any]) -> dict[str, Any] | None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("protocol"), dict):
        return None
    return result if _comparable(result["protocol"]) == _comparable(protocol) else None


# Settings a stored result may differ in and still be reused: the batch size changes speed and
# memory, not what is measured (the eval journal's key leaves it out too), so a rerun with a
# smaller batch after running out of memory keeps every finished cell; the task options mean
# nothing when no task runs.
SPEED_SETTINGS = ("batch_size",)
TASK_SETTINGS = ("limit", "mmlu_shots", "task_dtype", "chat_template")


def _comparable(protocol: dict[str, Any]) -> dict[str, Any]:
    """What must match for a result to be reused: its protocol without `SPEED_SETTINGS` (and
    without `TASK_SETTINGS` when no task runs), with its quantization's unread settings at their
    defaults, so that results stored before checkpoints recorded only the settings their method
    reads stay reusable."""
    ignored = {*SPEED_SETTINGS, *(TASK_SETTINGS if protocol.get("tasks") is None else ())}
    kept = {k: v for k, v in protocol.items() if k not in ignored}
    quantization = kept.get("quantization")
    return kept | {"quantization": normalized_record(quantization)} if isinstance(quantization, dict) else kept


def _journal(results_dir: Path, name: str, settings: CompareSettings, model: str | Path) -> EvalJournal:
    """A cell's finished datasets and tasks, so a compare killed mid-evaluation resumes there
    (and only against the same `model`: a checkpoint quantized anew into other weights starts over)."""
    return EvalJournal(results_dir / f"{name}.partial", settings.evaluation.journal_key() | {
        "cell": name, "files": files_fingerprint(model), "reference": settings.model})


def _as_stored(config: QuantConfig) -> dict[str, Any]:
    """The settings the method reads as JSON stores them (tuples become lists), to compare with
    what was written."""
    return json.loads(json.dumps(config.recorded()))


def _cell_protocol(protocol: dict[str, Any], config: QuantConfig) -> dict[str, Any]:
    """A cell's result is reused only under the same evaluation and the same quantization."""
    return protocol | {"quantization": _as_stored(config)}


def _reusable_checkpoint(path: Path, config: QuantConfig, model: str) -> bool:
    """Whether `path` is a checkpoint of `model`, as its files are now, made with `config` (a
    folder reused with another model, new weights under the model's path, another calibration,
    seed or preset holds checkpoints that are not)."""
    if not is_checkpoint(path):
        return False
    stored = read_config(path)[QUANT_KEY]
    same_source = (stored.get("source_model") == source_spec(model)
                   and stored.get("source_files") == json.loads(json.dumps(files_fingerprint(model))))
    return same_source and all(stored.get(k) == v for k, v in _as_stored(config).items())


def _written_by_compare(report: Path) -> bool:
    try:
        with report.open(errors="replace") as f:
            return f.read(len(REPORT_TITLE)) == REPORT_TITLE
    except OSError:  # a folder, or unreadable: not ours
        return False


def check_compare_dir(out: Path) -> None:
    """Refuse a folder holding files compare did not write: every run rewrites report.md and the
    plots there, so a user's own report.md would be lost."""
    if not out.is_dir():
        return
    ours = {"results", "checkpoints", REPORT_FILE, PPL_PLOT, ACCURACY_PLOT}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
    report = out / REPORT_FILE
    if report.exists() and not _written_by_compare(report):
        foreign.insert(0, REPORT_FILE)
    if foreign:
        raise UnibcqError(f"--out {out} holds files compare did not write ({', '.join(foreign[:3])}); give a new or "
                          "empty folder, or one an earlier compare wrote")


def unreported_checkpoints(out: Path, cells: Sequence[Cell]) -> list[tuple[str, str | None]]:
    """Checkpoints under OUT/checkpoints/ that this report leaves out: cells another run asked for,
    or cells of another model when the folder is reused for a new one (the requested cells are
    quantized anew, the rest stay). Returned as (name, its source model) so compare can say so:
    they are the user's to keep or delete, never silently removed."""
    ckpt_dir, requested = out / "checkpoints", {c.name for c in cells}
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in sorted(ckpt_dir.iterdir()):
        if path.name not in requested and is_checkpoint(path):
            found.append((path.name, read_config(path)[QUANT_KEY].get("source_model")))
    return found


def _model_context(model: str | Path, results_dir: Path) -> tuple[int | None, bool]:
    """The model's context window, and whether the results folder already keeps it. It is read
    from the model's config the first time and then kept there (`_keep_context`), so a rerun
    whose cells are all finished re-renders the report without the model (offline with an
    uncached Hub id, or a GGUF whose dequantized cache was cleared)."""
    try:
        stored = json.loads((results_dir / CONTEXT_FILE).read_text())
        if stored["model"] == str(model):
            return stored["context"], True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return context_window_of(model), False


def _keep_context(model: str | Path, context: int | None, results_dir: Path) -> None:
    write_json_atomic(results_dir / CONTEXT_FILE, {"model": str(model), "context": context})


def _quantized_cell(path: Path, config: QuantConfig, settings: CompareSettings, model: torch.nn.Module, tokenizer,
                    windows: Callable[[QuantConfig], torch.Tensor], show_progress: bool) -> torch.nn.Module:
    """The cell's model: its checkpoint at `path` when one made from this model with this config
    is there, else `model` quantized now (resuming a run killed mid-way) and saved to `path`."""
    if _reusable_checkpoint(path, config, settings.model):
        return load_checkpoint(path, dtype=torch.float32)  # computed like the reference
    check_output_dir(path, is_checkpoint(path), settings.model)  # before the work, not at the save after it
    quantized = copy.deepcopy(model)
    earlier_seconds = RunState.committed_seconds(state_dir_for(path))  # of a run killed mid-way
    start = time.perf_counter()
    quantize_model(quantized, config, windows(config) if config.method in CALIBRATED else None,
                   show_progress=show_progress, workers=settings.workers, device=settings.device,
                   state_dir=state_dir_for(path), resume=True)
    seconds = time.perf_counter() - start + earlier_seconds
    save_checkpoint(quantized, path, config, settings.model, tokenizer, overwrite=is_checkpoint(path),
                    extra={"quantize_seconds": round(seconds, 3)}, dtype=declared_dtype(settings.model))
    shutil.rmtree(state_dir_for(path), ignore_errors=True)
    return quantized


def run_compare(settings: CompareSettings, show_progress: bool = True) -> list[dict[str, Any]]:
    """Quantize and evaluate every cell (skipping finished ones); returns all results, FP first."""
    from unibcq.data import calibration_windows
    from unibcq.data.sources import CALIB, check_source
    from unibcq.models import load_model, load_tokenizer

    check_compare_dir(settings.out)
    if is_checkpoint(settings.model):
        raise UnibcqError(f"{settings.model} is already a unibcq checkpoint; compare quantizes a full-precision "
                          "model (this checkpoint's source_model, per `unibcq info`)")
    cells = plan_cells(settings.methods, settings.bits, settings.group_size)
    settings.evaluation.check(sources=False)  # after every cell's settings: those name the user's mistake first
    # Windows longer than the model's context are capped there (perplexity and calibration
    # alike), before anything is keyed on their length.
    results_dir, ckpt_dir = settings.out / "results", settings.out / "checkpoints"
    needs_context = bool(settings.evaluation.datasets) or any(c.method in CALIBRATED for c in cells)
    context, kept = _model_context(settings.model, results_dir) if needs_context else (None, True)
    settings = replace(settings, evaluation=settings.evaluation.capped_to(context))
    configs = {cell: cell_config(cell, settings, context) for cell in cells}
    settings.evaluation.check_sources()
    if any(c.method in CALIBRATED for c in cells):  # not after the unquantized row's evaluation
        check_source(settings.calib, CALIB, settings.evaluation.data_dir)
    if not kept:  # only once the settings are known to be valid: bad input writes nothing
        _keep_context(settings.model, context, results_dir)
    protocol = _protocol(settings)
    pending = [c for c in cells
               if _read_result(results_dir / f"{c.name}.json", _cell_protocol(protocol, configs[c])) is None]
    fp_done = _read_result(results_dir / f"{FP_NAME}.json", protocol) is not None

    if pending or not fp_done:
        check_supported(settings.model)  # before the unquantized row is measured for nothing
        model = load_model(settings.model)
        tokenizer = load_tokenizer(settings.model)
        calibration: list[torch.Tensor] = []

        def windows(config: QuantConfig) -> torch.Tensor:
            """The calibration windows, drawn once for every calibrated cell (one preset for all)."""
            if not calibration:
                calibration.append(calibration_windows(tokenizer, settings.calib, config.calib_samples,
                                                       config.calib_seq_len, settings.seed,
                                                       settings.evaluation.data_dir))
            return calibration[0]

        with progress_bar(show_progress) as bar:
            overall = bar.add_task("compare", total=len(pending) + (not fp_done))
            if not fp_done:
                bar.update(overall, description=f"compare: {FP_NAME}")
                journal = _journal(results_dir, FP_NAME, settings, settings.model)
                with placed_on(settings.device, model):
                    measured = evaluate_suite(model, tokenizer, settings.evaluation, None, show_progress, journal)
                bits = float(torch.finfo(declared_dtype(settings.model)).bits)  # as published, not as computed
                write_json_atomic(results_dir / f"{FP_NAME}.json", {
                    "name": FP_NAME, "method": FP_NAME, "bits": None, "group_size": None, "bits_per_weight": bits,
                    "device": settings.device, "machine": machine_line(settings.device),
                    "checkpoint_mb": None, "quantize_seconds": None, "protocol": protocol, **measured})
                journal.remove()
                bar.update(overall, advance=1)
            for cell in pending:
                bar.update(overall, description=f"compare: {cell.name}")
                config, path = configs[cell], ckpt_dir / cell.name
                quantized = _quantized_cell(path, config, settings, model, tokenizer, windows, show_progress)
                info = checkpoint_info(path)
                journal = _journal(results_dir, cell.name, settings, path)
                reference = model if settings.evaluation.datasets else None  # KL needs it on the device too
                with placed_on(settings.device, quantized, reference):
                    measured = evaluate_suite(quantized, tokenizer, settings.evaluation, model, show_progress,
                                              journal)
                write_json_atomic(results_dir / f"{cell.name}.json", {
                    "name": cell.name, "method": cell.method, "bits": cell.bits, "group_size": cell.group_size,
                    "device": settings.device, "machine": machine_line(settings.device),
                    "bits_per_weight": info.bits_per_weight, **info.accounting(),
                    "checkpoint_mb": info.file_bytes / 1e6,
                    "quantize_seconds": read_config(path)[QUANT_KEY].get("quantize_seconds"),
                    "protocol": _cell_protocol(protocol, config), **measured})
                journal.remove()
                del quantized
                bar.update(overall, advance=1)
    results = [json.loads((results_dir / f"{name}.json").read_text())
               for name in [FP_NAME, *(c.name for c in cells)]]
    write_report(settings, results)
    return results
