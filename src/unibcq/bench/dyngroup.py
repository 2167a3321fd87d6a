"""Speed and objective of the dynamic-grouping solvers on one core.

Matrices: a random-normal rows x cols matrix and, when the bundled model is installed, a
real SmolLM2-135M layer. On the large random matrix the DP runs on atoms of consecutive
sorted weights (`dp_atom_size`, reported) because the exact DP needs ~80 bytes per weight
per level; on the real layer it is exact, and greedy / windowed are compared with it, with
both merge rules (the default "objective" and the authors' "paper") and with boundary
refinement (`refine_sweeps`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from unibcq.quantizers.dyngroup import dyngroup_quantize

REAL_MODEL = "smollm2-135m"
REAL_LAYER = "model.layers.0.mlp.down_proj"


def _real_matrix() -> torch.Tensor | None:
    from unibcq.errors import UnibcqError
    from unibcq.models import load_model

    try:
        model = load_model(REAL_MODEL)
    except UnibcqError:
        return None
    return model.get_submodule(REAL_LAYER).weight.detach().clone()


REFINE_SWEEPS = 20


def run_one(matrix: str, weight: torch.Tensor, algorithm: str, max_groups: int, lam: float, window: int,
            dp_atom_size: int = 1, refine_sweeps: int = 0, merge_rule: str = "objective") -> dict[str, Any]:
    start = time.perf_counter()
    result = dyngroup_quantize(weight, max_groups, lam, algorithm, window, dp_atom_size=dp_atom_size,
                               refine_sweeps=refine_sweeps, merge_rule=merge_rule)
    seconds = time.perf_counter() - start
    label = f"{algorithm}+refine{refine_sweeps}" if refine_sweeps else algorithm
    if merge_rule != "objective":
        label += f" ({merge_rule} rule)"
    return {
        "matrix": matrix, "shape": list(weight.shape), "algorithm": label,
        "dp_atom_size": dp_atom_size if algorithm == "dp" else None, "seconds": seconds,
        "objective": result.objective, "groups": int(result.num_groups.sum()),
    }


def benchmark_dyngroup(rows: int = 4096, cols: int = 4096, max_groups: int = 32, lam: float = 0.75,
                       window: int = 256, with_greedy: bool = False, real: bool = True) -> list[dict[str, Any]]:
    """One entry per (matrix, algorithm); `ratio_to_dp` compares objectives on the same matrix."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        matrices = [(f"randn {rows}x{cols}", torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)))]
        if real and (weight := _real_matrix()) is not None:
            matrices.append((f"SmolLM2 {REAL_LAYER}", weight))
        entries = []
        for name, weight in matrices:
            exact = weight.numel() <= 2**21
            runs = [("windowed", 1, 0, "objective"), ("windowed", 1, 0, "paper"),
                    ("windowed", 1, REFINE_SWEEPS, "objective"),
                    ("dp", 1 if exact else max(1, weight.numel() // 2**18), 0, "objective")]
            if exact or with_greedy:
                runs += [("greedy", 1, 0, "objective"), ("greedy", 1, 0, "paper"),
                         ("greedy", 1, REFINE_SWEEPS, "objective")]
            rows_out = [run_one(name, weight, alg, max_groups, lam, window, atoms, sweeps, rule)
                        for alg, atoms, sweeps, rule in runs]
            dp_objective = next(r["objective"] for r in rows_out if r["algorithm"] == "dp")
            for r in rows_out:
                r["ratio_to_dp"] = r["objective"] / dp_objective if dp_objective else None
            entries.extend(rows_out)
        return entries
    finally:
        torch.set_num_threads(threads)
