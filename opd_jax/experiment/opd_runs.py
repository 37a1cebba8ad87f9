"""The experiment's OPD runs: one run of a rule and seed (training with its accuracy curve,
then its evaluation), matched controls' fractions, and all runs of an experiment, in
``experiment.workers`` processes at once.

A run is an ordinary run directory (``opd/<rule>/seed<s>/``, :mod:`.layout`); running it again
resumes it. Plain rules run first, then the matched controls (``<kind>@<reference>``), each of
which reads its reference run's kept fraction on the same seed. With ``workers > 1`` the runs
of each of those two phases are spread over a pool of processes (:mod:`.workers`); every run
computes exactly what it would alone (its keys and data derive from its seed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx

from opd_jax import models
from opd_jax.config import Config, RuleConfig
from opd_jax.errors import InputError
from opd_jax.experiment.evaluation import (
    evaluate_model,
    evaluate_problems,
    stored_evaluation,
    task_problems,
)
from opd_jax.experiment.layout import (
    CURVE_FILE,
    EVAL_FILE,
    MATCHED_FILE,
    fraction_option,
    model_dirs,
    run_dirs,
    split_rule,
)
from opd_jax.experiment.timings import StageClock
from opd_jax.experiment.workers import Pool
from opd_jax.files import atomic_write_text
from opd_jax.train.metrics import read_metrics


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


def run_opd(config: Config, rule: str, seed: int) -> bool:
    """Runs (or resumes) the OPD run of ``rule`` and ``seed`` and its evaluation; returns
    whether it finished (False: stopped early by SIGTERM or SIGINT, its checkpoint kept)."""
    from opd_jax.train.checkpoint import restore_student
    from opd_jax.train.loop import Status, train

    run_dir = run_dirs(config)[rule, seed]
    fraction = matched_fraction(config, rule, seed)
    run_config = opd_config(config, rule, seed, run_dir, fraction)
    teacher, tokenizer = models.load(model_dirs(config)["teacher"])
    e = config.experiment
    problems = task_problems(config, e.eval_splits[0])[: e.curve_problems]
    result = train(run_config, on_step=Curve(run_config, problems, teacher))
    if result.status is Status.STOPPED:
        print(f"stopped in {run_dir}: run the same command again to resume", flush=True)
        return False
    if stored_evaluation(run_dir / EVAL_FILE, run_config, True) is None:
        student, _ = restore_student(run_dir)  # finished earlier, evaluation cut short or stale
        evaluate_model(student, teacher, tokenizer, run_config, run_dir / EVAL_FILE)
    return True


def run_all(config: Config, clock: StageClock) -> bool:
    """Every OPD run of the experiment, plain rules first, then matched controls, each phase
    over ``experiment.workers`` processes (:class:`~.workers.Pool`); each run's seconds are
    its stage in ``clock``. Returns False once a run was stopped early (the runs in flight
    finish or stop; nothing further starts)."""
    runs = list(run_dirs(config))
    phases = [
        [(config, rule, seed) for rule, seed in runs if split_rule(rule)[1] is None],
        [(config, rule, seed) for rule, seed in runs if split_rule(rule)[1] is not None],
    ]
    done = 0
    with Pool(config) as pool:
        for phase in phases:
            finished = 0
            for (_, rule, seed), complete, seconds in pool.run(run_opd, phase):
                clock.record(f"opd {rule} seed {seed}", seconds)
                done += 1
                state = "done" if complete else "stopped"
                print(f"[{done}/{len(runs)}] OPD rule={rule} seed={seed}: {state}", flush=True)
                if not complete:
                    return False  # nothing further starts; runs in flight stop or finish
                finished += 1
            if finished < len(phase):  # jobs cancelled by a stop before they started
                return False
    return True
