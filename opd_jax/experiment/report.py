"""The experiment's report: accuracy and distillation measures, paired comparisons, training
diagnostics and plots, all read back from the run directory (:mod:`.layout`), so the report
can be redone from a finished experiment. Written to ``run.dir``:

- ``table.md``/``.json``: accuracy (%) of the teacher, the student before OPD and each rule on
  every eval split and their average. A rule's cell pools its seeds: each problem's correctness
  is averaged over seeds and samples; the standard error is over problems. ``seed_sd``: per
  rule, the standard deviation over seeds of each seed's accuracy (the spread of runs).
- ``measures.md``/``.json``: in domain, per model: accuracy, its change from the student
  before OPD (paired per problem), the fraction of correct solution steps, and the per-token
  reverse KL to the teacher on the model's own samples (whole response, solution, recap);
  errors over problems, seeds pooled; per rule, the fraction of response tokens it kept.
- ``comparisons.md``/``.json``: every rule against the student before OPD, and ``release``
  against every other rule, on every split, with the training run as unit
  (:mod:`.inference`): the mean of per-seed paired differences, its standard error over seeds,
  t, df, two-sided p and a hierarchical bootstrap interval; ``problem_level`` keeps the test
  that pools seeds (standard error over problems, normal z and p).
- ``diagnostics.md``/``.json``: per rule, over all steps and seeds: kept and released
  fractions, margin and advantage means, the margin of the first and last fifth of the
  response, by sentence index, and the last loss; each matched control (``random@release``)
  beside its reference: the fraction it was set to, and both kept fractions.
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
from opd_jax.eval.accuracy import mean_and_stderr, paired_difference
from opd_jax.eval.tables import AVERAGE, benchmark_table, to_markdown
from opd_jax.experiment.inference import (
    PerSeed,
    hierarchical_bootstrap,
    paired_seed_test,
    pooled_estimate,
)
from opd_jax.experiment.layout import CURVE_FILE, EVAL_FILE, MATCHED_FILE, model_dirs, run_dirs
from opd_jax.experiment.profile_means import by_sentence, mean_profile
from opd_jax.files import atomic_write_text
from opd_jax.train.metrics import read_metrics

TEACHER, STUDENT = "teacher", "student (before OPD)"
DIAGNOSTICS = ("kept_fraction", "released_fraction", "margin_mean", "advantage_mean")
MEASURES = ("correct", "steps", "kl", "kl_solution", "kl_recap")
SENTENCES_SHOWN = 10  # sentence indices in diagnostics.md
BOOTSTRAP = {"resamples": 2000, "confidence": 0.95, "seed": 0}  # comparisons' intervals
Runs = dict[int | None, dict[str, Any]]  # {seed: eval.json}; seed None: trained once
Evaluations = dict[str, Runs]  # {row label: runs}


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def rule_label(rule: str) -> str:
    return f"OPD: {rule}"


def evaluations(config: Config) -> Evaluations:
    """``{row label: {seed: eval.json}}`` for every model evaluated so far, in table order:
    teacher, student before OPD (each trained once: seed None), then the rules."""
    out: Evaluations = {}
    for role, label in (("teacher", TEACHER), ("student", STUDENT)):
        evaluation = _read(model_dirs(config)[role] / EVAL_FILE)
        if evaluation:
            out[label] = {None: evaluation}
    for rule in config.experiment.rules:
        runs = {s: _read(d / EVAL_FILE) for (r, s), d in run_dirs(config).items() if r == rule}
        done = {s: e for s, e in runs.items() if e}
        if done:
            out[rule_label(rule)] = done
    return out


def per_seed(runs: Runs, split: str) -> PerSeed:
    """``{seed: [P]}``: each run's accuracy per problem (the mean of its samples)."""
    return {s: np.asarray(e[split]["correct"], np.float64).mean(axis=1) for s, e in runs.items()}


def per_problem(runs: Runs, split: str, measure: str) -> np.ndarray | None:
    """``[P]``: a measure averaged over seeds and samples per problem (NaNs left out);
    None when the evaluations lack it."""
    evals = list(runs.values())
    if any(measure not in e.get(split, {}) for e in evals):
        return None
    stacked = np.concatenate([np.asarray(e[split][measure], np.float64) for e in evals], axis=1)
    with warnings.catch_warnings():  # a problem whose samples all lack a recap: NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmean(stacked, axis=1)
    return values[np.isfinite(values)] if measure.startswith("kl") else values


