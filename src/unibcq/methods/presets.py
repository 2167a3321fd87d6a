"""Named settings for calibrated methods; every value can be overridden by its own flag.

`paper` is the authors' UniQuanF run (128 samples x 2048 tokens, 20 epochs, u_lr 5e-3,
b_lr 5e-4, periodic re-mapping every p = 2 steps, T = 15 alternating rounds at init, a
one-point clipping grid, batch 1, input_prob 0.5); GPTQ uses the same calibration set. The
authors sampled C4; the calibration source stays `--calib` (WikiText-2 by default, offline),
so pass a local C4 `.jsonl` for their data too.
`fast` keeps the method but shrinks the calibration set and training so SmolLM2-135M
quantizes in about ten minutes on a 2-core CPU (see docs/BENCHMARKS.md for what it costs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unibcq.errors import UnibcqError

if TYPE_CHECKING:
    from unibcq.config import QuantConfig

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "calib_samples": 128, "seq_len": 2048, "epochs": 20, "u_lr": 5e-3, "b_lr": 5e-4, "remap_every": 2,
        "iters": 15, "grid_points": 1, "batch_size": 1, "input_prob": 0.5,
    },
    "fast": {
        "calib_samples": 32, "seq_len": 256, "epochs": 2, "u_lr": 5e-3, "b_lr": 5e-4, "remap_every": 2,
        "iters": 5, "grid_points": 1, "batch_size": 1, "input_prob": 0.5,
    },
}


def preset_values(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's values with every non-None override applied."""
    if name not in PRESETS:
        raise UnibcqError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name] | {k: v for k, v in overrides.items() if v is not None}


TRAINING_KEYS = ("epochs", "u_lr", "b_lr", "remap_every", "grid_points", "batch_size", "input_prob")


def apply_preset(config: QuantConfig, values: dict[str, Any], calib: str) -> QuantConfig:
    """Fill `config`'s training and calibration fields from `values` (see `preset_values`).

    Only calibrated methods read these; reconstruction methods also take their init rounds
    T (`iters`) from the preset, while bcq-alternating keeps its own `iters`.
    """
    from unibcq.methods.registry import CALIBRATED, RECONSTRUCTION_METHODS

    for key in TRAINING_KEYS:
        setattr(config, key, values[key])
    if config.method in RECONSTRUCTION_METHODS:
        config.iters = values["iters"]
    if config.method in CALIBRATED:
        config.calib, config.calib_samples, config.calib_seq_len = calib, values["calib_samples"], values["seq_len"]
    return config


def cap_calibration_length(config: QuantConfig, context: int | None) -> int | None:
    """Shorten a calibrated method's windows to the model's context, for a preset made for longer
    ones (positions past the context were never trained, so calibrating there fits the quantizer
    to activations the model never produces). Returns the length it replaced, None if none."""
    from unibcq.methods.registry import CALIBRATED

    if config.method in CALIBRATED and context is not None and config.calib_seq_len > context:
        replaced, config.calib_seq_len = config.calib_seq_len, context
        return replaced
    return None
