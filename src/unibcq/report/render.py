"""Turn comparison results into report.md and PNG plots (perplexity / accuracy vs honest bits)."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from unibcq import __version__
from unibcq.methods.registry import CALIBRATED

if TYPE_CHECKING:
    from unibcq.report.compare import CompareSettings

PPL_PLOT = "ppl_vs_bits.png"
ACCURACY_PLOT = "accuracy_vs_bits.png"
REPORT_FILE = "report.md"
REPORT_TITLE = "# unibcq comparison: "


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(device: str = "cpu") -> str:
    gpu = torch.cuda.get_device_name(0) if device != "cpu" and torch.cuda.is_available() else "no GPU used"
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), {gpu}; torch {torch.__version__}, unibcq {__version__}"


def machines_note(results: list[dict[str, Any]], device: str) -> str:
    """The machines the rows were measured on, as each result records its own: a report that
    reuses cells of an earlier run (on another host, or device) must not credit them to the
    machine that rendered it. Results from before machines were recorded name only a device;
    those run on `device` are taken to be this machine's."""
    here = machine_line(device)
    where: dict[str, list[str]] = {}
    for result in results:
        ran_on = result.get("device", "cpu")  # results written before devices were recorded ran on the CPU
        machine = result.get("machine") or (here if ran_on == device else f"a machine with {ran_on} (not recorded)")
        where.setdefault(machine, []).append(result["name"])
    if len(where) == 1:
        return next(iter(where))
    return "; ".join(f"{machine} ({', '.join(names)})" for machine, names in where.items())


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def dataset_label(name: str) -> str:
    """A dataset's short name for headers: known names as they are, files by their base name."""
    return Path(name).name if ("/" in name or "\\" in name) else name


def task_score(entry: dict[str, Any]) -> float:
    """acc_norm where the task defines it, else acc (lm-evaluation-harness's usual headline)."""
    return entry["acc_norm"] if entry.get("acc_norm") is not None else entry["acc"]


def task_names(results: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for result in results:
        for name in (result.get("tasks") or {}):
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names


def zero_shot_mean(result: dict[str, Any]) -> float | None:
    tasks = result.get("tasks") or {}
    return (tasks.get("_mean") or {}).get("mean_acc")


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """One markdown row per result: honest bits, perplexities, KL, top-1, task scores, size, time."""
    datasets = list(results[0]["ppl"]) if results else []
    tasks = task_names(results)
    header = ["method", "bits", "group", "bits/weight", *(f"ppl {dataset_label(d)}" for d in datasets), "KL vs FP", "top-1",
              *tasks, *(["zero-shot mean"] if any(zero_shot_mean(r) is not None for r in results) else []),
              "checkpoint MB", "quant s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for r in results:
        group = r["group_size"]
        group = "-" if group is None else ("per-channel" if group == -1 else str(group))
        if r["method"] == "dyngroup":
            group = "dynamic"
        top1 = r.get("top1_agreement")
        cells = [r["method"], _fmt(r["bits"]), group, _fmt(r["bits_per_weight"], ".3f"),
                 *(_fmt(r["ppl"].get(d), ".2f") for d in datasets), _fmt(r.get("kl_vs_ref"), ".4f"),
                 "-" if top1 is None else f"{100 * top1:.1f}%"]
        for name in tasks:
            entry = (r.get("tasks") or {}).get(name)
            cells.append("-" if entry is None else f"{task_score(entry):.4f}")
        if "zero-shot mean" in header:
            cells.append(_fmt(zero_shot_mean(r), ".4f"))
        cells += [_fmt(r.get("checkpoint_mb"), ".1f"), _fmt(r.get("quantize_seconds"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(path: Path, results: Sequence[dict[str, Any]], metric, ylabel: str, title: str, log_y: bool) -> bool:
    """One line per method of metric(result) against honest bits per weight; FP as a dashed line.
    A cell whose figure is inf or NaN (a diverged 2-bit model) has no point, so its line would
    just stop; the method's legend entry names the bit widths it lost instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantized = [r for r in results if r["bits"] is not None and metric(r) is not None]
    if not quantized:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in quantized):
        cells = sorted((r["bits_per_weight"], metric(r)) for r in quantized if r["method"] == method)
        points = [p for p in cells if math.isfinite(p[1])]
        lost = ", ".join(f"{bits:.2f}" for bits, value in cells if not math.isfinite(value))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=f"{method} (not finite at {lost} bits)" if lost else method)
    for r in results:
        if r["bits"] is None and metric(r) is not None:
            ax.axhline(metric(r), color="black", linestyle="--", linewidth=1, label=r["method"])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("honest bits per weight (codes + scales + offsets + indices)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _calibration_size(results: Sequence[dict[str, Any]]) -> str:
    """" (N x L tokens)" as the calibrated cells used it (L is capped at the model's context)."""
    sizes = {(q["calib_samples"], q["calib_seq_len"]) for r in results
             if (q := (r.get("protocol") or {}).get("quantization")) and q.get("method") in CALIBRATED}
    return "".join(f" ({n} x {length} tokens)" for n, length in sorted(sizes))


def write_report(settings: "CompareSettings", results: Sequence[dict[str, Any]]) -> Path:
    """Write OUT/report.md (and the plots next to it); returns the report's path."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    ev = settings.evaluation
    first = ev.datasets[0] if ev.datasets else None
    plots = []
    if first and _plot(out / PPL_PLOT, results, lambda r: r["ppl"].get(first), f"{dataset_label(first)} perplexity (log)",
                       f"{dataset_label(settings.model)}: perplexity vs memory", log_y=True):
        plots.append(PPL_PLOT)
    if _plot(out / ACCURACY_PLOT, results, zero_shot_mean, "zero-shot mean accuracy",
             f"{dataset_label(settings.model)}: accuracy vs memory", log_y=False):
        plots.append(ACCURACY_PLOT)
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    windows = ("all non-overlapping windows" if ev.max_windows is None else "the first non-overlapping window"
               if ev.max_windows == 1 else f"the first {ev.max_windows} non-overlapping windows")
    lines = [
        f"{REPORT_TITLE}{settings.model}",
        "",
        f"Generated {date} by:",
        "",
        "```sh",
        settings.command or "(Python API: unibcq.report.run_compare)",
        "```",
        "",
        f"- **Machine:** {machines_note(results, settings.device)}.",
        f"- **Quantization:** group size {settings.group_size} (-1 = per output channel), preset "
        f"`{settings.preset}`, calibration `{settings.calib}`{_calibration_size(results)} (calibrated methods "
        f"only), seed {settings.seed}; "
        "embeddings and lm_head stay unquantized.",
        f"- **Perplexity:** {', '.join(ev.datasets) or 'none'}; {windows} of "
        f"{ev.seq_len} tokens. KL(P_FP || P_quant) and top-1 agreement against the unquantized model on "
        f"{first or '-'}.",
        f"- **Tasks:** {', '.join(ev.tasks) if ev.tasks else 'none'}"
        + (f" (first {ev.limit} items each)" if ev.tasks and ev.limit else "")
        + (f", scored in {ev.task_dtype}" if ev.tasks else "")
        + "; scores are acc_norm where defined, else acc; mmlu is "
        f"{ev.mmlu_shots}-shot micro accuracy. The zero-shot mean leaves mmlu and gsm8k out.",
        "- **bits/weight** is what the checkpoint stores per quantized weight: codes, scales, offsets and "
        "any group index. **checkpoint MB** includes the unquantized embeddings and norms.",
        "",
        results_table(results),
        "",
        *(f"![{p}]({p})" for p in plots),
        "",
    ]
    path = out / REPORT_FILE
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