def accuracy_table(config: Config, evals: Evaluations) -> dict[str, Any]:
    """The JSON-ready accuracy table (module doc). Per rule, ``seeds``: each seed's accuracy
    on the first split; ``seed_sd``: ``{column: sd over seeds}`` (None under 2 seeds), the
    average column's from each seed's average over the splits."""
    splits = config.experiment.eval_splits
    results = {
        label: {s: mean_and_stderr(per_problem(runs, s, "correct")) for s in splits}
        for label, runs in evals.items()
    }
    e = config.experiment
    metric = f"accuracy, avg@{e.eval_k} at temperature {e.eval_temperature} over seeds {e.seeds}"
    table = benchmark_table(results, list(splits), metric=metric, row_label="model")
    table["seeds"], table["seed_sd"] = {}, {}
    for label, runs in evals.items():
        if label.startswith("OPD"):
            rows = {s: pooled_estimate(per_seed(runs, s)) for s in splits}
            table["seeds"][label] = list(rows[splits[0]].per_seed)
            average_S = np.mean([r.per_seed for r in rows.values()], axis=0)
            average = float(np.std(average_S, ddof=1)) if average_S.size > 1 else None
            table["seed_sd"][label] = {**{s: r.seed_sd for s, r in rows.items()}, AVERAGE: average}
    return table


def _estimate(values: np.ndarray | None) -> dict[str, float] | None:
    return None if values is None or values.size == 0 else mean_and_stderr(values).to_dict()


def measures(config: Config, evals: Evaluations) -> dict[str, Any]:
    """In-domain measures per model (module doc): ``{label: {measure: {value, stderr}}}``,
    and a rule's ``kept_fraction`` (mean over steps and seeds)."""
    split = config.experiment.eval_splits[0]
    before = evals.get(STUDENT)
    kept = {rule_label(rule): row["kept_fraction"] for rule, row in diagnostics(config).items()}
    rows = {}
    for label, runs in evals.items():
        row = {m: _estimate(per_problem(runs, split, m)) for m in MEASURES}
        if before and label != STUDENT:
            a, b = (per_problem(r, split, "correct") for r in (runs, before))
            row["correct_change"] = paired_difference(a, b).to_dict()
        rows[label] = row | ({"kept_fraction": kept[label]} if label in kept else {})
    return {"split": split, "rows": rows}


def problem_level_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Seeds pooled: ``{value, stderr, z, p}`` of ``a - b [P]`` paired per problem, standard
    error over problems, two-sided normal p (z = 0 when the stderr is 0)."""
    difference = paired_difference(a, b)
    z = difference.value / difference.stderr if difference.stderr > 0 else 0.0
    return {**difference.to_dict(), "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def comparisons(config: Config, evals: Evaluations) -> list[dict[str, Any]]:
    """Paired tests of accuracy (module doc), one dict per pair and split: the
    :class:`~.inference.SeedTest` fields, ``interval`` (:class:`~.inference.Interval` or None)
    and ``problem_level``. Against the student (one model), each seed's run is paired with it."""
    pairs = [(rule_label(r), STUDENT) for r in config.experiment.rules]
    if "release" in config.experiment.rules:
        release = rule_label("release")
        pairs += [(release, rule_label(r)) for r in config.experiment.rules if r != "release"]
    out = []
    for a, b in pairs:
        if a not in evals or b not in evals:
            continue
        for split in config.experiment.eval_splits:
            x_a, x_b = per_seed(evals[a], split), per_seed(evals[b], split)
            if b == STUDENT:
                x_b = {s: x_b[None] for s in x_a}
            interval = hierarchical_bootstrap(x_a, x_b, **BOOTSTRAP)
            pooled = (per_problem(evals[x], split, "correct") for x in (a, b))
            row = {"a": a, "b": b, "split": split, **paired_seed_test(x_a, x_b).to_dict()}
            row["interval"] = interval.to_dict() if interval else None
            out.append({**row, "problem_level": problem_level_test(*pooled)})
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


def matched_controls(config: Config) -> dict[str, dict[str, Any]]:
    """``{control: {reference, option, value, seeds}}`` of the matched controls started so far:
    the option set and its value (mean over seeds; ``seeds``: ``{seed: value}``)."""
    out: dict[str, dict[str, Any]] = {}
    for (rule, seed), run_dir in run_dirs(config).items():
        record = _read(run_dir / MATCHED_FILE)  # only a matched control has one
        if record:
            entry = out.setdefault(rule, {k: record[k] for k in ("reference", "option")})
            entry.setdefault("seeds", {})[seed] = record["value"]
            entry["value"] = float(np.mean(list(entry["seeds"].values())))
    return out


def diagnostics(config: Config) -> dict[str, dict[str, Any]]:
    """Per rule: means over steps and seeds of :data:`DIAGNOSTICS`, the first and last fifth
    of the margin profile, the margin and advantage by sentence index, and the last loss;
    a matched control's ``matched`` (:func:`matched_controls`) with ``reference_kept``, its
    reference's kept fraction."""
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
    for rule, matched in matched_controls(config).items():
        if rule in out:
            reference_kept = out.get(matched["reference"], {}).get("kept_fraction")
            out[rule]["matched"] = matched | {"reference_kept": reference_kept}
    return out


