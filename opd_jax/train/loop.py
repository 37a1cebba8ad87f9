"""The training loop: prompts -> rollouts -> segments -> jitted step -> metrics -> checkpoint.

:func:`train` runs a :class:`~opd_jax.config.Config` from its first step or, when
``run.dir`` holds a checkpoint, from the last good one: parameters, optimizer state, step
and data position are restored and every PRNG key derives from ``(seed, step)``, so a
resumed run continues exactly as an uninterrupted one. SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from opd_jax import data, models, sampling
from opd_jax.config import Config, dump_config
from opd_jax.sharding import DEFAULT_RULES, make_mesh
from opd_jax.train.checkpoint import Checkpointer, on_sigterm
from opd_jax.train.metrics import MetricsWriter
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.rollouts import encode_prompts, eos_ids, pad_id, response_segments
from opd_jax.train.specs import load_model
from opd_jax.train.step import StepSettings, make_train_step


def mesh_from_config(config: Config) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``config.mesh``; -1 takes the remaining devices."""
    shape = dataclasses.asdict(config.mesh)
    fixed = int(np.prod([v for v in shape.values() if v != -1]))
    count = jax.device_count()
    shape = {k: (count // fixed if v == -1 else v) for k, v in shape.items()}
    if int(np.prod(list(shape.values()))) != count:
        raise ValueError(
            f"mesh {shape} does not use the {count} devices: set mesh.data * mesh.fsdp * "
            "mesh.tensor to the device count (or one of them to -1)."
        )
    return make_mesh(shape)


def sampling_method(config: Config) -> sampling.SamplingMethod:
    c = config.sampling
    if c.temperature == 0:
        return sampling.Greedy()
    if c.top_k > 0:
        return sampling.TopK(c.top_k, c.temperature)
    if c.top_p < 1.0:
        return sampling.TopP(c.top_p, c.temperature)
    return sampling.Temperature(c.temperature)


def step_settings(config: Config) -> StepSettings:
    return StepSettings(
        prompt_len=config.data.max_prompt_tokens,
        k=config.score.k,
        chunk_size=config.score.chunk_size,
        rule=config.rule.kind,
        rule_options=tuple(sorted(config.rule.options.items())),
        loss=config.loss.kind,
        reduction=config.loss.reduction,
        beta=config.loss.beta,
        accumulate=config.optim.accumulate,
    )


def load_pair(config: Config, mesh: jax.sharding.Mesh):
    """Student, teacher and tokenizer; refuses pairs that do not share a vocabulary."""
    student, tokenizer = load_model(config.student, mesh)
    teacher, teacher_tokenizer = load_model(config.teacher, mesh)
    models.check_same_tokenizer(tokenizer, teacher_tokenizer)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"student vocabulary {student.config.vocab_size} != teacher vocabulary "
            f"{teacher.config.vocab_size}: OPD needs one tokenizer and one embedding size."
        )
    return student, teacher, tokenizer


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class _Batches:
    """Global device arrays from per-process host arrays, batch over ``data`` x ``fsdp``."""

    def __init__(self, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.spec = PartitionSpec(DEFAULT_RULES.batch)

    def to_device(self, tree: Any) -> Any:
        return multihost_utils.host_local_array_to_global_array(tree, self.mesh, self.spec)

    def to_host(self, tree: Any) -> Any:
        local = multihost_utils.global_array_to_host_local_array(tree, self.mesh, self.spec)
        return jax.tree.map(np.asarray, local)


def train(config: Config, *, stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) the configured OPD run; returns the last step's scalar metrics.

    ``stop_after`` ends this invocation (with a checkpoint) after that many steps, as a
    preemption would: running again resumes.
    """
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        _write_text(run_dir / "config.yaml", dump_config(config))
    mesh = mesh_from_config(config)
    student, teacher, tokenizer = load_pair(config, mesh)
    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    tx = make_optimizer(config.optim, config.train.steps)
    opt_state = init_opt_state(tx, params, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step_fn = make_train_step(graphdef, teacher_graphdef, tx, step_settings(config), shardings)
    batch_size = config.data.batch_size // jax.process_count()
    tfds.disable_progress_bar()
    source = data.load_source(
        config.data.source, config.data.split, config.data.data_dir, **config.data.arithmetic
    )
    prompts = data.make_prompt_iterator(source, batch_size=batch_size, seed=config.seed)
    batches = _Batches(mesh)
    stop_ids = eos_ids(tokenizer, student.config.eos_token_id)
    method = sampling_method(config)
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
        jax.set_mesh(mesh),
    ):
        start, params, opt_state = _restore(checkpointer, params, opt_state, prompts, writer)
        progress = _progress(config, start)
        for step in range(start, config.train.steps):
            key_sample, key_rule = jax.random.split(jax.random.fold_in(base_key, step))
            texts = next(prompts)["prompt"]
            t0 = time.perf_counter()
            tokens, mask = encode_prompts(
                tokenizer,
                texts,
                config.data.max_prompt_tokens,
                chat_template=config.data.chat_template,
                system_prompt=config.data.system_prompt,
            )
            rollout = sampling.sample(
                nnx.merge(graphdef, params),
                *batches.to_device((tokens, mask)),
                key=key_sample,
                max_new_tokens=config.sampling.max_new_tokens,
                method=method,
                eos_ids=stop_ids,
                pad_id=pad_id(tokenizer),
                mesh=mesh,
            )
            host = batches.to_host((rollout.tokens, rollout.response_mask, rollout.prompt_mask))
            t1 = time.perf_counter()
            p = config.data.max_prompt_tokens
            seg, responses = response_segments(
                tokenizer,
                host[0][:, p:],
                host[1][:, p:],
                config.segments.kind,
                config.segments.tokens,
            )
            t2 = time.perf_counter()
            batch = batches.to_device(
                {
                    "tokens": host[0],
                    "attention_mask": host[1] | host[2],
                    "response_mask": host[1],
                    "seg": seg,
                }
            )
            params, opt_state, metrics = step_fn(params, opt_state, teacher_params, batch, key_rule)
            metrics = jax.device_get(metrics)
            t3 = time.perf_counter()
            scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
            scalars |= {"time/sample_s": t1 - t0, "time/segment_s": t2 - t1, "time/step_s": t3 - t2}
            scalars["tokens_per_s"] = float(host[1].sum()) * jax.process_count() / (t3 - t0)
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
            stopping = preemption.requested or (
                stop_after is not None and step + 1 - start >= stop_after
            )
            if done or stopping or (step + 1) % config.run.checkpoint_every == 0:
                meta = {"step": step + 1, "data": prompts.get_state(), "seed": config.seed}
                checkpointer.save(
                    step + 1, {"params": params, "opt_state": opt_state}, meta, force=True
                )
            if stopping:
                progress.write(f"stopped: saved step {step + 1} in {run_dir}; run again to resume.")
                break
        progress.close()
    return last


def _progress(config: Config, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.train.steps,
        initial=start,
        desc="opd",
        disable=not config.run.progress or jax.process_index() != 0,
        dynamic_ncols=True,
    )


def init_opt_state(tx, params: nnx.State, mesh: jax.sharding.Mesh) -> Any:
    """``tx.init(params)`` with every leaf on the mesh (moments follow their parameters,
    scalars such as the step count are replicated)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = tx.init(params)
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        opt_state,
    )


def _restore(checkpointer, params, opt_state, prompts, writer):
    """The last good checkpoint's ``(step, params, opt_state)`` (step 0 and the given state
    when there is none); positions the data iterator and the metrics file."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"params": params, "opt_state": opt_state},
    )
    restored = checkpointer.restore(target)
    if restored is None:
        writer.truncate_after(0)
        return 0, params, opt_state
    step, state, meta = restored
    prompts.set_state(meta["data"])
    writer.truncate_after(step)
    print(f"resumed from step {step} ({json.dumps(meta['data'])})", flush=True)
    return step, state["params"], state["opt_state"]
