"""The ``profile`` part of ``benchmarks.opd_step``: where an OPD update's time goes, its parts
jitted and timed alone beside the whole step.

Each part is the step's own code (the models' ``response_hidden``, ``core.score_chunked``,
``core.objective_from_scores``, the optimizer) compiled on its own and timed as the median of
``repeats`` runs, with its model FLOPs and achieved GFLOP/s; the ``matmul`` row is one jitted
``[B N, D] @ [D, V]`` float matmul, the machine's ceiling at this shape. The parts overlap
nothing, so ``step - parts`` is what the whole step spends beyond them (the micro-batch scan,
fusion lost or won across the parts). Used by ``benchmarks.opd_step`` (``--part profile``),
which sets the environment before these imports start JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks.opd_sides import PAIRS, SHAPES, JaxSide, forward_flops, make_batch
from opd_jax import core

COLUMNS = ["part", "seconds", "step_frac", "gflop", "gflop_s", "xla_peak_gib"]


def profile(
    side: Any,
    host: dict[str, np.ndarray],
    prompt: int,
    shapes: tuple[dict[str, Any], dict[str, Any]],
    repeats: int,
    time_fn: Callable[[Callable[[], Any], int], float],
) -> list[dict[str, Any]]:
    """Rows ``{part, seconds, step_frac, gflop, gflop_s}`` of the update on ``host``; the
    ``step`` row also carries ``compile_s`` and XLA's ``xla_temp_gib``, ``xla_peak_gib``.

    Args:
      side: ``benchmarks.opd_sides.JaxSide`` (models, optimizer, step settings).
      host: the benchmark batch (``benchmarks.opd_sides.make_batch``).
      prompt: prompt columns ``P``.
      shapes: the student's and teacher's HF config dicts.
      repeats: timed runs per part (median).
      time_fn: ``(fn, repeats) -> median seconds``, results blocked on.
    """
    settings = side.settings(prompt, "full")
    objective = settings.objective
    forward = dict(query_chunk=settings.attention_chunk, attention=settings.attention)
    graphdef, teacher_graphdef = side.graphdef, side.teacher_graphdef
    params, teacher_params = side.fresh_params(), side.teacher_params
    batch = jax.device_put(host)
    tokens = batch["tokens"]
    y, r, seg = tokens[:, prompt:], batch["response_mask"][:, prompt:], batch["seg"]
    B, S = tokens.shape
    N = S - prompt
    student_hf, teacher_hf = shapes
    D, V = student_hf["hidden_size"], student_hf["vocab_size"]
    unembed = 2.0 * B * N * D * V  # one [B N, D] @ [D, V]

    def hidden(graph, p, b):  # every array an argument: no constants for XLA to fold
        model = nnx.merge(graph, p)
        return model.response_hidden(b["tokens"], b["attention_mask"], prompt, **forward)

    def unembed_of(graph, p):
        return nnx.merge(graph, p).unembed_matrix()

    teacher_fwd = jax.jit(lambda tp, b: hidden(teacher_graphdef, tp, b))
    student_fwd = jax.jit(lambda p, b: hidden(graphdef, p, b))
    h_t = jax.block_until_ready(teacher_fwd(teacher_params, batch))
    h_s = jax.block_until_ready(student_fwd(params, batch))
    cotangent = jax.random.normal(jax.random.key(1), h_s.shape, h_s.dtype)
    student_bwd = jax.jit(jax.grad(lambda p, b, c: (hidden(graphdef, p, b) * c).sum()))
    u_s, u_t = unembed_of(graphdef, params), unembed_of(teacher_graphdef, teacher_params)

    def score(h_s, u_s, h_t, u_t, y):  # the loss's own options at their defaults, as the step's
        return core.score_chunked(
            h_s, u_s, h_t, u_t, y, k=objective.k, loss_kind=objective.loss,
            chunk_size=objective.chunk_size,
        )  # fmt: skip

    score_fwd = jax.jit(score)

    def loss_and_stats(h, u, h_t, u_t, y, r):  # the statistics stay live, as the rule needs
        scored = score(h, u, h_t, u_t, y)
        return core.reduce_loss(scored.token_loss, r), scored.stats

    score_bwd = jax.jit(jax.grad(loss_and_stats, argnums=(0, 1), has_aux=True))
    scored = jax.block_until_ready(score_fwd(h_s, u_s, h_t, u_t, y))
    after = jax.jit(lambda sc, r, seg: core.objective_from_scores(sc, r, seg, None, objective))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    opt_state = side.tx.init(params)
    optimizer = jax.jit(lambda g, o, p: side.tx.update(g, o, p))
    h_flat = h_s.reshape(-1, D)
    matmul = jax.jit(lambda h, u: jnp.dot(h, u, preferred_element_type=jnp.float32))
    run_step, step_batch, _, memory = side.compile_step(host, prompt, "full")

    teacher_body = forward_flops(teacher_hf, B, S, 0)  # N = 0: the blocks alone, no vocabulary
    body = forward_flops(student_hf, B, S, 0)
    parts = [
        ("teacher forward", lambda: teacher_fwd(teacher_params, batch), teacher_body),
        ("student forward", lambda: student_fwd(params, batch), body),
        ("student forward+backward", lambda: student_bwd(params, batch, cotangent), 3 * body),
        ("scoring forward", lambda: score_fwd(h_s, u_s, h_t, u_t, y), 2 * unembed),
        ("scoring forward+backward", lambda: score_bwd(h_s, u_s, h_t, u_t, y, r), 4 * unembed),
        ("rule, loss, diagnostics", lambda: after(scored, r, seg), 0.0),
        ("optimizer", lambda: optimizer(grads, opt_state, params), 0.0),
        ("matmul [BN,D]@[D,V]", lambda: matmul(h_flat, u_s), unembed),
        ("step", lambda: run_step(step_batch), teacher_body + 3 * body + 4 * unembed),
    ]
    rows = []
    for name, fn, flops in parts:
        seconds = time_fn(fn, repeats)
        rows.append(dict(part=name, seconds=seconds, gflop=flops / 1e9 or None,
                         gflop_s=flops / seconds / 1e9 if flops else None))  # fmt: skip
    step = rows[-1]["seconds"]
    summed = ("teacher forward", "student forward+backward", "scoring forward+backward",
              "rule, loss, diagnostics", "optimizer")  # fmt: skip
    rest = step - sum(row["seconds"] for row in rows if row["part"] in summed)
    rows.insert(-1, dict(part="step - parts", seconds=rest))
    for row in rows:
        row["step_frac"] = row["seconds"] / step
    rows[-1].update(memory)  # the step's compile seconds and XLA's memory
    return rows


def part_profile(pair, dirs, args, preset, settings, frameworks):
    """opd_jax only: the update's parts timed alone beside the whole step (:func:`profile`),
    and XLA's memory of the step."""
    B, P, N = settings["batch"], settings["prompt"], settings["response"]
    host = make_batch(B, P, N, SHAPES[PAIRS[pair][0]]["vocab_size"])
    side = JaxSide(dirs, preset["dtype"], args.chunk_size, args.remat, args.attention)
    shapes = tuple(SHAPES[s] for s in PAIRS[pair])
    rows = profile(side, host, P, shapes, preset["repeats"], common.median_seconds)
    side.close()
    return [dict(row, case=row["part"], B=B, P=P, N=N) for row in rows]
