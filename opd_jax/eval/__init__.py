"""Evaluation: answer extraction and equivalence, avg@k / pass@k with standard errors,
benchmark tables, and the runner behind ``opd-jax eval``: its config (``config``), problems
(``problems``), sampling and scoring (``sample``) and the command (``run``).

Typical use::

    out = evaluate(model, tokenizer, [{"prompt": "...", "answer": "42"}], k=4, batch_size=16,
                   max_new_tokens=512, max_prompt_tokens=256, temperature=0.6, seed=0)
    out["metrics"]["avg@4"]   # {"value": ..., "stderr": ...}

The runner (``evaluate``, ``evaluate_config``, ...) pulls in the models and JAX; it is
imported on first use, so the scoring and metric functions stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

from opd_jax.eval.accuracy import (
    Estimate,
    avg_at_k,
    mean_and_stderr,
    paired_difference,
    pass_at_k,
    pass_at_k_per_problem,
    summarize,
)
from opd_jax.eval.answers import extract_answer, gold_answer, is_correct, normalize
from opd_jax.eval.tables import (
    atomic_write_text,
    benchmark_table,
    format_cell,
    to_markdown,
    write_table,
)

# The runner's names and their modules, imported on first use (they pull in the models and JAX).
_RUNNER = {
    "BenchmarkSpec": "spec",
    "EvalConfig": "spec",
    "load_eval_config": "spec",
    "load_problems": "problems",
    "read_problem_file": "problems",
    "evaluate": "sample",
    "generate": "sample",
    "Samples": "sample",
    "sample_prompts": "sample",
    "evaluate_config": "run",
    "token_reverse_kl": "divergence",
}

__all__ = [
    "Estimate",
    "atomic_write_text",
    "avg_at_k",
    "benchmark_table",
    "extract_answer",
    "format_cell",
    "gold_answer",
    "is_correct",
    "mean_and_stderr",
    "normalize",
    "paired_difference",
    "pass_at_k",
    "pass_at_k_per_problem",
    "summarize",
    "to_markdown",
    "write_table",
    *_RUNNER,
]


def __getattr__(name: str) -> Any:
    if name in _RUNNER:
        return getattr(importlib.import_module(f"opd_jax.eval.{_RUNNER[name]}"), name)
    raise AttributeError(f"module 'opd_jax.eval' has no attribute {name!r}")
