"""The ``rule`` part of ``benchmarks.opd_step``: what the release rule costs in opd_jax's step.

The step with rule ``release`` against ``full`` (timed alternately), and, on the statistics
the step scores, the jitted rule alone (``core.apply_rule("release", ...)``) and the objective
after scoring (rule, loss and diagnostics), as fractions of the step (target: the rule < 2%).
Used by ``benchmarks.opd_step``, which sets the environment before these imports start JAX.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from benchmarks import common
from benchmarks.opd_sides import PAIRS, SHAPES, JaxSide, K, make_batch
from opd_jax import core

COLUMNS = [
    "B", "P", "N", "step_full_s", "step_release_s", "release_minus_full_frac", "forwards_s",
    "score_s", "rule_s",
    "rule_frac", "objective_s", "objective_frac", "rule_below_2pct",
]  # fmt: skip


def part_rule(pair, dirs, args, preset, settings, frameworks):
    """opd_jax only: the step with rule release against full; the rule alone, and the
    objective after scoring (rule, loss and diagnostics), on the scored statistics."""
    B, P, N = settings["batch"], settings["prompt"], settings["response"]
    host = make_batch(B, P, N, SHAPES[PAIRS[pair][0]]["vocab_size"])
    side = JaxSide(dirs, preset["dtype"], args.chunk_size, args.remat, args.attention)
    runs = {rule: side.update(host, P, N, rule)[0] for rule in ("full", "release")}
    step = common.alternating_medians(runs, preset["repeats"])
    del runs
    params, batch = side.fresh_params(), jax.device_put(host)
    graphdef, teacher_graphdef, settings_ = (
        side.graphdef,
        side.teacher_graphdef,
        side.settings(P, "release"),
    )

    def hidden(params, teacher_params, batch):
        model = nnx.merge(graphdef, params)
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        tokens, mask, attention = batch["tokens"], batch["attention_mask"], side.attention
        h_s = model.response_hidden(tokens, mask, P, attention=attention)
        h_t = teacher.response_hidden(tokens, mask, P, attention=attention)
        return model, teacher, h_s, h_t

    @jax.jit
    def score(params, teacher_params, batch):
        model, teacher, h_s, h_t = hidden(params, teacher_params, batch)
        return core.score_chunked(
            h_s, model.unembed_matrix(), h_t, teacher.unembed_matrix(), batch["tokens"][:, P:],
            k=K, chunk_size=args.chunk_size,
        )  # fmt: skip

    forwards = jax.jit(lambda *a: hidden(*a)[2:])  # both models' hidden states alone

    scored = jax.block_until_ready(score(params, side.teacher_params, batch))
    r, seg = batch["response_mask"][:, P:], batch["seg"]
    rule = jax.jit(lambda s, r, seg: core.apply_rule("release", core.RuleBatch(s, r, seg)))
    # the step's objective after scoring: the rule, the loss, the diagnostics of
    # docs/method.md §7 and five rules' kept fractions
    objective = jax.jit(
        lambda scored, r, seg: core.objective_from_scores(
            scored, r, seg, None, settings_.objective
        )[0]
    )
    many = max(20, preset["repeats"])
    rule_s = common.median_seconds(lambda: rule(scored.stats, r, seg), many)
    objective_s = common.median_seconds(lambda: objective(scored, r, seg), many)
    score_s = common.median_seconds(lambda: score(params, side.teacher_params, batch), 3)
    forwards_s = common.median_seconds(lambda: forwards(params, side.teacher_params, batch), 3)
    side.close()
    return [
        {
            "case": "rule", "B": B, "P": P, "N": N, "step_full_s": step["full"],
            "step_release_s": step["release"],
            "release_minus_full_frac": step["release"] / step["full"] - 1,
            "forwards_s": forwards_s, "score_s": score_s, "rule_s": rule_s,
            "rule_frac": rule_s / step["release"],
            "objective_s": objective_s,
            "objective_frac": objective_s / step["release"],
            "rule_below_2pct": rule_s / step["release"] < 0.02,
            "loadavg_1m": os.getloadavg()[0],
        }
    ]  # fmt: skip
