"""Method comparison: quantize several configurations, evaluate them alike, write a report."""

from unibcq.report.compare import Cell, CompareSettings, plan_cells, run_compare

__all__ = ["Cell", "CompareSettings", "plan_cells", "run_compare"]
