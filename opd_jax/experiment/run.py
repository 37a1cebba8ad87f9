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

import contextlib
import dataclasses
import json
import subprocess
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
from opd_jax.core import RULES, rule_options
from opd_jax.data.arithmetic import SPLITS
from opd_jax.errors import InputError
from opd_jax.experiment.evaluation import evaluate_model, evaluate_problems, task_problems
from opd_jax.experiment.layout import (
    CURVE_FILE,
    EVAL_FILE,
    MATCH,
    MATCHED_FILE,
    TIMINGS_FILE,
    run_dirs,
    split_rule,
)
from opd_jax.experiment.models import prepare_models
from opd_jax.files import atomic_write_text
from opd_jax.run_lock import hold
from opd_jax.train.metrics import read_metrics

FRACTION_OPTIONS = ("ratio", "rho")  # what a matched control sets, the first its rule has


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


def fraction_option(kind: str) -> str | None:
    """The option of rule ``kind`` that sets the fraction of tokens it keeps (``ratio``,
    ``rho``), which a matched control sets; None when it has none."""
    return next((o for o in FRACTION_OPTIONS if o in rule_options(kind)), None)


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


def git_commit() -> str | None:
    """The commit of the code that runs (``git rev-parse HEAD`` beside this package), or None
    where git or the repository is missing."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


class StageClock:
    """Wall seconds of each stage, kept in ``timings.json`` across invocations::

        {"models": {"seconds": 371.2, "invocations": [{"seconds": 371.0, "commit": "cec6..."},
                                                      {"seconds": 0.2, "commit": "cec6..."}]}}

    ``seconds`` sums the stage's invocations (one that skipped a finished stage adds its few
    seconds of checking), so a resumed experiment keeps the times of the runs that did the
    work. The file is rewritten atomically after each stage; an older file of bare seconds per
    stage is read as one invocation of unknown commit."""

    def __init__(self, path: Path) -> None:
        self.path, self.seconds = path, {}
        self.commit = git_commit()
        self.stages = {name: _stage_entry(value) for name, value in _read_json(path).items()}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        seconds = self.seconds[stage] = time.perf_counter() - start
        entry = self.stages.setdefault(stage, {"seconds": 0.0, "invocations": []})
        entry["invocations"].append({"seconds": seconds, "commit": self.commit})
        entry["seconds"] = sum(i["seconds"] for i in entry["invocations"])
        atomic_write_text(self.path, json.dumps(self.stages, indent=1) + "\n")
        print(f"  {stage}: {seconds:.0f} s", flush=True)

    def total(self) -> float:
        """Seconds of the stages this invocation ran."""
        return sum(self.seconds.values())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


def _stage_entry(value: float | dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    return {"seconds": float(value), "invocations": [{"seconds": float(value), "commit": None}]}


def reference_kept_fraction(run_dir: Path) -> tuple[float, int]:
    """``(mean, steps)``: the mean over the logged steps of a finished run's ``kept_fraction``
    (``metrics.jsonl``; a step logged twice counts once, its last line)."""
    records = read_metrics(run_dir)
    by_step = {r["step"]: r["kept_fraction"] for r in records if "kept_fraction" in r}
    if not by_step:
        raise InputError(
            f"{run_dir} has no kept_fraction in its metrics.jsonl: the controls matched to it "
            "read it from its finished run; run the experiment again to redo that run."
        )
    return float(np.mean(list(by_step.values()))), len(by_step)


def matched_fraction(config: Config, rule: str, seed: int) -> float | None:
    """The fraction a matched control ``rule`` runs at on ``seed`` (None for a plain rule):
    the one in its ``matched.json`` once it has started, else its reference run's mean kept
    fraction (:func:`reference_kept_fraction`), then recorded in ``matched.json``."""
    kind, reference = split_rule(rule)
    if reference is None:
        return None
    dirs = run_dirs(config)
    path = dirs[rule, seed] / MATCHED_FILE
    if path.is_file():
        return float(json.loads(path.read_text())["value"])
    value, steps = reference_kept_fraction(dirs[reference, seed])
    record = {
        "rule": rule,
        "kind": kind,
        "option": fraction_option(kind),
        "value": value,
        "reference": reference,
        "reference_run": str(dirs[reference, seed]),
        "reference_steps": steps,
    }
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return value


def opd_config(
    config: Config, rule: str, seed: int, run_dir: Path, fraction: float | None = None
) -> Config:
    """The config of one OPD run: ``rule``'s kind (with ``rule.options`` if it is
    ``rule.kind``); a matched control's fraction option set to ``fraction``
    (:func:`matched_fraction`)."""
    kind, reference = split_rule(rule)
    options = dict(config.rule.options) if kind == config.rule.kind else {}
    if reference is not None:
        if fraction is None:
            raise ValueError(f"the matched control {rule!r} needs its fraction.")
        options[fraction_option(kind)] = fraction
    return dataclasses.replace(
        config,
        seed=seed,
        rule=RuleConfig(kind=kind, options=options),
        run=dataclasses.replace(config.run, dir=str(run_dir)),
    )


def run_experiment(config: Config) -> dict[str, Any] | None:
    """Runs every stage (see the module doc) with ``run.dir`` locked for this experiment
    (:mod:`opd_jax.run_lock`); returns the report of
    :func:`opd_jax.experiment.report.write_report`, or None when an OPD run was stopped
    early (SIGTERM, SIGINT): its last checkpoint is kept and running again resumes it."""
    with hold(config.run.dir, "opd-jax experiment"):
        return _run_stages(config)


def _run_stages(config: Config) -> dict[str, Any] | None:
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    from opd_jax.experiment.report import write_report
    from opd_jax.train.loop import Status, train
    from opd_jax.train.state import restore_student

    tfds.disable_progress_bar()
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS's "custom data configuration" notes
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
        fraction = matched_fraction(config, rule, seed)
        run_config = opd_config(config, rule, seed, run_dir, fraction)
        at = "" if fraction is None else f" with {run_config.rule.options}"
        print(f"[{index + 1}/{len(runs)}] OPD rule={rule}{at} seed={seed} -> {run_dir}", flush=True)
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
