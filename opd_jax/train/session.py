"""A run's live objects, built once from a config: mesh, models, optimizer, jitted step.

:class:`Session` is what the training loop, ``opd-jax plan`` and the benchmarks share: the
host-side phases of a step (prompt encoding, rollouts, segmentation) and the jitted update,
each callable on its own so that they can be timed apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from opd_jax import core, data, models, sampling
from opd_jax.config import Config, ConfigError
from opd_jax.core.rules import CUT_RULES
from opd_jax.data.oracle import ANSWER_PATTERN
from opd_jax.models import Tokenizer, encode_prompts, eos_ids, pad_id
from opd_jax.models.lora import split_student
from opd_jax.run_models import load_pair
from opd_jax.sharding import DEFAULT_RULES, make_mesh
from opd_jax.text_segments import response_segments
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.state import RunState, init_state
from opd_jax.train.step import StepSettings, make_train_step


def mesh_from_config(config: Config) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` training mesh of ``config.mesh`` over every device but the
    ``mesh.rollout`` set apart for rollouts; -1 takes the remaining devices."""
    apart = config.mesh.rollout
    shape = {k: v for k, v in dataclasses.asdict(config.mesh).items() if k != "rollout"}
    count = jax.device_count() - apart
    if count < 1:
        raise ConfigError(
            f"mesh.rollout={apart} sets apart all {jax.device_count()} devices: leave some for "
            "training (lower mesh.rollout, or 0 to sample on the training devices)."
        )
    fixed = int(np.prod([v for v in shape.values() if v != -1]))
    shape = {k: (count // fixed if v == -1 else v) for k, v in shape.items()}
    if int(np.prod(list(shape.values()))) != count:
        raise ConfigError(
            f"mesh {shape} does not use the {count} training devices: set mesh.data * "
            "mesh.fsdp * mesh.tensor to the device count less mesh.rollout (or one of them "
            "to -1)."
        )
    return make_mesh(shape, jax.devices()[:count] if apart else None)


def rollout_mesh_from_config(config: Config, mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """Where rollouts are sampled: ``mesh`` (the training mesh), or the last ``mesh.rollout``
    devices with the rows over all of them (``data``) and the weights replicated."""
    apart = config.mesh.rollout
    if not apart:
        return mesh
    if jax.process_count() > 1:
        raise ConfigError(
            "mesh.rollout (devices set apart for rollouts) runs in a single process: set "
            "mesh.rollout=0 to sample on the training mesh."
        )
    return make_mesh({"data": apart}, jax.devices()[-apart:])


def step_settings(config: Config) -> StepSettings:
    """The jitted step's static settings from ``config``. With ``sampling.stop_at_release``
    the rows come cut at their release boundary (:meth:`Session.device_batch`): the step's rule
    is ``full`` on them, and no rule is compared on rows that keep only their prefix."""
    stop = config.sampling.stop_at_release
    return StepSettings(
        prompt_len=config.data.max_prompt_tokens,
        objective=core.ObjectiveSettings(
            rule="full" if stop else config.rule.kind,
            rule_options=() if stop else tuple(sorted(config.rule.options.items())),
            compared_rules=() if stop else core.ObjectiveSettings.compared_rules,
            loss=config.loss.kind,
            reduction=config.loss.reduction,
            loss_options=tuple(sorted(config.loss.options.items())),
            k=config.score.k,
            chunk_size=config.score.chunk_size,
        ),
        accumulate=config.optim.accumulate,
        remat=config.train.remat,
        attention_chunk=config.train.attention_chunk,
        attention=models.resolve_attention(
            config.train.attention,
            (config.student.dtype, config.teacher.dtype),
            config.train.attention_chunk,
        ),
        skip_nonfinite=config.train.on_nonfinite == "skip",
    )


class Batches:
    """Global device arrays from per-process host arrays, batch over ``data`` x ``fsdp``."""

    def __init__(self, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.spec = PartitionSpec(DEFAULT_RULES.batch)

    def process_rows(self, batch_size: int) -> tuple[int, int]:
        """``(index, count)``: this process feeds row block ``index`` of ``count`` equal blocks
        of a global batch of ``batch_size`` rows: the block its devices hold on the mesh.
        ``count`` is 1 when the batch axes do not cross processes (each feeds the whole batch).

        Raises:
          ValueError: ``batch_size`` does not split over the batch axes, or a process's
            devices do not hold one contiguous block of rows.
        """
        axes = jax.tree.leaves(self.spec[0])
        shards = int(np.prod([self.mesh.shape[a] for a in axes]))
        if batch_size % shards:
            raise ConfigError(
                f"data.batch_size={batch_size} must be a multiple of {' x '.join(axes)} = "
                f"{shards} (mesh {dict(self.mesh.shape)}): raise it to a multiple."
            )
        indices = NamedSharding(self.mesh, self.spec).devices_indices_map((shards,))
        here = jax.process_index()
        rows = sorted(
            {r for d, (s,) in indices.items() if d.process_index == here for r in range(shards)[s]}
        )
        block = len(rows)
        if rows != list(range(rows[0], rows[0] + block)) or rows[0] % block or shards % block:
            raise ConfigError(
                f"process {here} holds rows {rows} of {shards} batch shards on mesh "
                f"{dict(self.mesh.shape)}: each process's devices must hold one contiguous "
                "block of the batch; order the mesh devices by process."
            )
        return rows[0] // block, shards // block

    def to_device(self, tree: Any) -> Any:
        return multihost_utils.host_local_array_to_global_array(tree, self.mesh, self.spec)

    def to_host(self, tree: Any) -> Any:
        local = multihost_utils.global_array_to_host_local_array(tree, self.mesh, self.spec)
        return jax.tree.map(np.asarray, local)


CUT_RECORD = ("keep", "released", "offline_tau")  # the host's cuts under stopping: not batch


def kept_width(keep: int, max_new_tokens: int) -> int:
    """The response columns a batch whose longest row keeps ``keep`` tokens is cut to: a
    multiple of ``ceil(N / 8)`` (at most 8 widths compile), at most ``N``."""
    quantum = -(-max_new_tokens // 8)
    return min(max_new_tokens, max(1, -(-keep // quantum)) * quantum)


def cut_rows(
    host: dict[str, np.ndarray],
    keep: np.ndarray,
    prompt_len: int,
    sampling_config: Any,
    response_columns: tuple[str, ...] = ("seg",),
) -> dict[str, np.ndarray]:
    """Host rows ``tokens, attention_mask, response_mask [B, S]`` and ``seg [B, N]`` with
    each row's response cut after its first ``keep[b]`` tokens (padding after them) and the
    columns narrowed to :func:`kept_width` (those of ``response_columns`` ``[B, N, ...]`` too,
    where present)."""
    width = kept_width(int(keep.max(initial=0)), sampling_config.max_new_tokens)
    kept = np.arange(host["seg"].shape[1])[None, :] < keep[:, None]
    out = dict(host)
    for name in ("attention_mask", "response_mask"):
        column = host[name].copy()
        column[:, prompt_len:] *= kept.astype(column.dtype)
        out[name] = column
    out["seg"] = np.where(kept, host["seg"], -1)
    for name in response_columns:
        if name in out:
            out[name] = out[name][:, :width]
    for name in ("tokens", "attention_mask", "response_mask"):
        out[name] = out[name][:, : prompt_len + width]
    return out


@dataclasses.dataclass
class Session:
    """Everything a step needs; ``state`` is the live (donated) :class:`RunState`: the trained
    parameters (a LoRA student's adapters, else the whole student) and their optimizer state.
    ``frozen`` holds a LoRA student's base (empty without ``student.lora.rank``)."""

    config: Config
    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    teacher_graphdef: nnx.GraphDef
    state: RunState
    teacher_params: nnx.State
    step_fn: Any
    batches: Batches
    eos: tuple[int, ...]
    rollout_batches: Batches  # rows on the rollout mesh (the training mesh unless set apart)
    frozen: nnx.State = dataclasses.field(default_factory=lambda: nnx.State({}))

    @classmethod
    def build(cls, config: Config) -> Session:
        """Loads the models onto the configured mesh and compiles nothing yet."""
        settings = step_settings(config)  # before loading: a bad attention choice fails fast
        if config.sampling.stop_at_release and jax.process_count() > 1:
            raise ConfigError(
                "sampling.stop_at_release runs in a single process: set it to false for a "
                "multi-process run."
            )
        mesh = mesh_from_config(config)
        student, teacher, tokenizer = load_pair(config, mesh)
        graphdef, params, frozen = split_student(student)
        teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
        tx = make_optimizer(config.optim, config.train.steps)
        state = init_state(tx, params, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, tuple(state))
        step_fn = make_train_step(graphdef, teacher_graphdef, tx, settings, shardings)
        eos = eos_ids(tokenizer, student.config.eos_token_id)
        rollout_mesh = rollout_mesh_from_config(config, mesh)
        return cls(
            config, mesh, tokenizer, graphdef, teacher_graphdef, state, teacher_params,
            step_fn, Batches(mesh), eos, Batches(rollout_mesh), frozen,
        )  # fmt: skip

    @property
    def params(self) -> nnx.State:
        """The student's live parameters, all of them (with LoRA: the adapters and the frozen
        base): ``nnx.merge(session.graphdef, session.params)`` is the student."""
        if not self.frozen:
            return self.state.params
        return nnx.merge_state(self.state.params, self.frozen)

    @property
    def prompt_len(self) -> int:
        return self.config.data.max_prompt_tokens

    @property
    def max_new_tokens(self) -> int:
        """The rollouts' budget: ``sampling.max_new_tokens``, or the ``n`` of
        ``rule.kind=prefix_tokens`` where smaller (no token past it would be trained)."""
        budget = self.config.sampling.max_new_tokens
        if self.config.rule.kind == "prefix_tokens":
            options = core.rule_options("prefix_tokens") | self.config.rule.options
            budget = min(budget, int(options["n"]))
        return budget

    def prompt_iterator(self, source: Any) -> tuple[Any, int]:
        """This process's checkpointable iterator of prompt batches over ``source``
        (:func:`opd_jax.data.make_prompt_iterator`), and the number of processes feeding rows
        of each global batch."""
        shard, shards = self.batches.process_rows(self.config.data.batch_size)
        iterator = data.make_prompt_iterator(
            source,
            batch_size=self.config.data.batch_size // shards,
            seed=self.config.seed,
            shard_index=shard,
            shard_count=shards,
        )
        return iterator, shards

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Host: this process's prompts -> ``tokens, mask [B, P]``."""
        c = self.config.data
        return encode_prompts(
            self.tokenizer,
            prompts,
            c.max_prompt_tokens,
            chat_template=c.chat_template,
            system_prompt=c.system_prompt,
        )

    def rollout_params(self) -> nnx.State:
        """A copy of the live parameters on the rollout mesh (replicated there when it is
        apart), which the next update's donation of the live ones leaves intact (on the
        training mesh a LoRA student's frozen base is shared, not copied)."""
        mesh = self.rollout_batches.mesh
        if mesh is self.mesh:
            trained = jax.tree.map(jnp.copy, self.state.params)
            return nnx.merge_state(trained, self.frozen) if self.frozen else trained
        return jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))

    def rollout(
        self,
        tokens: np.ndarray,
        mask: np.ndarray,
        key: jax.Array,
        params: nnx.State | None = None,
        watch: sampling.ReleaseWatch | None = None,
    ) -> tuple[np.ndarray, ...]:
        """The student's samples, back on the host: ``tokens, response_mask, prompt_mask``
        ``[B n, S]`` (this process's rows; ``sampling.n`` consecutive rows per prompt), from
        ``params`` (default: the live parameters, copied to the rollout mesh when it is apart;
        :meth:`rollout_params`). With ``sampling.stop_at_release`` a fourth element, the
        watcher's record: ``margin [B n, N]``, ``stopped``, ``tau [B n]``, ``scored_tokens``
        and ``scores`` (kept from sampling: the teacher's scores for a ``q[y]`` loss, else its
        final hidden states, :data:`~opd_jax.core.TEACHER_HIDDEN`), from ``watch`` where given
        (default: a new :meth:`release_watch`)."""
        c = self.config.sampling
        batches = self.rollout_batches
        if params is None:
            params = self.params if batches.mesh is self.mesh else self.rollout_params()
        if watch is None and c.stop_at_release:
            watch = self.release_watch()
        result = sampling.sample(
            nnx.merge(self.graphdef, params),
            *batches.to_device((tokens, mask)),
            key=key,
            max_new_tokens=self.max_new_tokens,
            method=sampling.method_from(c.temperature, c.top_k, c.top_p),
            eos_ids=self.eos,
            pad_id=pad_id(self.tokenizer),
            n=c.n,
            compact_every=c.compact_every,
            mesh=batches.mesh,
            watcher=watch,
        )
        rows = batches.to_host((result.tokens, result.response_mask, result.prompt_mask))
        if watch is None:
            return rows
        record = {"margin": watch.margin, "stopped": watch.stopped, "tau": watch.tau}
        record |= {"scored_tokens": np.asarray(watch.scored_tokens), "scores": watch.scores}
        record |= {"seg": watch.seg, "texts": watch.texts()}
        return (*rows, record)

    def release_watch(self) -> sampling.ReleaseWatch:
        """The watcher of ``sampling.stop_at_release`` for one call of :meth:`rollout`."""
        c = self.config
        return sampling.ReleaseWatch(
            nnx.merge(self.teacher_graphdef, self.teacher_params),
            self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            segments=(c.segments.kind, c.segments.tokens),
            rule_options=c.rule.options,
            confirm=c.sampling.stop_confirm,
            min_gain=c.sampling.stop_min_gain,
            k=c.score.k,
            keep_scores=c.loss.kind in core.SAMPLED_TOKEN_LOSSES,
            keep_hidden=c.loss.kind not in core.SAMPLED_TOKEN_LOSSES,
            max_deferred=sampling.release_watch.DEFERRED_LOOKS * c.sampling.compact_every,
        )

    def segments(self, rollout: tuple[np.ndarray, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Host: what the rule reads about the responses, ``{"seg": [B, N]}`` and, for the rules
        of :data:`~opd_jax.core.rules.CUT_RULES` only, ``"cut": [B]`` (the oracle cut after
        ``segments.oracle_pattern``), and their decoded texts (:func:`response_segments`).
        Rollouts with a watcher's record (``sampling.stop_at_release``) take its sentences
        (split after each row's last token) instead of splitting again, and add each row's
        ``keep`` and ``released`` ``[B]`` (:func:`~opd_jax.sampling.final_cuts`) and the kept
        teacher scores."""
        p = self.prompt_len
        c = self.config.segments
        pattern = None
        if self.config.rule.kind in CUT_RULES:
            pattern = c.oracle_pattern or ANSWER_PATTERN
        if len(rollout) == 4 and rollout[3]["texts"] is not None:
            # sampling.stop_at_release split every row's sentences after its last token
            rows, texts = {"seg": rollout[3]["seg"]}, rollout[3]["texts"]
        else:
            rows, texts = response_segments(
                self.tokenizer, rollout[0][:, p:], rollout[1][:, p:], c.kind, c.tokens, pattern
            )
        if len(rollout) == 4:  # sampling.stop_at_release: where each row is cut
            record = rollout[3]
            rows |= record["scores"]  # the teacher's scores kept from sampling, if any
            _, changepoint = sampling.split_release_options(self.config.rule.options)
            rows["keep"], rows["released"], rows["offline_tau"] = sampling.final_cuts(
                record["margin"], rows["seg"], rollout[1][:, p:], record["stopped"],
                record["tau"], changepoint,
            )  # fmt: skip
        return rows, texts

    def device_batch(
        self, rollout: tuple[np.ndarray, ...], segments: dict[str, np.ndarray]
    ) -> dict[str, jax.Array]:
        """The step's global batch from this process's rollouts and :meth:`segments`. Rows
        that come with ``keep`` (``sampling.stop_at_release``) are cut after their kept
        tokens, and the columns narrowed to the longest kept row (:func:`kept_width`)."""
        tokens, response, prompt = rollout[:3]
        host = {"tokens": tokens, "attention_mask": response | prompt, "response_mask": response}
        host |= {k: v for k, v in segments.items() if k not in CUT_RECORD}
        response_columns = ("seg", *core.TeacherScores._fields, core.TEACHER_HIDDEN)
        if "keep" in segments:
            host = cut_rows(
                host, segments["keep"], self.prompt_len, self.config.sampling, response_columns
            )
        return self.batches.to_device(host)

    def token_counts(
        self, rollout: tuple[np.ndarray, ...], segments: dict[str, np.ndarray], step: dict
    ) -> dict[str, float]:
        """A step's ``sampled_tokens``, ``scored_tokens`` (the teacher's forward passes:
        during sampling and in the update) and ``kept_tokens``, from the step's global counts
        (``step``: its scalar metrics) and, under stopping (one process), the rollouts';
        with ``sampling.stop_at_release`` also ``kept_fraction`` = kept / sampled (the step saw
        the cut rows only), ``stopped_fraction`` (rows whose cut the online rule decided),
        ``released_fraction`` and, where rows stopped, ``online_same_cut`` and
        ``online_cut_shift``: how often, and by how many sentences (offline - online), the
        offline rule on all a stopped row sampled cuts elsewhere."""
        kept = float(step["kept_tokens"])
        sampled = float(step["response_token_sum"])  # the step's rows are the rollouts
        if len(rollout) < 4:  # and the step's own kept_fraction stands
            return {"sampled_tokens": sampled, "kept_tokens": kept, "scored_tokens": sampled}
        record = rollout[3]
        sampled = float(rollout[1].sum())  # the step saw the rows cut: count them here
        counts = {"sampled_tokens": sampled, "kept_tokens": kept}
        counts["kept_fraction"] = kept / max(sampled, 1.0)  # the step saw only the kept
        # the update runs no teacher pass: it takes the scores or hidden states kept
        counts["scored_tokens"] = float(record["scored_tokens"])
        stopped = record["stopped"]
        counts["stopped_fraction"] = float(np.mean(stopped))
        counts["released_fraction"] = float(np.mean(segments["released"]))
        if stopped.any():  # the offline rule on all a stopped row sampled, against its cut
            shift = segments["offline_tau"][stopped] - record["tau"][stopped]
            counts["online_same_cut"] = float(np.mean(shift == 0))
            counts["online_cut_shift"] = float(np.mean(shift))  # sentences, offline - online
        return counts

    def update(self, batch: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        """One jitted optimizer step; replaces the live ``state``."""
        frozen = (self.frozen,) if self.frozen else ()  # without LoRA: the step as before
        params, opt_state, metrics = self.step_fn(
            *self.state, self.teacher_params, batch, key, *frozen
        )
        self.state = RunState(params, opt_state)
        return metrics
