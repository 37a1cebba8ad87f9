"""The experiment's figures (matplotlib, Agg backend, PNG), from logged metrics only.

- ``margin_advantage.png``: the teacher's margin over the student's top-K and the sampled
  advantage ``log p_T - log p_S``, averaged over steps and seeds, against relative position in
  the response (20 bins), one line per rule: the paper's central picture.
- ``margin_by_sentence.png``: the same two quantities by sentence index (the series the
  release rule's change point reads), each step's rows reaching an index weighted equally;
  indices reached by fewer than 2% of the rollouts are left out.
- ``boundary_histogram.png``: where the release rule puts its boundary ``t* / L`` on the
  student's rollouts, summed over steps and seeds (computed every step whatever rule trains).
- ``ideal_vs_teacher_by_sentence.png`` (``opd-jax profile --ideal``): the arithmetic task's
  ideal teacher ``p*`` beside the trained teacher by sentence index, on the tokens where
  ``p*`` is defined: margin, advantage, and the share of tokens covered and determined.
- ``accuracy_vs_step.png``: in-domain accuracy (the table's measure) on
  ``experiment.curve_problems`` against OPD step per rule (step 0: the student before OPD),
  the mean over seeds with their range shaded.

With ``wandb`` in ``run.loggers``, :func:`log_to_wandb` logs the report's figures as images
of one new W&B run, ``<run.dir name>-report``, each time the report is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.config import Config
from opd_jax.errors import InputError
from opd_jax.experiment.profile_means import by_sentence, mean_profile

MIN_SHARE = 0.02  # sentence indices reached by fewer of the rollouts are not drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, axes, path: Path) -> Path:
    """Grids and legends ``axes``, then saves ``fig`` through a temporary file renamed into
    place (never a half-written PNG) and closes it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def margin_advantage(records: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_m, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for rule, runs in records.items():
        for ax, name in ((ax_m, "margin_by_position"), (ax_a, "advantage_by_position")):
            values = mean_profile([r for run in runs for r in run], name)
            if values is not None:
                x = (np.arange(len(values)) + 0.5) / len(values)
                ax.plot(x, values, marker="o", markersize=3, label=rule)
    ax_m.set(
        title="teacher margin over the student's top-K",
        xlabel="relative position in the response t / L",
        ylabel="gap (nats)",
    )
    ax_a.set(
        title="sampled advantage log p_T(y) - log p_S(y)",
        xlabel="relative position in the response t / L",
        ylabel="nats",
    )
    ax_a.axhline(0.0, color="grey", linewidth=0.8)
    return _finish(fig, (ax_m, ax_a), path)


def margin_by_sentence(records: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_m, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for rule, runs in records.items():
        flat = [r for run in runs for r in run]
        for ax, name in ((ax_m, "margin_by_sentence"), (ax_a, "advantage_by_sentence")):
            values = by_sentence(flat, name, min_share=MIN_SHARE)
            if values is not None:
                x = np.arange(1, len(values) + 1)
                ax.plot(x, values, marker="o", markersize=3, label=rule)
    ax_m.set(
        title="teacher margin over the student's top-K, sentence mean",
        xlabel="sentence index in the response",
        ylabel="gap (nats)",
    )
    ax_a.set(title="sampled advantage, sentence mean", xlabel="sentence index", ylabel="nats")
    ax_a.axhline(0.0, color="grey", linewidth=0.8)
    return _finish(fig, (ax_m, ax_a), path)


def ideal_vs_teacher_by_sentence(summary: dict[str, Any], path: Path) -> Path:
    """From a profile's summary (``opd_jax.experiment.margin_profile``, its ``ideal`` part); indices
    covered in fewer than :data:`MIN_SHARE` of the rows with a first sentence are left out."""
    plt = _pyplot()
    ideal = summary["ideal"]
    rows = np.asarray(ideal["ideal_margin_rows_by_sentence"], np.float64)
    shown = rows >= max(MIN_SHARE * summary["rows_by_sentence"][0], 1)
    x = np.arange(1, len(rows) + 1)[shown]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), layout="constrained")
    (ax_m, ax_split), (ax_a, ax_c) = axes
    panels = (
        (ax_m, "teacher_margin_covered", "trained teacher"),
        (ax_m, "ideal_margin", "ideal p*"),
        (ax_split, "teacher_margin_determined", "trained teacher, p* determined"),
        (ax_split, "teacher_margin_open", "trained teacher, p* open"),
        (ax_split, "ideal_margin_open", "ideal p*, p* open"),
        (ax_a, "teacher_advantage_covered", "trained teacher"),
        (ax_a, "ideal_advantage", "ideal p*"),
        (ax_c, "coverage", "tokens where p* is defined"),
        (ax_c, "determined", "of those, p* determined"),
    )
    everything = np.asarray(summary["margin_by_sentence"], np.float64)[shown]
    ax_m.plot(x, everything, color="grey", linestyle=":", label="trained teacher, every token")
    for ax, name, label in panels:
        values = np.asarray(ideal[f"{name}_by_sentence"], np.float64)[shown]
        ax.plot(x, values, marker="o", markersize=3, label=label)
    ax_m.set(title="margin over the student's top-K where p* is defined", ylabel="gap (nats)")
    ax_split.set(title="that margin where p* is one token's or not", ylabel="gap (nats)")
    ax_a.set(title="advantage log p(y) - log p_S(y) where p* is defined", ylabel="nats")
    ax_a.axhline(0.0, color="grey", linewidth=0.8)
    ax_c.set(title="the ideal teacher's support", ylabel="share", ylim=(0, 1.05))
    for ax in axes.ravel():
        ax.set_xlabel("sentence index")
    return _finish(fig, axes.ravel(), path)


