"""The experiment's report: accuracy and distillation measures, paired comparisons, training
diagnostics and plots, all read back from the run directory (:mod:`.layout`), so the report
can be redone from a finished experiment. Written to ``run.dir``:

- ``table.md``/``.json``: accuracy (%) of the teacher, the student before OPD and each rule on
  every eval split and their average. A rule's cell pools its seeds: each problem's correctness
  is averaged over seeds and samples; the standard error is over problems.
- ``measures.md``/``.json``: in domain, per model: accuracy, its change from the student
  before OPD (paired per problem), the fraction of correct solution steps, and the per-token
  reverse KL to the teacher on the model's own samples (whole response, solution, recap).
- ``comparisons.md``/``.json``: paired differences with standard errors, z and two-sided p
  (normal): every rule against the student before OPD, and ``release`` against every other
  rule, on every split.
- ``diagnostics.md``/``.json``: per rule, over all steps and seeds: kept and released
  fractions, margin and advantage means, the margin of the first and last fifth of the
  response, by sentence index, and the last loss.
- ``plots/``: see :mod:`opd_jax.experiment.plots`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.config import Config
from opd_jax.eval.metrics import mean_and_stderr, paired_difference
from opd_jax.eval.tables import benchmark_table, to_markdown
from opd_jax.experiment.layout import CURVE_FILE, EVAL_FILE, model_dirs, run_dirs
from opd_jax.experiment.profiles import by_sentence, mean_profile
from opd_jax.files import atomic_write_text
from opd_jax.train.metrics import read_metrics

TEACHER, STUDENT = "teacher", "student (before OPD)"
DIAGNOSTICS = ("kept_fraction", "released_fraction", "margin_mean", "advantage_mean")
MEASURES = ("correct", "steps", "kl", "kl_solution", "kl_recap")
SENTENCES_SHOWN = 10  # sentence indices in diagnostics.md


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def rule_label(rule: str) -> str:
    return f"OPD: {rule}"


def evaluations(config: Config) -> dict[str, list[dict[str, Any]]]:
    """``{row label: [eval.json of each seed]}`` for every model evaluated so far, in table
    order: teacher, student before OPD, then the rules."""
    out: dict[str, list[dict[str, Any]]] = {}
    for role, label in (("teacher", TEACHER), ("student", STUDENT)):
        evaluation = _read(model_dirs(config)[role] / EVAL_FILE)
        if evaluation:
            out[label] = [evaluation]
    for rule in config.experiment.rules:
        dirs = [d for (r, _), d in run_dirs(config).items() if r == rule]
        done = [e for e in (_read(d / EVAL_FILE) for d in dirs) if e]
        if done:
            out[rule_label(rule)] = done
    return out


def per_problem(evals: list[dict[str, Any]], split: str, measure: str) -> np.ndarray | None:
    """``[P]``: a measure averaged over seeds and samples per problem (NaNs left out);
    None when the evaluations lack it."""
    if any(measure not in e.get(split, {}) for e in evals):
        return None
    stacked = np.concatenate([np.asarray(e[split][measure], np.float64) for e in evals], axis=1)
    with warnings.catch_warnings():  # a problem whose samples all lack a recap: NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmean(stacked, axis=1)
    return values[np.isfinite(values)] if measure.startswith("kl") else values


def accuracy_table(config: Config, evals: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The JSON-ready accuracy table (module doc), with each seed's own value per rule."""
    splits = config.experiment.eval_splits
    results = {
        label: {s: mean_and_stderr(per_problem(runs, s, "correct")) for s in splits}
        for label, runs in evals.items()
    }
    e = config.experiment
    metric = f"accuracy, avg@{e.eval_k} at temperature {e.eval_temperature} over seeds {e.seeds}"
    table = benchmark_table(results, list(splits), metric=metric, row_label="model")
    table["seeds"] = {
        label: [mean_and_stderr(per_problem([run], splits[0], "correct")).value for run in runs]
        for label, runs in evals.items()
        if label.startswith("OPD")
    }
    return table


def _estimate(values: np.ndarray | None) -> dict[str, float] | None:
    return None if values is None or values.size == 0 else mean_and_stderr(values).to_dict()