def _cell(estimate: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if estimate is None:
        return "–"
    return f"{estimate['value'] * scale:.{digits}f} ± {estimate['stderr'] * scale:.{digits}f}"


def measures_markdown(table: dict[str, Any]) -> str:
    header = (
        "| model | accuracy (%) | change from the student (points) | correct steps (%) "
        "| KL to teacher | KL, solution | KL, recap | kept (%) |"
    )
    lines = [
        f"In-domain measures on `{table['split']}` (± standard error over problems, a rule's"
        " seeds pooled per problem, which leaves out the variation between training runs:"
        " comparisons.md tests over seeds; the change is paired per problem; KL in nats per"
        " token on the model's own samples; kept: the rule's fraction of response tokens with"
        " loss weight, mean over steps and seeds)",
        "",
        header,
        "|---|" + "---:|" * 7,
    ]
    for label, row in table["rows"].items():
        cells = [
            _cell(row["correct"], 100, 1),
            _cell(row.get("correct_change"), 100, 1),
            _cell(row["steps"], 100, 1),
            _cell(row["kl"]),
            _cell(row["kl_solution"]),
            _cell(row["kl_recap"]),
            _points(row.get("kept_fraction"), ".1f"),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_markdown(table: dict[str, Any]) -> str:
    """The accuracy table, what its errors are over, and the standard deviations over seeds."""
    columns = table["columns"]
    lines = [
        to_markdown(table).rstrip("\n"),
        "",
        "± is the standard error over problems: a rule's cell pools its seeds per problem, which"
        " leaves out the variation between training runs. That variation, the standard deviation"
        " over seeds of each seed's accuracy (points; the average column's from each seed's"
        " average over the splits; – under two seeds):",
        "",
        "| rule | seeds | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for label, row in table["seed_sd"].items():
        cells = ["–" if row[c] is None else f"{row[c] * 100:.1f}" for c in columns]
        lines.append(f"| {label} | {len(table['seeds'][label])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _points(value: float | None, spec: str = "+.1f") -> str:
    return "–" if value is None else f"{value * 100:{spec}}"


def comparisons_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per comparison: the seed-level test, its interval, and the problem-level one."""
    level = f"{BOOTSTRAP['confidence']:.0%}"
    counts = sorted({r["n"] for r in rows})
    n = f"n = {counts[0]}" if len(counts) == 1 else "n: the seeds column"
    lines = [
        "Differences of accuracy a - b (points) with the training run as unit: for each seed s"
        " both ran, d_s = a's accuracy - b's on the same prompts (the student before OPD is one"
        " model, paired with every seed's run); a - b is the mean of d_s ± standard error over"
        f" seeds ({n}), t has n - 1 degrees of freedom (df), p is two-sided, and the {level}"
        " interval is a hierarchical bootstrap (seeds, then problems within each seed,"
        f" {BOOTSTRAP['resamples']} resamples). –: undefined (under two seeds, or no spread)."
        " Problem level: seeds pooled per problem, ± standard error over problems, normal p;"
        " it counts the runs as one, so it overstates the evidence.",
        "",
        f"| a | b | split | seeds | a - b | t (df) | p | {level} interval | problem level |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        se = r["stderr"]
        diff = _points(r["value"]) + ("" if se is None else f" ± {_points(se, '.1f')}")
        t = "–" if r["t"] is None else f"{r['t']:.2f} ({r['df']})"
        p = "–" if r["p"] is None else f"{r['p']:.3g}"
        i = r["interval"]
        interval = "–" if i is None else f"[{_points(i['low'])}, {_points(i['high'])}]"
        pl = r["problem_level"]
        problem = f"{_points(pl['value'])} ± {_points(pl['stderr'], '.1f')}, p = {pl['p']:.3g}"
        cells = [r["a"], r["b"], r["split"], str(r["n"]), diff, t, p, interval, problem]
        lines.append("| " + " | ".join(cells) + " |")
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
    matched = {rule: row["matched"] for rule, row in rows.items() if "matched" in row}
    if matched:
        lines += [
            "",
            "Matched controls: each seed's run set to the mean kept fraction of its reference's"
            " run on the same seed (set to: mean over seeds):",
            "",
            "| control | reference | option | set to | kept_fraction | reference kept_fraction |",
            "|---|---|---|---:|---:|---:|",
        ]
        for rule, m in matched.items():
            values = (m["value"], rows[rule].get("kept_fraction"), m["reference_kept"])
            cells = [rule, m["reference"], m["option"]]
            cells += ["–" if v is None else f"{v:.3f}" for v in values]
            lines.append("| " + " | ".join(cells) + " |")
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
    _write(root, "table", table, table_markdown(table))
    measured = measures(config, evals)
    _write(root, "measures", measured, measures_markdown(measured))
    compared = comparisons(config, evals)
    _write(root, "comparisons", compared, comparisons_markdown(compared))
    rows = diagnostics(config)
    _write(root, "diagnostics", rows, diagnostics_markdown(rows))
    plots = write_plots(run_records(config), curves(config), root / "plots")
    for text in (
        table_markdown(table),
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
