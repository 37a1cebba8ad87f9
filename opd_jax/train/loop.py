"""The training loop: prompts -> rollouts -> segments -> jitted step -> metrics -> checkpoint.

:func:`train` runs a :class:`~opd_jax.config.Config` from its first step or, when
``run.dir`` holds a checkpoint, from the last good one: parameters, optimizer state, step
and data position are restored and every PRNG key derives from ``(seed, step)``, so a
resumed run continues exactly as an uninterrupted one (with ``train.async_rollouts``, where
step t+1's rollouts are sampled from step t's parameters during step t's update, a resumed
run samples its first step from its own parameters). It returns a :class:`TrainResult`:
finished, stopped early (SIGTERM or ``stop_after``: saved, run again to resume) or already
up to date.

Bad input fails before any model is loaded (config, ``run.dir``, a resume that would change
the trajectory, model directories, data). Nothing a step computes is saved unless its loss,
gradient and updated parameters are finite; a failed write of metrics or of a checkpoint ends
the run with :class:`RunFailed`, leaving the checkpoints saved before it intact.

Several processes (see :mod:`opd_jax.distributed`) each feed their rows of the same global
batch (:meth:`~opd_jax.train.session.Batches.process_rows`); all of them save and restore
checkpoints, and only process 0 writes ``config.yaml``, metrics and the progress bar.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from opd_jax.config import Config, ConfigError, config_from_dict, dump_config, validate
from opd_jax.distributed import any_process, is_primary
from opd_jax.files import atomic_write_text
from opd_jax.heap import release_unused
from opd_jax.run_lock import hold
from opd_jax.train.checkpoint import Checkpointer
from opd_jax.train.metrics import MetricsWriter
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.preflight import (
    CONFIG_FILE,
    check_loggers,
    check_models,
    check_resume,
    check_writable,
    listed_changes,
    open_data,
)
from opd_jax.train.session import Session
from opd_jax.train.state import RunState, abstract_like, abstract_state
from opd_jax.train.stop_signals import PreemptionFlag, on_stop_signals

RESUME_FIX = "free space (or fix the cause) and run the same command again to resume"
# Keys that change which parameters a run trains (RunState.params): no resume across them.
LORA_SHAPE_KEYS = ("student.lora.rank", "student.lora.targets")


class Status(enum.Enum):
    """How :func:`train` ended."""

    FINISHED = "finished"  # the run reached train.steps
    STOPPED = "stopped"  # SIGTERM, SIGINT or stop_after: saved; running again resumes
    UP_TO_DATE = "up_to_date"  # the run was already at train.steps: nothing ran


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did: ``step`` counts the run's completed steps, ``metrics`` holds
    the last step's scalars (empty when no step ran), ``skipped_steps`` the run's steps
    skipped as non-finite (``train.on_nonfinite: skip``), ``interrupted`` whether a stop came
    from Ctrl-C (SIGINT) rather than a scheduler's SIGTERM."""

    status: Status
    step: int
    metrics: dict[str, float]
    skipped_steps: int = 0
    interrupted: bool = False


class RunFailed(RuntimeError):
    """The run cannot go on: a non-finite step (``train.on_nonfinite: stop``) or a failed
    write. The message names the step, the cause, the last checkpoint (intact) and the fix."""


