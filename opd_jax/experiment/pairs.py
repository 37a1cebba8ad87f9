"""Several independently trained teacher/student pairs: the whole experiment once per pair, and
a summary of each comparison across pairs.

``experiment.pairs: [0, 1]`` runs the experiment for each pair seed ``p`` in
``run.dir/pair<p>/`` (its own models, OPD runs and report; the task data and tokenizer are the
same), with the models' seeds shifted by ``2p`` (pair 0 is the single-pair experiment's
teacher and student). ``pairs.md``/``.json`` in ``run.dir`` then list every comparison of the
pairs' ``comparisons.json`` (seed-level, :mod:`.inference`) side by side, with the SD of the
difference over pairs: a claim holds only if it holds on each pair.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.config import Config
from opd_jax.files import atomic_write_text

ALPHA = 0.05  # a comparison "holds" on a pair when its difference is > 0 with p < ALPHA
PAIRS_FILE = "pairs"


def pair_dir(config: Config, pair: int) -> Path:
    return Path(config.run.dir) / f"pair{pair}"


def pair_config(config: Config, pair: int) -> Config:
    """The config of pair ``pair``'s experiment: ``run.dir/pair<p>``, model seeds shifted by
    ``2 * pair``, the model paths inside it, one pair."""
    root = pair_dir(config, pair)
    models = root / "models"
    return dataclasses.replace(
        config,
        seed=config.seed + 2 * pair,
        run=dataclasses.replace(config.run, dir=str(root)),
        student=dataclasses.replace(config.student, path=str(models / "student")),
        teacher=dataclasses.replace(config.teacher, path=str(models / "teacher")),
        experiment=dataclasses.replace(config.experiment, pairs=[pair]),
    )


def _holds(row: dict[str, Any]) -> bool | None:
    if row.get("p") is None:
        return None
    return row["value"] > 0 and row["p"] < ALPHA


def summarise_pairs(config: Config) -> dict[str, Any]:
    """``{"pairs": [...], "rows": [{a, b, split, per_pair: {"p": row}, spread,
    holds_on_each}]}`` from each pair's ``comparisons.json`` (pairs without one are left out);
    ``spread`` is the SD of the difference over pairs (None under two)."""
    by_key: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    done = []
    for pair in config.experiment.pairs:
        path = pair_dir(config, pair) / "comparisons.json"
        if not path.is_file():
            continue
        done.append(pair)
        for row in json.loads(path.read_text()):
            by_key.setdefault((row["a"], row["b"], row["split"]), {})[str(pair)] = row
    rows = []
    for (a, b, split), per_pair in by_key.items():
        verdicts = [_holds(per_pair[str(p)]) if str(p) in per_pair else None for p in done]
        each = None if None in verdicts else all(verdicts)
        values = [row["value"] for row in per_pair.values()]
        spread = float(np.std(values, ddof=1)) if len(values) > 1 else None
        rows.append(
            {
                "a": a,
                "b": b,
                "split": split,
                "per_pair": per_pair,
                "spread": spread,
                "holds_on_each": each,
            }
        )
    return {"pairs": done, "alpha": ALPHA, "rows": rows}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    text = f"{row['value'] * 100:+.1f}"
    if row.get("stderr") is not None:
        text += f" ± {row['stderr'] * 100:.1f}"
    if row.get("p") is not None:
        text += f" (p = {row['p']:.3g})"
    return text


def pairs_markdown(summary: dict[str, Any]) -> str:
    pairs = summary["pairs"]
    lines = [
        f"Comparisons on each pair (a - b in points, ± standard error over seeds, two-sided p "
        f"with the training run as unit; see each pair's comparisons.md). A claim holds on a "
        f"pair when a - b > 0 with p < {summary['alpha']}; it holds only if it holds on each.",
        "",
        "| a | b | split | "
        + " | ".join(f"pair {p}" for p in pairs)
        + " | SD over pairs | holds on each |",
        "|---|---|---|" + "---:|" * (len(pairs) + 1) + "---|",
    ]
    for row in summary["rows"]:
        cells = [_cell(row["per_pair"].get(str(p))) for p in pairs]
        verdict = {True: "yes", False: "no", None: "–"}[row["holds_on_each"]]
        cells.append("–" if row["spread"] is None else f"{row['spread'] * 100:.1f}")
        lines.append(
            f"| {row['a']} | {row['b']} | {row['split']} | {' | '.join(cells)} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def write_pairs_summary(config: Config) -> dict[str, Any]:
    """Writes ``pairs.json`` and ``pairs.md`` to ``run.dir``; returns the summary."""
    summary = summarise_pairs(config)
    root = Path(config.run.dir)
    atomic_write_text(root / f"{PAIRS_FILE}.json", json.dumps(summary, indent=1) + "\n")
    text = pairs_markdown(summary)
    atomic_write_text(root / f"{PAIRS_FILE}.md", text)
    print(text, flush=True)
    return summary
