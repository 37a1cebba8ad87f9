"""``opd-jax experiment``: the offline strong-to-weak experiment, end to end.

Stages, each resumable (a finished stage is skipped, a run cut short resumes from its last
checkpoint):

1. models (:mod:`opd_jax.experiment.models`): tokenizer, teacher and student fine-tuned on the
   task from scratch;
2. evaluation of the teacher and the student before OPD on ``experiment.eval_splits``
   (:mod:`opd_jax.experiment.evaluation`; ``eval.json`` per model);
3. OPD of the same student under each rule of ``experiment.rules`` and each seed of
   ``experiment.seeds`` (``opd/<rule>/seed<seed>/``, ordinary run directories), with
   in-domain accuracy every ``experiment.curve_every`` steps (``curve.json``) and the
   evaluation of the trained student at the last step. A matched control
   ``<kind>@<reference>`` (e.g. ``random@release``) runs ``kind`` with its fraction option
   (``ratio`` or ``rho``) set to the mean kept fraction of the ``reference`` run of the same
   seed, which runs before it; the value is kept in its ``matched.json`` and ``config.yaml``;
4. the report (:mod:`opd_jax.experiment.report`): ``table.md``/``table.json``, diagnostics,
   and the plots in ``plots/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opd_jax import models
from opd_jax.config import (
    Config,
    ConfigError,
    load_tree,
    validate,
)
from opd_jax.core import RULES
from opd_jax.data.arithmetic import SPLITS
from opd_jax.experiment.evaluation import evaluate_model
from opd_jax.experiment.layout import (
    EVAL_FILE,
    FRACTION_OPTIONS,
    MATCH,
    TIMINGS_FILE,
    fraction_option,
    split_rule,
)
from opd_jax.experiment.models import prepare_models
from opd_jax.experiment.opd_runs import run_all
from opd_jax.experiment.pairs import pair_config, pair_dir, write_pairs_summary
from opd_jax.experiment.timings import StageClock
from opd_jax.run_lock import hold


def _with_models(config: Config) -> Config:
    models_dir = Path(config.run.dir) / "models"
    return dataclasses.replace(
        config,
        student=dataclasses.replace(config.student, path=str(models_dir / "student")),
        teacher=dataclasses.replace(config.teacher, path=str(models_dir / "teacher")),
    )


def check_experiment(config: Config) -> Config:
    """Checks the ``experiment`` section (the rest is checked as for ``opd-jax train``)."""
    e = config.experiment
    if config.data.source != "arithmetic":
        raise ConfigError("the experiment runs on the built-in task: set data.source=arithmetic.")
    for rule in e.rules:
        check_rule_name(rule, e.rules)
    if not e.rules or not e.seeds:
        raise ConfigError("experiment.rules and experiment.seeds must each name at least one.")
    if len(set(e.rules)) != len(e.rules) or len(set(e.seeds)) != len(e.seeds):
        raise ConfigError("experiment.rules and experiment.seeds must not repeat an entry.")
    if not e.pairs or len(set(e.pairs)) != len(e.pairs) or min(e.pairs) < 0:
        raise ConfigError(
            f"experiment.pairs must name distinct pair seeds >= 0, e.g. [0, 1]; got {e.pairs}."
        )
    for split in e.eval_splits:
        if split not in SPLITS:
            raise ConfigError(f"experiment.eval_splits: {split!r} is not one of {list(SPLITS)}.")
    for role in ("teacher", "student"):
        shape = getattr(e, role).shape
        if shape.heads % shape.kv_heads:
            raise ConfigError(
                f"experiment.{role}.shape.heads={shape.heads} must be a multiple of "
                f"kv_heads={shape.kv_heads}."
            )
    return config


def check_rule_name(rule: str, rules: Sequence[str]) -> None:
    """``rule`` is a rule of :data:`~opd_jax.core.RULES`, or a matched control
    ``<kind>@<reference>`` of a rule with a fraction option and a plain rule of ``rules``."""
    kind, reference = split_rule(rule)
    if kind not in RULES:
        raise ConfigError(f"experiment.rules: {rule!r} is not one of {sorted(RULES)}.")
    if MATCH not in rule:
        return
    if reference not in RULES:  # also empty, or itself matched
        raise ConfigError(
            f"experiment.rules: {rule!r} must name a plain rule after {MATCH!r} (e.g. "
            f"{kind}{MATCH}release), one of {sorted(RULES)}."
        )
    if fraction_option(kind) is None:
        raise ConfigError(
            f"experiment.rules: {rule!r} matches the kept fraction of {reference!r}, but "
            f"{kind!r} has no option {' or '.join(FRACTION_OPTIONS)} to set it; match one of "
            f"{sorted(k for k in RULES if fraction_option(k))}."
        )
    if reference not in rules:
        raise ConfigError(
            f"experiment.rules: {rule!r} runs at the kept fraction of the {reference!r} run of "
            f"each seed, but {reference!r} is not in experiment.rules: add it."
        )


def load_experiment_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, full: bool = False
) -> Config:
    """The experiment's :class:`Config`: YAML, then ``experiment.full`` when ``full``, then
    ``overrides``; the model paths point into ``run.dir/models``."""
    config = load_tree(Config, path, overrides)
    if full:
        if not config.experiment.full:
            raise ConfigError(f"{path} has no experiment.full section for --full.")
        extra = [f"{key}={json.dumps(value)}" for key, value in config.experiment.full.items()]
        config = load_tree(Config, path, [*extra, *overrides])
    return check_experiment(validate(_with_models(config)))


def run_experiment(config: Config) -> dict[str, Any] | None:
    """Runs every stage (see the module doc) with ``run.dir`` locked for this experiment
    (:mod:`opd_jax.run_lock`); returns the report of
    :func:`opd_jax.experiment.report.write_report`, or None when an OPD run was stopped
    early (SIGTERM, SIGINT): its last checkpoint is kept and running again resumes it. With
    several ``experiment.pairs``, the stages run once per pair (:mod:`.pairs`) and the report
    is ``{"pairs": {p: report}, "summary": ...}``."""
    with hold(config.run.dir, "opd-jax experiment"):
        if config.experiment.pairs == [0]:
            return _run_stages(config)
        reports = {}
        for pair in config.experiment.pairs:
            print(f"== pair {pair}: {pair_dir(config, pair)}", flush=True)
            report = _run_stages(pair_config(config, pair))
            if report is None:
                return None
            reports[pair] = report
        return {"pairs": reports, "summary": write_pairs_summary(config)}


def _run_stages(config: Config) -> dict[str, Any] | None:
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    from opd_jax.experiment.plots import log_to_wandb
    from opd_jax.experiment.report import write_report
    from opd_jax.train.preflight import check_loggers

    check_loggers(config)  # before any model trains
    tfds.disable_progress_bar()
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS's "custom data configuration" notes
    start = time.perf_counter()
    clock = StageClock(Path(config.run.dir) / TIMINGS_FILE)
    with clock("models"):
        paths = prepare_models(config)
    teacher, tokenizer = models.load(paths["teacher"])
    with clock("evaluate teacher"):
        evaluate_model(teacher, None, tokenizer, config, paths["teacher"] / EVAL_FILE)
    with clock("evaluate student"):
        student, _ = models.load(paths["student"])
        evaluate_model(student, teacher, tokenizer, config, paths["student"] / EVAL_FILE)
        del student, teacher
    if not run_all(config, clock):
        return None
    with clock("report"):
        report = write_report(config)
        log_to_wandb(config, report["plots"])
    print(f"experiment done in {time.perf_counter() - start:.0f} s: {config.run.dir}", flush=True)
    return report
