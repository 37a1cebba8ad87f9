"""The experiment's report: the benchmark table, the per-rule diagnostics and the plots.

Everything is read back from the run directory (``models/*/eval.json``,
``opd/<rule>/seed<s>/{eval.json, curve.json, metrics.jsonl}``), so the report can be redone
from a finished experiment. Written to ``run.dir``:

- ``table.md``, ``table.json``: accuracy (%) of the teacher, the student before OPD and each
  rule on every eval split plus the average. A rule's cell pools its seeds: each problem's
  correctness is averaged over seeds and samples, and the standard error is over problems.
  ``table.json`` also holds every seed's own value.
- ``diagnostics.md``, ``diagnostics.json``: per rule, over all steps and seeds, the kept and
  released fractions, mean margin and advantage, the margin of the last fifth of the
  response against the first fifth, and the last logged loss.
- ``plots/``: see :mod:`opd_jax.experiment.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.config import Config
from opd_jax.eval.metrics import avg_at_k
from opd_jax.eval.tables import benchmark_table, to_markdown
from opd_jax.experiment.layout import CURVE_FILE, EVAL_FILE, run_dirs
from opd_jax.files import atomic_write_text
from opd_jax.train.metrics import read_metrics

TEACHER, STUDENT = "teacher", "student (before OPD)"
DIAGNOSTICS = ("kept_fraction", "released_fraction", "margin_mean", "advantage_mean")


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _pooled(evals: list[dict[str, Any]], split: str) -> dict[str, float]:
    """avg@(seeds x k) of one split: per-problem correctness pooled over seeds."""
    correct = np.concatenate([np.asarray(e[split]["correct"], bool) for e in evals], axis=1)
    return avg_at_k(correct).to_dict()


def rule_label(rule: str) -> str:
    return f"OPD: {rule}"


def accuracy_table(config: Config) -> dict[str, Any]:
    """The JSON-ready benchmark table (see the module doc), with ``seeds`` per rule row."""
    root = Path(config.run.dir)
    splits = config.experiment.eval_splits
    results, seeds = {}, {}
    for role, label in (("teacher", TEACHER), ("student", STUDENT)):
        evaluation = _read(root / "models" / role / EVAL_FILE)
        if evaluation:
            results[label] = {s: _pooled([evaluation], s) for s in splits}
    for rule in config.experiment.rules:
        dirs = {seed: d for (r, seed), d in run_dirs(config).items() if r == rule}
        evals = {seed: _read(d / EVAL_FILE) for seed, d in dirs.items()}
        done = [e for e in evals.values() if e]
        if done:
            results[rule_label(rule)] = {s: _pooled(done, s) for s in splits}
            seeds[rule_label(rule)] = {
                str(seed): ({s: e[s]["metrics"] for s in splits} if e else None)
                for seed, e in evals.items()
            }
    e = config.experiment
    metric = f"accuracy, avg@{e.eval_k} over seeds {list(e.seeds)}"
    table = benchmark_table(results, list(splits), metric=metric, row_label="model")
    table["seeds"] = seeds
    return table


def _profile(records: list[dict[str, Any]], name: str) -> np.ndarray | None:
    rows = [r[name] for r in records if name in r]
    return np.mean(np.asarray(rows, np.float64), axis=0) if rows else None


def run_records(config: Config) -> dict[str, list[list[dict[str, Any]]]]:
    """``{rule: [metrics.jsonl records of each seed's run]}`` (runs not started are left out)."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for (rule, _), run_dir in run_dirs(config).items():
        if (run_dir / "metrics.jsonl").is_file():
            out.setdefault(rule, []).append(read_metrics(run_dir))
    return out


def curves(config: Config) -> dict[str, list[dict[str, float]]]:
    """``{rule: [{step: accuracy} of each seed]}``."""
    out: dict[str, list[dict[str, float]]] = {}
    for (rule, _), run_dir in run_dirs(config).items():
        points = _read(run_dir / CURVE_FILE)
        if points:
            out.setdefault(rule, []).append(points)
    return out


def diagnostics(config: Config) -> dict[str, dict[str, float]]:
    """Per rule: means over steps and seeds of :data:`DIAGNOSTICS`, the late/early margin
    ratio and the last loss (mean over seeds)."""
    out = {}
    for rule, runs in run_records(config).items():
        records = [r for run in runs for r in run]
        row = {
            name: float(np.mean([r[name] for r in records if name in r])) for name in DIAGNOSTICS
        }
        margin = _profile(records, "margin_by_position")
        if margin is not None:
            fifth = max(len(margin) // 5, 1)
            row["margin_last_fifth"] = float(margin[-fifth:].mean())
            row["margin_first_fifth"] = float(margin[:fifth].mean())
        row["final_loss"] = float(np.mean([run[-1]["loss"] for run in runs if run]))
        out[rule] = row
    return out


def diagnostics_markdown(rows: dict[str, dict[str, float]]) -> str:
    columns = (*DIAGNOSTICS, "margin_first_fifth", "margin_last_fifth", "final_loss")
    lines = [
        "| rule | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for rule, row in rows.items():
        cells = [f"{row[c]:.3f}" if c in row else "–" for c in columns]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(config: Config) -> dict[str, Any]:
    """Writes the tables and plots (module doc) and prints the tables; returns
    ``{"table", "diagnostics", "plots"}``."""
    from opd_jax.experiment.plots import write_plots

    root = Path(config.run.dir)
    table = accuracy_table(config)
    atomic_write_text(root / "table.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(root / "table.md", to_markdown(table))
    rows = diagnostics(config)
    atomic_write_text(root / "diagnostics.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(root / "diagnostics.md", diagnostics_markdown(rows))
    first = config.experiment.eval_splits[0]
    reference = {
        f"teacher ({first})": row[first]["value"]
        for name, row in table["rows"].items()
        if name == TEACHER and row.get(first)
    }
    plots = write_plots(run_records(config), curves(config), root / "plots", reference)
    print(to_markdown(table), flush=True)
    print("Training diagnostics (means over steps and seeds):\n", flush=True)
    print(diagnostics_markdown(rows), flush=True)
    print("plots: " + ", ".join(str(p) for p in plots), flush=True)
    return {"table": table, "diagnostics": rows, "plots": plots}