def train(
    config: Config,
    *,
    stop_after: int | None = None,
    on_step: Callable[[int, Session], None] | None = None,
) -> TrainResult:
    """Runs (or resumes) the configured OPD run.

    Before any model is loaded: the config is validated; ``run.dir`` is locked for this run
    (:mod:`opd_jax.run_lock`: another run on it is refused) and must be writable; when
    it holds a checkpoint, the keys that decide the training trajectory
    (:func:`opd_jax.trajectory.trajectory`) must equal that checkpoint's (``run.allow_changes``
    lets them differ, with a warning, recorded in later checkpoints' meta); the model
    directories must hold tokenizers, the same one; the data source must open with records.
    ``config.yaml`` is written (atomically) once the models are loaded.

    ``stop_after`` ends this invocation (with a checkpoint) after that many steps, as a
    preemption (SIGTERM) would: running again resumes. ``on_step(step, session)`` is called
    after each step (``step`` counts completed steps, from 0 before the first) with the live
    session, e.g. to evaluate the student as it trains; it runs on every process.

    Raises:
      ConfigError: an invalid config, an unwritable or locked ``run.dir`` or a refused change.
      FileNotFoundError, ValueError: a model or data source that cannot be used.
      RunFailed: a non-finite step or a failed write; nothing after the last checkpoint.
    """
    config = validate(config)
    run_dir = Path(config.run.dir)
    with (
        hold(check_writable(run_dir), "opd-jax train", primary=is_primary()),
        Checkpointer(
            run_dir,
            keep=config.run.keep_checkpoints,
            async_save=config.run.async_checkpoint,
        ) as checkpointer,
    ):
        changes = check_resume(config, checkpointer.read_meta(), run_dir)
        check_trained_parameters(changes, run_dir)
        check_loggers(config)
        check_models(config)
        source = open_data(config)
        session = Session.build(config)
        if is_primary():
            atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))
        with (
            MetricsWriter.for_run(config) as writer,
            on_stop_signals() as preemption,
            jax.set_mesh(session.mesh),
        ):
            prompts, shards = session.prompt_iterator(source)
            run = _Run(config, session, checkpointer, writer, prompts, shards)
            start = run.restore(changes)
            return run.loop(start, preemption, stop_after, on_step)


def check_trained_parameters(changes: dict[str, list[Any]], run_dir: Path) -> None:
    """Refuses allowed ``changes`` of the keys that change which parameters a run trains
    (``student.lora.rank``, ``targets``): its checkpoints hold others (other adapters, or the
    whole student), which no resume can continue from."""
    reshaped = {key: changes[key] for key in changes if key in LORA_SHAPE_KEYS}
    if reshaped:
        raise ConfigError(
            f"{run_dir} was trained with other {' and '.join(reshaped)} "
            f"({listed_changes(reshaped)}), even with run.allow_changes: its checkpoints hold "
            "other trained parameters. Choose a new run.dir (to start from this run's "
            "student: opd-jax convert it and set student.path to the export)."
        )


