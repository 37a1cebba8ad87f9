"""Memory per device of a run, before anything is allocated (``opd-jax plan``).

Models are built abstractly (``nnx.eval_shape``) from their ``config.json`` or GGUF metadata,
placed by the sharding rules on the configured mesh, and the real jitted train step is
lowered and compiled for those shapes: XLA's own memory analysis gives the temporary
(activation) memory, the parameter and optimizer bytes are the per-device shard sizes.

With ``student.lora.rank`` only the adapters train: the optimizer state is theirs, and the
plan also gives the optimizer state full fine-tuning would hold, for comparison.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from opd_jax.config import Config
from opd_jax.core import SAMPLED_TOKEN_LOSSES, TEACHER_HIDDEN, TeacherScores
from opd_jax.core.rules import CUT_RULES
from opd_jax.run_models import spec_config
from opd_jax.sampling.release_watch import look_columns, widest_look
from opd_jax.sharding import DEFAULT_RULES
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.session import mesh_from_config, step_settings
from opd_jax.train.state import abstract_model, abstract_state
from opd_jax.train.step import make_train_step

GIB = 2**30


def device_bytes(tree: Any) -> int:
    """Bytes of the largest per-device shard sum of a tree of sharded abstract arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def plan(config: Config) -> dict[str, Any]:
    """The run's memory per device in GiB, and what it is made of."""
    mesh = mesh_from_config(config)
    student_cfg, teacher_cfg = spec_config(config.student), spec_config(config.teacher)
    graphdef, params, frozen = abstract_model(student_cfg, mesh, config.student.lora)
    teacher_graphdef, teacher_params, _ = abstract_model(
        teacher_cfg, mesh, quantize=config.teacher.quantize
    )
    tx = make_optimizer(config.optim, config.train.steps)
    params, opt_state = abstract_state(tx, params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(DEFAULT_RULES.batch))
    b = config.data.batch_size * config.sampling.n  # rows per step
    p, n = config.data.max_prompt_tokens, config.sampling.max_new_tokens
    sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)  # noqa: E731
    batch = {
        "tokens": sds((b, p + n)),
        "attention_mask": sds((b, p + n)),
        "response_mask": sds((b, p + n)),
        "seg": sds((b, n)),
    }
    if config.rule.kind in CUT_RULES:
        batch["cut"] = sds((b,))
    if config.sampling.stop_at_release and config.loss.kind in SAMPLED_TOKEN_LOSSES:
        for name in TeacherScores._fields:  # the teacher's scores kept from sampling
            shape = (b, n) if name == "teacher_logp" else (b, n, config.score.k)
            dtype = jnp.int32 if name.endswith("_ids") else jnp.float32
            batch[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    elif config.sampling.stop_at_release:  # the teacher's final hidden states kept from sampling
        shape, dtype = (b, n, teacher_cfg.hidden_size), teacher_cfg.dtype
        batch[TEACHER_HIDDEN] = jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step = make_train_step(graphdef, teacher_graphdef, tx, step_settings(config), shardings)
    extra = (frozen,) if frozen else ()  # a LoRA student's frozen base
    with jax.set_mesh(mesh):
        compiled = step.lower(params, opt_state, teacher_params, batch, key, *extra).compile()
    analysis = compiled.memory_analysis()
    batch_shards = int(np.prod([mesh.shape[a] for a in DEFAULT_RULES.batch]))
    rows_here = b // batch_shards

    def kv_cache(c: Any) -> int:
        itemsize = jnp.dtype(c.dtype).itemsize
        return 2 * c.num_layers * rows_here * (p + n) * c.num_kv_heads * c.head_dim * itemsize

    stop = config.sampling.stop_at_release
    vocab = student_cfg.token_vocab or student_cfg.vocab_size
    widest = widest_look(config.sampling.compact_every, n)
    look = look_columns(rows_here, vocab, widest)
    rows = {
        "student_params": device_bytes(params) + device_bytes(frozen),
        "optimizer_state": device_bytes(opt_state),
        "teacher_params": device_bytes(teacher_params),
        "step_temporaries": analysis.temp_size_in_bytes,
        # sampled on the training devices, or on the mesh.rollout devices set apart
        "sampler_kv_cache": 0 if config.mesh.rollout else kv_cache(student_cfg),
        # sampling.stop_at_release: the teacher's cache while it scores the rows being sampled,
        # the student's top-K (score.k ids and log-probs) at every column twice and the tokens
        # and response mask once more (the copy a look reads while decoding goes on), a
        # look's [rows, V] teacher logits of look_columns columns with their ranking copy, and
        # the attention scores and probabilities [rows, heads, columns, P + N] of its widest pass
        "teacher_kv_cache": kv_cache(teacher_cfg) if stop else 0,
        "release_watch_buffers": (
            rows_here * (p + n) * (2 * config.score.k * 8 + 8)
            + 2 * 4 * rows_here * vocab * look
            + 2 * 4 * rows_here * teacher_cfg.num_heads * widest * (p + n)
            if stop
            else 0
        ),
        # the step's batch, sampling.stop_at_release: the teacher's scores (a q[y] loss) or its
        # final hidden states [rows, N, D] (any other) kept from sampling, in place of its forward
        "teacher_kept": sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            for name, x in batch.items()
            if name in (*TeacherScores._fields, TEACHER_HIDDEN)
        )
        // batch_shards,
        # train.async_rollouts on the training devices: the copy the next rollouts sample from
        "rollout_params": (
            device_bytes(params) if config.train.async_rollouts and not config.mesh.rollout else 0
        ),
    }
    rows["total"] = sum(rows.values())
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    result = {
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        # the tokenizer's ids, over which both models score and sample (embedding rows may pad)
        "vocab": {
            "shared": student_cfg.token_vocab or student_cfg.vocab_size,
            "student_rows": student_cfg.vocab_size,
            "teacher_rows": teacher_cfg.vocab_size,
        },
        "student_parameters": count(params) + count(frozen),
        "teacher_parameters": count(teacher_params),
        "gib_per_device": {k: v / GIB for k, v in rows.items()},
        "compiled": {
            "argument_gib": analysis.argument_size_in_bytes / GIB,
            "output_gib": analysis.output_size_in_bytes / GIB,
            "alias_gib": analysis.alias_size_in_bytes / GIB,
            "temp_gib": analysis.temp_size_in_bytes / GIB,
        },
    }
    if frozen:
        result["lora"] = lora_saving(config, tx, params, frozen, mesh)
    return result


