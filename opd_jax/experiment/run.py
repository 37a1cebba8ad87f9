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
   evaluation of the trained student at the last step;
4. the report (:mod:`opd_jax.experiment.report`): ``table.md``/``table.json``, diagnostics,
   and the plots in ``plots/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from opd_jax import models
from opd_jax.config import (
    Config,
    ConfigError,
    RuleConfig,
    load_tree,
    validate,
)
from opd_jax.core import RULES
from opd_jax.data.arithmetic import SPLITS
from opd_jax.experiment.evaluation import evaluate_model, evaluate_problems, task_problems
from opd_jax.experiment.layout import CURVE_FILE, EVAL_FILE, TIMINGS_FILE, run_dirs
from opd_jax.experiment.models import prepare_models
from opd_jax.files import atomic_write_text


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
        if rule not in RULES:
            raise ConfigError(f"experiment.rules: {rule!r} is not one of {sorted(RULES)}.")
    if not e.rules or not e.seeds:
        raise ConfigError("experiment.rules and experiment.seeds must each name at least one.")
    if len(set(e.rules)) != len(e.rules) or len(set(e.seeds)) != len(e.seeds):
        raise ConfigError("experiment.rules and experiment.seeds must not repeat an entry.")
    for split in e.eval_splits:
        if split not in SPLITS:
            raise ConfigError(f"experiment.eval_splits: {split!r} is not one of {list(SPLITS)}.")
    positive = {
        "experiment.vocab_size": e.vocab_size,
        "experiment.tokenizer_examples": e.tokenizer_examples,
        "experiment.curve_problems": e.curve_problems,
        "experiment.eval_k": e.eval_k,
        "experiment.eval_max_new_tokens": e.eval_max_new_tokens,
        "experiment.teacher.steps": e.teacher.steps,
        "experiment.student.steps": e.student.steps,
        "experiment.teacher.batch_size": e.teacher.batch_size,
        "experiment.student.batch_size": e.student.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}.")
    if e.curve_every < 0 or e.eval_problems < 0 or e.eval_temperature < 0:
        raise ConfigError(
            "experiment.curve_every, eval_problems and eval_temperature must be >= 0."
        )
    for role in ("teacher", "student"):
        shape = getattr(e, role).shape
        if shape.heads % shape.kv_heads:
            raise ConfigError(
                f"experiment.{role}.shape.heads={shape.heads} must be a multiple of "
                f"kv_heads={shape.kv_heads}."
            )
    return config


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


class Curve:
    """In-domain accuracy (``eval_k`` samples per problem at ``eval_temperature``, as in the
    table) on ``curve_problems`` every ``curve_every`` steps, kept in ``curve.json``; at the
    last step, the run's evaluation (``eval.json``) on the live student."""

    def __init__(
        self, config: Config, problems: list[dict[str, str]], teacher: models.Decoder
    ) -> None:
        self.config, self.problems, self.teacher = config, problems, teacher
        self.path = Path(config.run.dir) / CURVE_FILE
        self.points = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __call__(self, step: int, session) -> None:
        every, last = self.config.experiment.curve_every, self.config.train.steps
        due = every and (step % every == 0 or step == last)
        if not due and step != last:
            return
        model = nnx.merge(session.graphdef, session.params)
        if due:
            e = self.config.experiment
            scored = evaluate_problems(
                model,
                None,
                session.tokenizer,
                self.config,
                self.problems,
                k=e.eval_k,
                temperature=e.eval_temperature,
            )
            self.points[str(step)] = float(np.mean(scored["correct"]))
            atomic_write_text(self.path, json.dumps(self.points, indent=1) + "\n")
        if step == last:
            out = Path(self.config.run.dir) / EVAL_FILE
            evaluate_model(model, self.teacher, session.tokenizer, self.config, out)


class StageClock:
    """Wall seconds of each stage this invocation ran, kept in ``timings.json`` (a stage
    skipped because it finished earlier records its few seconds of checking)."""

    def __init__(self, path: Path) -> None:
        self.path, self.seconds = path, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - start
        atomic_write_text(self.path, json.dumps(self.seconds, indent=1) + "\n")
        print(f"  {stage}: {self.seconds[stage]:.0f} s", flush=True)

    def total(self) -> float:
        return sum(self.seconds.values())


def opd_config(config: Config, rule: str, seed: int, run_dir: Path) -> Config:
    """The config of one OPD run: ``rule`` (with ``rule.options`` if it is ``rule.kind``)."""
    options = dict(config.rule.options) if rule == config.rule.kind else {}
    return dataclasses.replace(
        config,
        seed=seed,
        rule=RuleConfig(kind=rule, options=options),
        run=dataclasses.replace(config.run, dir=str(run_dir)),
    )


def run_experiment(config: Config) -> dict[str, Any] | None:
    """Runs every stage (see the module doc); returns the report of
    :func:`opd_jax.experiment.report.write_report`, or None when an OPD run was stopped
    early (SIGTERM): its last checkpoint is kept and running again resumes it."""
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    from opd_jax.experiment.report import write_report
    from opd_jax.train.loop import Status, train
    from opd_jax.train.state import restore_student

    tfds.disable_progress_bar()
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS's "custom data configuration" notes
    Path(config.run.dir).mkdir(parents=True, exist_ok=True)
    clock = StageClock(Path(config.run.dir) / TIMINGS_FILE)
    with clock("models"):
        paths = prepare_models(config)
    teacher, tokenizer = models.load(paths["teacher"])
    with clock("evaluate teacher"):
        evaluate_model(teacher, None, tokenizer, config, paths["teacher"] / EVAL_FILE)
    with clock("evaluate student"):
        student, _ = models.load(paths["student"])
        evaluate_model(student, teacher, tokenizer, config, paths["student"] / EVAL_FILE)
        del student
    curve_problems = task_problems(config, config.experiment.eval_splits[0])
    curve_problems = curve_problems[: config.experiment.curve_problems]
    runs = run_dirs(config)
    for index, ((rule, seed), run_dir) in enumerate(runs.items()):
        run_config = opd_config(config, rule, seed, run_dir)
        print(f"[{index + 1}/{len(runs)}] OPD rule={rule} seed={seed} -> {run_dir}", flush=True)
        with clock(f"opd {rule} seed {seed}"):
            result = train(run_config, on_step=Curve(run_config, curve_problems, teacher))
            if result.status is Status.STOPPED:
                print(f"stopped in {run_dir}: run the same command again to resume", flush=True)
                return None
            if not (run_dir / EVAL_FILE).is_file():  # finished earlier, evaluation cut short
                student, _ = restore_student(run_dir)
                evaluate_model(student, teacher, tokenizer, run_config, run_dir / EVAL_FILE)
    with clock("report"):
        report = write_report(config)
    print(f"experiment done in {clock.total():.0f} s: {config.run.dir}", flush=True)
    return report