@dataclasses.dataclass
class _Run:
    """One invocation's live objects and counters; :meth:`loop` runs the steps."""

    config: Config
    session: Session
    checkpointer: Checkpointer
    writer: MetricsWriter
    prompts: Any
    shards: int  # processes feeding rows of the global batch
    skipped: int = 0
    config_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    data_state: Any = None  # the prompt iterator after the last updated step's prompts
    pending: concurrent.futures.Future | None = None  # the next step's rollouts (async)
    sampler: concurrent.futures.ThreadPoolExecutor | None = None  # where they are sampled

    def restore(self, changes: dict[str, list[Any]]) -> int:
        """Loads the last good checkpoint into the session and positions the data iterator and
        the metrics file; returns the step to start at (0 without a checkpoint). ``changes``
        (allowed on this resume) are added to the run's recorded config changes; when they
        change the optimizer state's structure (``optim.clip_norm`` to or from 0), the
        parameters, step and data position are restored and the optimizer state starts fresh."""
        live = self.session.state
        saved_opt = self.saved_opt_state(live) if changes else None
        target = abstract_like(live._asdict())
        if saved_opt is not None:
            target["opt_state"] = saved_opt
        restored = self.checkpointer.restore(target)
        if restored is None:
            self.writer.truncate_after(0)
            return 0
        step, state, meta = restored
        fresh = saved_opt is not None and (
            jax.tree.structure(saved_opt) != jax.tree.structure(live.opt_state)
        )
        if fresh:
            state["opt_state"] = live.opt_state
        self.session.state = RunState(**state)
        self.prompts.set_state(meta["data"])
        self.writer.truncate_after(step)
        self.skipped = meta.get("skipped_steps", 0)
        self.config_changes = meta.get("config_changes", [])
        if changes:
            self.config_changes = [*self.config_changes, {"step": step, "changes": changes}]
            restart = (
                " They change the optimizer state's structure: the parameters, step and data "
                "position are restored, the optimizer state (moments, schedule count) starts "
                "fresh."
                if fresh
                else ""
            )
            warnings.warn(
                f"{self.config.run.dir} continues from step {step} with changed keys "
                f"({listed_changes(changes)}), as run.allow_changes=true allows; the change is "
                f"recorded in its checkpoints' meta (config_changes).{restart}",
                stacklevel=3,
            )
        if is_primary():
            print(f"resumed from step {step} ({json.dumps(meta['data'])})", flush=True)
        return step

    def saved_opt_state(self, live: RunState) -> Any:
        """The abstract optimizer state the latest checkpoint was saved with, built from the
        config in its meta (its shardings those of ``live``'s parameters); None when the meta
        holds no config or one this version cannot read."""
        latest = self.checkpointer.read_meta()
        if latest is None or not latest[1].get("config"):
            return None
        try:
            old = config_from_dict(latest[1]["config"])
        except ConfigError:  # an older version's keys: restore into the live structure
            return None
        tx = make_optimizer(old.optim, old.train.steps)
        return abstract_state(tx, abstract_like(live.params), self.session.mesh).opt_state

    def loop(
        self,
        start: int,
        preemption: PreemptionFlag,
        stop_after: int | None,
        on_step: Callable[[int, Session], None] | None,
    ) -> TrainResult:
        """Runs steps ``start`` to ``train.steps`` (or until stopped)."""
        steps, run = self.config.train.steps, self.config.run
        if start >= steps:
            return TrainResult(Status.UP_TO_DATE, start, {}, self.skipped)
        if on_step is not None and start == 0:
            on_step(0, self.session)
        progress = _progress(self.config, start)
        self.sampler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollouts")
        try:
            for step in range(start, steps):
                n = step + 1
                scalars, arrays, finite = self.update(step)
                if n % run.log_every == 0 or n == steps or not finite:
                    self.log(n, scalars, arrays)
                if not finite:
                    self.nonfinite(n, scalars, progress)
                progress.update(1)
                progress.set_postfix(
                    loss=f"{scalars['loss']:.4f}",
                    kept=f"{scalars['kept_fraction']:.2f}",
                    tok_s=f"{scalars['tokens_per_s']:.0f}",
                )
                stopping = n < steps and (
                    any_process(preemption.requested)
                    or (stop_after is not None and n - start >= stop_after)
                )
                if n == steps or stopping or n % run.checkpoint_every == 0:
                    self.save(n)
                if on_step is not None:
                    on_step(n, self.session)
                if stopping:
                    if is_primary():
                        progress.write(
                            f"stopped: saved step {n} in {run.dir}; run again to resume."
                        )
                    break
            self.wait(n)
        finally:
            progress.close()
            self.sampler.shutdown(wait=True)  # a rollout in flight finishes, unused
            self.pending = None
        status = Status.FINISHED if n == steps else Status.STOPPED
        return TrainResult(status, n, scalars, self.skipped, preemption.interrupted)

    def keys(self, step: int) -> tuple[jax.Array, jax.Array]:
        """Step ``step``'s sampling and rule keys, from ``(seed, step)`` alone."""
        key_sample, key_rule = jax.random.split(
            jax.random.fold_in(jax.random.key(self.config.seed), step)
        )
        return key_sample, key_rule

    def sample(
        self, step: int, prompts: list[str], params: Any = None
    ) -> tuple[tuple[np.ndarray, ...], np.ndarray, float, float]:
        """Step ``step``'s rollouts of ``prompts`` from ``params`` (default: the live ones) and
        their segments, with the seconds each took."""
        session = self.session
        t0 = time.perf_counter()
        rollout = session.rollout(*session.encode(prompts), self.keys(step)[0], params)
        t1 = time.perf_counter()
        seg, _ = session.segments(rollout)
        release_unused()  # the sampler's buffers are free (opd_jax.heap bounds what it keeps)
        return rollout, seg, t1 - t0, time.perf_counter() - t1

    def update(self, step: int) -> tuple[dict[str, float], dict[str, list[float]], bool]:
        """Step ``step`` (0-based): rollouts, segments and the jitted update; returns its
        scalar and array metrics and whether it was finite.

        With ``train.async_rollouts`` the next step's rollouts start, from a copy of this
        step's parameters (on the rollout mesh), before this step's update runs."""
        session = self.session
        t0 = time.perf_counter()
        if self.pending is None:
            staleness = 0
            rollout, seg, sample_s, segment_s = self.sample(step, next(self.prompts)["prompt"])
        else:  # sampled from the previous step's parameters during its update
            staleness = 1
            rollout, seg, sample_s, segment_s = self.pending.result()
            self.pending = None
        self.data_state = self.prompts.get_state()
        t2 = time.perf_counter()
        if self.config.train.async_rollouts and step + 1 < self.config.train.steps:
            prompts = next(self.prompts)["prompt"]
            params = session.rollout_params()  # before the update donates the live ones
            self.pending = self.sampler.submit(self.sample, step + 1, prompts, params)
        batch = session.device_batch(rollout, seg)
        metrics = jax.device_get(session.update(batch, self.keys(step)[1]))
        release_unused()  # and the update's
        t3 = time.perf_counter()
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        finite = not scalars.pop("nonfinite")
        if self.config.train.on_nonfinite == "skip":
            self.skipped += not finite
            scalars["skipped_steps"] = float(self.skipped)
        scalars |= {"time/sample_s": sample_s, "time/segment_s": segment_s, "time/step_s": t3 - t2}
        scalars["rollout_staleness"] = float(staleness)  # steps between sampling and update
        scalars["tokens_per_s"] = float(rollout[1].sum()) * self.shards / (t3 - t0)
        scalars |= session.token_counts(rollout, seg, scalars)
        del scalars["response_token_sum"]  # now sampled_tokens
        arrays = {k: np.asarray(v).tolist() for k, v in metrics.items() if np.ndim(v) > 0}
        if self.config.sampling.stop_at_release:  # the step saw cut rows: no boundary of its own
            arrays.pop("boundary_histogram", None)
        return scalars, arrays, finite

    def nonfinite(self, n: int, scalars: dict[str, float], progress: Any) -> None:
        """Step ``n`` was not finite: raises :class:`RunFailed` (``stop``) or reports the
        skip (``skip``: the step already left the state as it was)."""
        values = f"loss {scalars['loss']}, grad_norm {scalars['grad_norm']}"
        if self.config.train.on_nonfinite == "skip":
            if is_primary():
                progress.write(
                    f"step {n}: not finite ({values}); skipped, the parameters and optimizer "
                    f"state are unchanged ({self.skipped} skipped so far)."
                )
            return
        raise self.failure(
            n,
            f"the loss, the gradient or the updated parameters are not finite ({values}); "
            "nothing of this step was saved",
            "lower optim.learning_rate (add run.allow_changes=true to continue this run from "
            "that checkpoint, or choose a new run.dir), or set train.on_nonfinite=skip to skip "
            "such steps",
        )

    def log(self, n: int, scalars: dict[str, float], arrays: dict[str, list[float]]) -> None:
        try:
            self.writer.write(n, scalars, arrays)
        except OSError as error:
            raise self.failure(
                n, f"writing {self.writer.path} failed ({error})", RESUME_FIX
            ) from error

    def save(self, n: int) -> None:
        """Starts saving step ``n`` with its meta: data position, seed, config, counters."""
        meta = {
            "step": n,
            "data": self.data_state,
            "seed": self.config.seed,
            "config": json.loads(json.dumps(self.config.to_dict(), default=str)),
            "skipped_steps": self.skipped,
            "config_changes": self.config_changes,
        }
        try:
            self.checkpointer.save(n, self.session.state._asdict(), meta, force=True)
        except Exception as error:  # Orbax reports a failed write with many exception types.
            raise self.failure(n, f"saving its checkpoint failed ({error})", RESUME_FIX) from error

    def wait(self, n: int) -> None:
        """Waits for the last checkpoint (step ``n``) to be written."""
        try:
            self.checkpointer.wait()
        except Exception as error:
            raise self.failure(n, f"saving its checkpoint failed ({error})", RESUME_FIX) from error

    def failure(self, n: int, cause: str, fix: str) -> RunFailed:
        """The :class:`RunFailed` of step ``n``, naming the last checkpoint on disk."""
        saved = self.checkpointer.saved_steps()
        directory = self.checkpointer.directory
        last = (
            f"the last checkpoint, step {saved[-1]} in {directory}, is intact"
            if saved
            else f"no checkpoint was saved in {directory}"
        )
        return RunFailed(f"step {n}: {cause}; {last}: {fix}.")


def _progress(config: Config, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.train.steps,
        initial=start,
        desc="opd",
        disable=not config.run.progress or not is_primary(),
        dynamic_ncols=True,
    )
