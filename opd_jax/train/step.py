"""The jitted OPD update: teacher and student scoring, the rule, the loss and one optax step.

The step built by :func:`make_train_step` takes sampled rollouts ``tokens [B, S]`` (prompt
columns ``[0, P)``, response columns ``[P, S)``), the host's segment ids of the responses (and
each row's cut, for the rules that read one) and a PRNG key, and returns the updated
parameters and optimizer state (both donated) with the step's metrics. The batch is cut into
``accumulate`` micro-batches scanned with summed gradients. Each micro-batch runs both models'
forward passes (the teacher's none where its scores or final hidden states come kept from
sampling) and the public objective, :func:`opd_jax.core.opd_objective` (chunked scoring:
the ``[B, N, V]`` logits are never formed). The teacher is never differentiated, nor is a
LoRA student's frozen base (``frozen``): only the parameters the step is given to update are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opd_jax import core


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the step (hashable: a change recompiles)."""

    prompt_len: int
    objective: core.ObjectiveSettings
    accumulate: int
    remat: bool = False  # rematerialise the student's blocks in the backward pass
    attention_chunk: int = 0  # xla: queries attended at a time (0: all); flash: block (0: 512)
    attention: str = "xla"  # both models' kernel: xla | cudnn | flash (models.resolve_attention)
    skip_nonfinite: bool = False  # a non-finite step leaves the parameters and optimizer state


def _student(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None) -> Any:
    """The student from its trained parameters and, with LoRA adapters, its frozen base. The
    base enters through ``stop_gradient``: it gets no gradient, and ``nnx.remat`` (``remat``)
    under a gradient of part of a model's state needs it."""
    if not frozen:
        return nnx.merge(graphdef, params)
    return nnx.merge(graphdef, params, jax.lax.stop_gradient(frozen))


TEACHER_SCORES = core.TeacherScores._fields  # batch keys of teacher scores kept from sampling


def _micro_loss(params, graphdef, teacher, micro, key, s: StepSettings, frozen=None):
    model = _student(graphdef, params, frozen)
    tokens, mask = micro["tokens"], micro["attention_mask"]
    forward = dict(query_chunk=s.attention_chunk, attention=s.attention)
    h_s = model.response_hidden(tokens, mask, s.prompt_len, remat=s.remat, **forward)
    rows = (
        tokens[:, s.prompt_len :],
        micro["response_mask"][:, s.prompt_len :],
        micro["seg"],
        key,
        s.objective,
        micro.get("cut"),
    )
    if TEACHER_SCORES[0] in micro:  # kept from sampling: no teacher forward pass
        given = core.TeacherScores(*(micro[name] for name in TEACHER_SCORES))
        loss, aux = core.opd_objective_given_teacher(h_s, model.unembed_matrix(), given, *rows)
        return loss, aux.diagnostics
    if core.TEACHER_HIDDEN in micro:  # kept from sampling: the teacher's logits, no forward pass
        h_t = jax.lax.stop_gradient(micro[core.TEACHER_HIDDEN])
    else:
        h_t = jax.lax.stop_gradient(teacher.response_hidden(tokens, mask, s.prompt_len, **forward))
    loss, aux = core.opd_objective(
        h_s, model.unembed_matrix(), h_t, jax.lax.stop_gradient(teacher.unembed_matrix()), *rows
    )
    return loss, aux.diagnostics


def _all_finite(loss: jax.Array, grad_norm: jax.Array, params: Any) -> jax.Array:
    """Whether the loss, the gradient (its global norm) and every updated parameter are finite."""
    leaves = [jnp.isfinite(p).all() for p in jax.tree.leaves(params)]
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.stack(leaves).all()


def _split_micro(batch: dict[str, jax.Array], accumulate: int) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: x.reshape((accumulate, -1) + x.shape[1:]), batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    settings: StepSettings,
    shardings: tuple[Any, Any] | None = None,
):
    """The jitted, state-donating step ``(params, opt_state, teacher_params, batch, key,
    frozen=None) -> (params, opt_state, metrics)``.

    ``params`` are the trained parameters; ``frozen`` (not donated, not differentiated), a LoRA
    student's base: ``(graphdef, params, frozen)`` from
    :func:`~opd_jax.models.lora.split_student`. Without adapters ``frozen`` is empty or None.

    Args:
      graphdef, teacher_graphdef: from ``split_student(model)``, ``nnx.split(model, nnx.Param)``.
      tx: the optax transformation.
      settings: static :class:`StepSettings`.
      shardings: ``(param_shardings, opt_shardings)``: the step keeps the state in them.

    The batch holds ``tokens``, ``attention_mask``, ``response_mask`` ``[B, S]``, ``seg [B, N]``
    and, for the rules of :data:`opd_jax.core.rules.CUT_RULES` only, ``cut [B]``; with the
    fields of :class:`~opd_jax.core.TeacherScores` (``[B, N(, K)]``, kept from sampling) the
    teacher runs no forward pass (:func:`~opd_jax.core.opd_objective_given_teacher`), nor with
    :data:`~opd_jax.core.TEACHER_HIDDEN` (``[B, N, D]``: its logits come from them); metrics are
    scalars (loss, gradient norm, diagnostics, ``nonfinite``: 1 when the loss, the gradient or
    an updated parameter is not finite) and ``[bins]`` position profiles. With
    ``settings.skip_nonfinite`` such a step returns the state it was given.
    """

    def step(params, opt_state, teacher_params, batch, key, frozen=None):
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

        def accumulate(grads, xs):
            micro, micro_key = xs
            (loss, diag), g = grad_fn(params, graphdef, teacher, micro, micro_key, settings, frozen)
            return jax.tree.map(jnp.add, grads, g), (loss, diag)

        micro = _split_micro(batch, settings.accumulate)
        keys = jax.random.split(key, settings.accumulate)
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, diags) = jax.lax.scan(accumulate, zeros, (micro, keys))
        grads = jax.tree.map(lambda g: g / settings.accumulate, grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            name: x.sum(0) if name in core.COUNTS else x.mean(0) for name, x in diags.items()
        }
        metrics["loss"] = losses.mean()
        metrics["grad_norm"] = optax.tree.norm(grads)
        finite = _all_finite(metrics["loss"], metrics["grad_norm"], new_params)
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        if settings.skip_nonfinite:
            new_params, new_opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (new_params, new_opt_state),
                (params, opt_state),
            )
        return new_params, new_opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, None))


def make_score_step(graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef, settings: StepSettings):
    """The jitted ``(params, teacher_params, batch, key, frozen=None) -> (loss,
    diagnostics)``: the step's objective on a batch (one micro-batch) without the gradient or
    the update, to measure a pair (``opd-jax profile``). ``params`` may also be a LoRA
    student's whole state (``Session.params``), ``frozen`` then None."""

    def score(params, teacher_params, batch, key, frozen=None):
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        return _micro_loss(params, graphdef, teacher, batch, key, settings, frozen)

    return jax.jit(score)
