"""``opd-jax profile``: where a teacher stops discriminating among a student's candidates.

For a run config's student and teacher (no training), ``batches`` batches of the student's
rollouts on the config's prompts are scored by the OPD objective, and its diagnostics
(docs/method.md §7) are gathered: the teacher's margin over the student's top-K and the sampled
advantage, against relative position in the response and by sentence index; how often the
release rule fires and where it cuts. Written to ``run.dir``:

- ``profile.json``: the summary and every batch's diagnostics;
- ``profile.md``: the two profiles as tables;
- ``plots/margin_advantage.png``, ``plots/margin_by_sentence.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from opd_jax.config import Config
from opd_jax.experiment.plots import margin_advantage, margin_by_sentence
from opd_jax.experiment.profiles import by_sentence
from opd_jax.files import atomic_write_text

SCALARS = ("margin_mean", "advantage_mean", "released_fraction", "kept/release", "response_tokens")


def _by_position(records: list[dict[str, Any]], name: str) -> np.ndarray:
    """A relative-position profile over batches, each bin weighted by its tokens."""
    values = np.asarray([r[name] for r in records], np.float64)
    counts = np.asarray([r["tokens_by_position"] for r in records], np.float64)
    with np.errstate(all="ignore"):
        return (values * counts).sum(0) / counts.sum(0)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over batches of :data:`SCALARS`, and the four profiles (NaN where empty)."""
    summary: dict[str, Any] = {name: float(np.mean([r[name] for r in records])) for name in SCALARS}
    for name in ("margin_by_position", "advantage_by_position"):
        summary[name] = _by_position(records, name).tolist()
    for name in ("margin_by_sentence", "advantage_by_sentence"):
        summary[name] = by_sentence(records, name).tolist()
    summary["rows_by_sentence"] = np.sum([r["rows_by_sentence"] for r in records], 0).tolist()
    return summary


def _markdown(summary: dict[str, Any], label: str) -> str:
    def row(values, digits=2):
        return " | ".join("–" if not np.isfinite(v) else f"{v:.{digits}f}" for v in values)

    bins = len(summary["margin_by_position"])
    sentences = [i for i, n in enumerate(summary["rows_by_sentence"]) if n > 0]
    shown = sentences[-1] + 1 if sentences else 0
    lines = [
        f"Teachability profile of {label}: margin (gap over the student's top-K, nats) and "
        "sampled advantage log p_T(y) - log p_S(y) (nats)",
        "",
        "| " + " | ".join(f"{name}" for name in SCALARS) + " |",
        "|" + "---:|" * len(SCALARS),
        "| " + row([summary[n] for n in SCALARS], 3) + " |",
        "",
        "By relative position t / L (bin centres):",
        "",
        "| quantity | " + " | ".join(f"{(i + 0.5) / bins:.3f}" for i in range(bins)) + " |",
        "|---|" + "---:|" * bins,
        "| margin | " + row(summary["margin_by_position"]) + " |",
        "| advantage | " + row(summary["advantage_by_position"]) + " |",
        "",
        "By sentence index (rows reaching the index in the last line):",
        "",
        "| quantity | " + " | ".join(str(i + 1) for i in range(shown)) + " |",
        "|---|" + "---:|" * shown,
        "| margin | " + row(summary["margin_by_sentence"][:shown]) + " |",
        "| advantage | " + row(summary["advantage_by_sentence"][:shown]) + " |",
        "| rows | " + row(summary["rows_by_sentence"][:shown], 0) + " |",
    ]
    return "\n".join(lines) + "\n"


def profile(config: Config, batches: int, label: str = "the student and teacher") -> dict:
    """Measures the pair of ``config`` on ``batches`` batches (module doc); returns the
    summary and writes the files."""
    from opd_jax.train.preflight import open_data
    from opd_jax.train.session import Session, step_settings
    from opd_jax.train.step import make_score_step

    source = open_data(config)
    session = Session.build(config)
    prompts, _ = session.prompt_iterator(source)
    score = make_score_step(session.graphdef, session.teacher_graphdef, step_settings(config))
    base = jax.random.key(config.seed)
    records = []
    start = time.perf_counter()
    with jax.set_mesh(session.mesh):
        for index in range(batches):
            key_sample, key_rule = jax.random.split(jax.random.fold_in(base, index))
            rollout = session.rollout(*session.encode(next(prompts)["prompt"]), key_sample)
            seg, _ = session.segments(rollout)
            _, diagnostics = score(
                session.params, session.teacher_params, session.device_batch(rollout, seg), key_rule
            )
            records.append({k: np.asarray(v).tolist() for k, v in diagnostics.items()})
            print(f"  batch {index + 1}/{batches}", flush=True)
    summary = summarise(records) | {"seconds": time.perf_counter() - start, "label": label}
    root = Path(config.run.dir)
    atomic_write_text(
        root / "profile.json", json.dumps({"summary": summary, "batches": records}) + "\n"
    )
    atomic_write_text(root / "profile.md", _markdown(summary, label))
    runs = {label: [records]}
    margin_advantage(runs, root / "plots" / "margin_advantage.png")
    margin_by_sentence(runs, root / "plots" / "margin_by_sentence.png")
    print(_markdown(summary, label), flush=True)
    return summary
