"""OPD losses: per-token terms from logits, and their weighted reductions (docs/method.md §5).

The per-token term ``l[b, t]`` is differentiable in the student logits; the teacher is
never differentiated. The loss of a batch is ``reduce_loss(l, w)`` with the weights ``w``
of a rule (``w`` is never differentiated either).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from opd_jax.core import checks
from opd_jax.core.stats import canonical_zeros, check_logits_pair

LOSS_KINDS = ("sampled_reverse_kl", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl")
REDUCTIONS = ("token_mean", "sequence_mean")
# The per-token advantage of ``sampled_reverse_kl``, by the name a checkpoint policy saves.
SAVED_ADVANTAGE = "opd_sampled_advantage"


def check_loss_options(kind: str, beta: float) -> None:
    checks.require_choice(kind, LOSS_KINDS, "loss kind")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd needs 0 < beta < 1, got beta={beta}: use loss kind 'forward_kl' or "
            "'reverse_kl' for the limits."
        )


def _kl(logp: jax.Array, logr: jax.Array) -> jax.Array:
    """``sum_v exp(logp) (logp - logr)`` over the last axis."""
    return (jnp.exp(logp) * (logp - logr)).sum(-1)


def loss_from_logits(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    kind: str,
    beta: float,
    k: int,
) -> jax.Array:
    """Unchecked kernel of :func:`token_loss`; any leading dims ``[..., V]``."""
    z_s = student_logits.astype(jnp.float32)
    z_t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    if kind == "sampled_reverse_kl":
        # Gathers only: no [.., V] log-softmax is formed.
        y = tokens.astype(jnp.int32)[..., None]
        s_y = (jnp.take_along_axis(z_s, y, axis=-1) - jax.nn.logsumexp(z_s, -1, keepdims=True))[
            ..., 0
        ]
        q_y = (jnp.take_along_axis(z_t, y, axis=-1) - jax.nn.logsumexp(z_t, -1, keepdims=True))[
            ..., 0
        ]
        # Named so that a rematerialised caller can keep it and not recompute the teacher.
        advantage = checkpoint_name(jax.lax.stop_gradient(q_y - s_y), SAVED_ADVANTAGE)
        return -advantage * s_y
    s = jax.nn.log_softmax(z_s, axis=-1)
    q = jax.nn.log_softmax(z_t, axis=-1)
    if kind == "reverse_kl":
        return _kl(s, q)
    if kind == "forward_kl":
        return _kl(q, s)
    if kind == "jsd":
        m = jnp.logaddexp(jnp.log(beta) + q, jnp.log1p(-beta) + s)
        return beta * _kl(q, m) + (1.0 - beta) * _kl(s, m)
    _, ids = jax.lax.top_k(canonical_zeros(jax.lax.stop_gradient(z_s)), k)
    s_k = jax.nn.log_softmax(jnp.take_along_axis(z_s, ids, axis=-1), axis=-1)
    q_k = jax.nn.log_softmax(jnp.take_along_axis(z_t, ids, axis=-1), axis=-1)
    return _kl(s_k, q_k)


def token_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    kind: str = "sampled_reverse_kl",
    *,
    beta: float = 0.5,
    k: int = 16,
) -> jax.Array:
    """Per-token loss terms ``[B, T]`` from ``[B, T, V]`` logits and ``[B, T]`` tokens.

    With ``s``, ``q`` the student and teacher log-probs (``p_S``, ``p_T`` their exps):
      sampled_reverse_kl  -sg(q[y] - s[y]) * s[y]: the policy-gradient form of per-token
                          reverse KL (its gradient is ``-A grad s[y]``)
      reverse_kl          sum_v p_S (s - q)
      forward_kl          sum_v p_T (q - s)
      jsd                 beta KL(p_T || m) + (1 - beta) KL(p_S || m),
                          m = beta p_T + (1 - beta) p_S (GKD's generalised JSD)
      topk_reverse_kl     KL(p_S || p_T), both renormalised over the student's top-``k``
    """
    check_loss_options(kind, beta)
    check_logits_pair(student_logits, teacher_logits, tokens, k if kind == "topk_reverse_kl" else 1)
    return loss_from_logits(student_logits, teacher_logits, tokens, kind, beta, k)


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def reduce_loss(token_loss: jax.Array, w: jax.Array, reduction: str = "token_mean") -> jax.Array:
    """Weighted mean of ``[B, T]`` per-token terms with ``[B, T]`` weights ``w`` (not
    differentiated).

      token_mean     sum(w l) / sum(w)
      sequence_mean  mean over rows with sum_t w > 0 of sum_t(w l) / sum_t(w)
    Zero total weight gives 0, never NaN.
    """
    checks.require_choice(reduction, REDUCTIONS, "reduction")
    checks.require_same_shape(token_loss, w, "token_loss", "w")
    w = jax.lax.stop_gradient(w.astype(jnp.float32))
    weighted = w * token_loss
    if reduction == "token_mean":
        return _safe_ratio(weighted.sum(), w.sum())
    den_B = w.sum(-1)
    per_row = _safe_ratio(weighted.sum(-1), den_B)
    return _safe_ratio(per_row.sum(), (den_B > 0).sum().astype(jnp.float32))
