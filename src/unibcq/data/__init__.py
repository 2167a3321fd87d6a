"""Calibration and evaluation text."""

from unibcq.data.sources import calibration_windows, eval_token_ids, load_text, resolve_data_dir

__all__ = ["calibration_windows", "eval_token_ids", "load_text", "resolve_data_dir"]