def lora_saving(
    config: Config, tx: Any, adapters: Any, base: Any, mesh: jax.sharding.Mesh
) -> dict[str, Any]:
    """What LoRA saves: the trained parameters and the optimizer state per device in GiB,
    with the adapters and with full fine-tuning of the same student (its base trained)."""
    full_opt = abstract_state(tx, base, mesh).opt_state
    lora_opt = abstract_state(tx, adapters, mesh).opt_state
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    return {
        "rank": config.student.lora.rank,
        "trained_parameters": count(adapters),
        "full_parameters": count(base),
        "optimizer_gib": device_bytes(lora_opt) / GIB,
        "full_finetune_optimizer_gib": device_bytes(full_opt) / GIB,
    }


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a short table."""
    lines = [
        f"mesh {result['mesh']} on {result['devices']} x {result['device_kind']}",
        f"student {result['student_parameters']:,} parameters, "
        f"teacher {result['teacher_parameters']:,}",
        f"vocabulary {result['vocab']['shared']:,} tokens (embedding rows: student "
        f"{result['vocab']['student_rows']:,}, teacher {result['vocab']['teacher_rows']:,})",
        "",
        "| per device | GiB |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["gib_per_device"].items()]
    if "lora" in result:
        lora = result["lora"]
        share = lora["trained_parameters"] / lora["full_parameters"]
        lines += [
            "",
            f"LoRA rank {lora['rank']}: {lora['trained_parameters']:,} trained parameters "
            f"({share:.2%} of the student's {lora['full_parameters']:,}); optimizer state "
            f"{lora['optimizer_gib']:.4f} GiB per device, full fine-tuning "
            f"{lora['full_finetune_optimizer_gib']:.4f} GiB",
        ]
    return "\n".join(lines)