def measures(config: Config, evals: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """In-domain measures per model (module doc): ``{label: {measure: {value, stderr}}}``."""
    split = config.experiment.eval_splits[0]
    before = evals.get(STUDENT)
    rows = {}
    for label, runs in evals.items():
        row = {m: _estimate(per_problem(runs, split, m)) for m in MEASURES}
        if before and label != STUDENT:
            a, b = (per_problem(r, split, "correct") for r in (runs, before))
            row["correct_change"] = paired_difference(a, b).to_dict()
        rows[label] = row
    return {"split": split, "rows": rows}


def _test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    difference = paired_difference(a, b)
    z = difference.value / difference.stderr if difference.stderr > 0 else 0.0
    return {**difference.to_dict(), "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def comparisons(config: Config, evals: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Paired tests of accuracy (module doc), one dict per pair and split."""
    pairs = [(rule_label(r), STUDENT) for r in config.experiment.rules]
    if "release" in config.experiment.rules:
        release = rule_label("release")
        pairs += [(release, rule_label(r)) for r in config.experiment.rules if r != "release"]
    out = []
    for a, b in pairs:
        if a not in evals or b not in evals:
            continue
        for split in config.experiment.eval_splits:
            values = (per_problem(evals[x], split, "correct") for x in (a, b))
            out.append({"a": a, "b": b, "split": split, **_test(*values)})
    return out


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


def diagnostics(config: Config) -> dict[str, dict[str, Any]]:
    """Per rule: means over steps and seeds of :data:`DIAGNOSTICS`, the first and last fifth
    of the margin profile, the margin and advantage by sentence index, and the last loss."""
    out = {}
    for rule, runs in run_records(config).items():
        records = [r for run in runs for r in run]
        row: dict[str, Any] = {
            name: float(np.mean([r[name] for r in records if name in r])) for name in DIAGNOSTICS
        }
        margin = mean_profile(records, "margin_by_position")
        fifth = max(len(margin) // 5, 1)
        row["margin_first_fifth"] = float(margin[:fifth].mean())
        row["margin_last_fifth"] = float(margin[-fifth:].mean())
        row["final_loss"] = float(np.mean([run[-1]["loss"] for run in runs if run]))
        for name in ("margin_by_sentence", "advantage_by_sentence"):
            profile = by_sentence(records, name)
            if profile is not None:
                row[name] = [None if np.isnan(v) else float(v) for v in profile]
        out[rule] = row
    return out


def _cell(estimate: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if estimate is None:
        return "–"
    return f"{estimate['value'] * scale:.{digits}f} ± {estimate['stderr'] * scale:.{digits}f}"


def measures_markdown(table: dict[str, Any]) -> str:
    header = (
        "| model | accuracy (%) | change from the student (points) | correct steps (%) "
        "| KL to teacher | KL, solution | KL, recap |"
    )
    lines = [
        f"In-domain measures on `{table['split']}` (± standard error over problems; the change"
        " is paired per problem; KL in nats per token on the model's own samples)",
        "",
        header,
        "|---|" + "---:|" * 6,
    ]
    for label, row in table["rows"].items():
        cells = [
            _cell(row["correct"], 100, 1),
            _cell(row.get("correct_change"), 100, 1),
            _cell(row["steps"], 100, 1),
            _cell(row["kl"]),
            _cell(row["kl_solution"]),
            _cell(row["kl_recap"]),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Paired differences of accuracy (a - b, points; standard error over problems; z and"
        " two-sided p from the normal approximation)",
        "",
        "| a | b | split | a - b | z | p |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        cell = _cell(r, 100, 1)
        lines.append(
            f"| {r['a']} | {r['b']} | {r['split']} | {cell} | {r['z']:.2f} | {r['p']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def diagnostics_markdown(rows: dict[str, dict[str, Any]]) -> str:
    columns = (*DIAGNOSTICS, "margin_first_fifth", "margin_last_fifth", "final_loss")
    lines = ["| rule | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for rule, row in rows.items():
        cells = [f"{row[c]:.3f}" if c in row else "–" for c in columns]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    shown = SENTENCES_SHOWN
    lines += [
        "",
        "Margin (gap, nats) and advantage (nats) by sentence index of the response, per rule's"
        " rollouts (rows reaching the index weighted equally):",
        "",
        "| rule | quantity | " + " | ".join(str(i + 1) for i in range(shown)) + " |",
        "|---|---|" + "---:|" * shown,
    ]
    for rule, row in rows.items():
        for name in ("margin_by_sentence", "advantage_by_sentence"):
            values = (row.get(name) or [])[:shown]
            cells = ["–" if v is None else f"{v:.2f}" for v in values]
            cells += ["–"] * (shown - len(cells))
            lines.append(f"| {rule} | {name.split('_')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(root: Path, name: str, content: Any, markdown: str) -> None:
    atomic_write_text(root / f"{name}.json", json.dumps(content, indent=2) + "\n")
    atomic_write_text(root / f"{name}.md", markdown)


def write_report(config: Config) -> dict[str, Any]:
    """Writes the tables and plots (module doc), prints the tables; returns them."""
    from opd_jax.experiment.plots import write_plots

    root = Path(config.run.dir)
    evals = evaluations(config)
    table = accuracy_table(config, evals)
    _write(root, "table", table, to_markdown(table))
    measured = measures(config, evals)
    _write(root, "measures", measured, measures_markdown(measured))
    compared = comparisons(config, evals)
    _write(root, "comparisons", compared, comparisons_markdown(compared))
    rows = diagnostics(config)
    _write(root, "diagnostics", rows, diagnostics_markdown(rows))
    plots = write_plots(run_records(config), curves(config), root / "plots")
    for text in (
        to_markdown(table),
        measures_markdown(measured),
        comparisons_markdown(compared),
        diagnostics_markdown(rows),
    ):
        print(text, flush=True)
    print("plots: " + ", ".join(str(p) for p in plots), flush=True)
    return {
        "table": table,
        "measures": measured,
        "comparisons": compared,
        "diagnostics": rows,
        "plots": plots,
    }
