"""The training loop: prompts -> rollouts -> segments -> jitted step -> metrics -> checkpoint.

:func:`train` runs a :class:`~opd_jax.config.Config` from its first step or, when
``run.dir`` holds a checkpoint, from the last good one: parameters, optimizer state, step
and data position are restored and every PRNG key derives from ``(seed, step)``, so a
resumed run continues exactly as an uninterrupted one. SIGTERM saves and exits cleanly.

Several processes (see :mod:`opd_jax.distributed`) each feed their rows of the same global
batch (:meth:`~opd_jax.train.session.Batches.process_rows`); all of them save and restore
checkpoints, and only process 0 writes ``config.yaml``, metrics and the progress bar.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds

from opd_jax import data
from opd_jax.config import Config, dump_config
from opd_jax.distributed import any_process, is_primary, primary_first
from opd_jax.files import atomic_write_text
from opd_jax.train.checkpoint import Checkpointer, on_sigterm
from opd_jax.train.metrics import MetricsWriter
from opd_jax.train.session import Session
from opd_jax.train.state import RunState, abstract_like


def train(
    config: Config,
    *,
    stop_after: int | None = None,
    on_step: Callable[[int, Session], None] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) the configured OPD run; returns the last step's scalar metrics.

    ``stop_after`` ends this invocation (with a checkpoint) after that many steps, as a
    preemption would: running again resumes. ``on_step(step, session)`` is called after each
    step (``step`` counts completed steps, from 0 before the first) with the live session,
    e.g. to evaluate the student as it trains; it runs on every process.
    """
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        atomic_write_text(run_dir / "config.yaml", dump_config(config))
    session = Session.build(config)
    tfds.disable_progress_bar()
    source = primary_first(
        lambda: data.load_source(
            config.data.source, config.data.split, config.data.data_dir, **config.data.arithmetic
        )
    )
    shard, shards = session.batches.process_rows(config.data.batch_size)
    prompts = data.make_prompt_iterator(
        source,
        batch_size=config.data.batch_size // shards,
        seed=config.seed,
        shard_index=shard,
        shard_count=shards,
    )
    base_key = jax.random.key(config.seed)
    last: dict[str, Any] = {}

    with (
        Checkpointer(
            run_dir,
            keep=config.run.keep_checkpoints,
            async_save=config.run.async_checkpoint,
        ) as checkpointer,
        MetricsWriter(run_dir, tensorboard=config.run.tensorboard) as writer,
        on_sigterm() as preemption,
        jax.set_mesh(session.mesh),
    ):
        start = _restore(checkpointer, session, prompts, writer)
        progress = _progress(config, start)
        if on_step is not None and start == 0:
            on_step(0, session)
        for step in range(start, config.train.steps):
            key_sample, key_rule = jax.random.split(jax.random.fold_in(base_key, step))
            t0 = time.perf_counter()
            rollout = session.rollout(*session.encode(next(prompts)["prompt"]), key_sample)
            t1 = time.perf_counter()
            seg, _ = session.segments(rollout)
            t2 = time.perf_counter()
            metrics = jax.device_get(session.update(session.device_batch(rollout, seg), key_rule))
            t3 = time.perf_counter()
            scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
            scalars |= {"time/sample_s": t1 - t0, "time/segment_s": t2 - t1, "time/step_s": t3 - t2}
            scalars["tokens_per_s"] = float(rollout[1].sum()) * shards / (t3 - t0)
            arrays = {k: np.asarray(v).tolist() for k, v in metrics.items() if np.ndim(v) > 0}
            if (step + 1) % config.run.log_every == 0 or step + 1 == config.train.steps:
                writer.write(step + 1, scalars, arrays)
            last = scalars
            progress.update(1)
            progress.set_postfix(
                loss=f"{scalars['loss']:.4f}",
                kept=f"{scalars['kept_fraction']:.2f}",
                tok_s=f"{scalars['tokens_per_s']:.0f}",
            )
            done = step + 1 == config.train.steps
            stopping = any_process(preemption.requested) or (
                stop_after is not None and step + 1 - start >= stop_after
            )
            if done or stopping or (step + 1) % config.run.checkpoint_every == 0:
                meta = {"step": step + 1, "data": prompts.get_state(), "seed": config.seed}
                checkpointer.save(step + 1, session.state._asdict(), meta, force=True)
            if on_step is not None:
                on_step(step + 1, session)
            if stopping:
                if is_primary():
                    progress.write(
                        f"stopped: saved step {step + 1} in {run_dir}; run again to resume."
                    )
                break
        progress.close()
    return last


def _progress(config: Config, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.train.steps,
        initial=start,
        desc="opd",
        disable=not config.run.progress or not is_primary(),
        dynamic_ncols=True,
    )


def _restore(checkpointer: Checkpointer, session: Session, prompts, writer: MetricsWriter) -> int:
    """Loads the last good checkpoint into ``session`` and positions the data iterator and
    the metrics file; returns the step to start at (0 without a checkpoint)."""
    restored = checkpointer.restore(abstract_like(session.state._asdict()))
    if restored is None:
        writer.truncate_after(0)
        return 0
    step, state, meta = restored
    session.state = RunState(**state)
    prompts.set_state(meta["data"])
    writer.truncate_after(step)
    if is_primary():
        print(f"resumed from step {step} ({json.dumps(meta['data'])})", flush=True)
    return step