def boundary_histogram(records: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, runs in records.items():
        counts = mean_profile([r for run in runs for r in run], "boundary_histogram", total=True)
        if counts is not None:
            x = (np.arange(len(counts)) + 0.5) / len(counts)
            ax.step(x, counts, where="mid", label=f"rollouts of {rule}")
    ax.set(
        title="release boundary t* / L (released rollouts)",
        xlabel="t* / L",
        ylabel="rollouts",
        xlim=(0, 1),
    )
    return _finish(fig, (ax,), path)


def accuracy_vs_step(curves: dict[str, list[dict[str, float]]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, seeds in curves.items():
        steps = sorted(set.intersection(*(set(map(int, c)) for c in seeds)))
        values = np.array([[c[str(s)] for s in steps] for c in seeds]) * 100
        line = ax.plot(steps, values.mean(0), marker="o", markersize=3, label=rule)[0]
        if len(seeds) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15, color=line.get_color())
    ax.set(title="in-domain accuracy during OPD", xlabel="OPD step", ylabel="accuracy (%)")
    return _finish(fig, (ax,), path)


def write_plots(
    records: dict[str, list[list[dict[str, Any]]]],
    curves: dict[str, list[dict[str, float]]],
    out_dir: Path,
) -> list[Path]:
    """Writes the module's figures to ``out_dir``; returns their paths (figures without data
    are skipped)."""
    paths = []
    if records:
        paths.append(margin_advantage(records, out_dir / "margin_advantage.png"))
        paths.append(margin_by_sentence(records, out_dir / "margin_by_sentence.png"))
        paths.append(boundary_histogram(records, out_dir / "boundary_histogram.png"))
    if curves:
        paths.append(accuracy_vs_step(curves, out_dir / "accuracy_vs_step.png"))
    return paths


def log_to_wandb(config: Config, paths: Sequence[Path]) -> None:
    """Logs the figures ``paths`` as images (named by file stem) of a new W&B run
    ``<run.dir name>-report`` in ``run.wandb_project``, when ``run.loggers`` has wandb. A W&B
    failure warns: the figures are on disk."""
    if "wandb" not in config.run.loggers or not paths:
        return
    from opd_jax.train.loggers import WandbLogger

    root = Path(config.run.dir)
    logger = WandbLogger(
        root,
        project=config.run.wandb_project,
        config=config.to_dict(),
        name=f"{root.name}-report",
        resume=False,
    )
    try:
        logger.images(0, {path.stem: path for path in paths})
        logger.close()
    except InputError:
        raise
    except Exception as error:  # W&B is a convenience: the report is written
        warnings.warn(
            f"The plots could not be logged to W&B ({type(error).__name__}: {error}); they "
            f"are in {root / 'plots'}.",
            RuntimeWarning,
            stacklevel=2,
        )
