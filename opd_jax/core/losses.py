"""OPD losses: a registry of per-token terms from logits, and their weighted reductions
(docs/method.md §5).

Every loss is a function of ``LOSSES``::

    l = LOSSES[kind](student_logits, teacher_logits, tokens, **options)   # [...]

taking float32 logits ``[..., V]`` (the teacher's already behind ``stop_gradient``) and the
sampled ``tokens [...]``; its options are its keyword-only parameters, with their defaults
(:func:`loss_options`), and it raises ``ValueError`` for an option value it cannot take. Use
:func:`token_loss` to call a loss by name with checked inputs, :func:`check_loss` to check a
config's kind and options before any compute. The term is differentiable in the student
logits; the teacher is never differentiated. The loss of a batch is ``reduce_loss(l, w)``
with the weights ``w`` of a rule (never differentiated either).

Adding a loss: write ``def my_loss(z_s, z_t, tokens, *, my_option=1.0)`` here, add it to
``LOSSES``, test it against a NumPy reference, and describe it in docs/method.md §5; the
config takes it as ``loss.kind: my_loss`` with ``loss.options.my_option``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from opd_jax.core import checks
from opd_jax.core.registry import check_options, keyword_options
from opd_jax.core.stats import canonical_zeros, check_logits_pair

REDUCTIONS = ("token_mean", "sequence_mean")
# The per-token advantage of ``sampled_reverse_kl``, by the name a checkpoint policy saves.
SAVED_ADVANTAGE = "opd_sampled_advantage"

Loss = Callable[..., jax.Array]


def _kl(logp: jax.Array, logr: jax.Array) -> jax.Array:
    """``sum_v exp(logp) (logp - logr)`` over the last axis."""
    return (jnp.exp(logp) * (logp - logr)).sum(-1)


def sampled_reverse_kl(z_s: jax.Array, z_t: jax.Array, tokens: jax.Array) -> jax.Array:
    """``-sg(q[y] - s[y]) * s[y]``: the policy-gradient form of per-token reverse KL (its
    gradient is ``-A grad s[y]``); gathers only, no ``[..., V]`` log-softmax is formed."""
    y = tokens.astype(jnp.int32)[..., None]
    s_y = (jnp.take_along_axis(z_s, y, axis=-1) - jax.nn.logsumexp(z_s, -1, keepdims=True))[..., 0]
    q_y = (jnp.take_along_axis(z_t, y, axis=-1) - jax.nn.logsumexp(z_t, -1, keepdims=True))[..., 0]
    return policy_gradient_term(s_y, q_y)


def policy_gradient_term(s_y: jax.Array, q_y: jax.Array) -> jax.Array:
    """``-sg(q[y] - s[y]) * s[y]`` from the two log-probabilities of the sampled tokens."""
    # Named so that a rematerialised caller can keep it and not recompute the teacher.
    advantage = checkpoint_name(jax.lax.stop_gradient(q_y - s_y), SAVED_ADVANTAGE)
    return -advantage * s_y


# The losses whose term needs nothing of the teacher but q[y]: they train on teacher scores
# kept from sampling (opd_jax.core.teacher_scores), as function(s_y, q_y, **options).
SAMPLED_TOKEN_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "sampled_reverse_kl": policy_gradient_term
}


def reverse_kl(z_s: jax.Array, z_t: jax.Array, tokens: jax.Array) -> jax.Array:
    """``sum_v p_S (s - q)``."""
    return _kl(jax.nn.log_softmax(z_s, -1), jax.nn.log_softmax(z_t, -1))


def forward_kl(z_s: jax.Array, z_t: jax.Array, tokens: jax.Array) -> jax.Array:
    """``sum_v p_T (q - s)``."""
    return _kl(jax.nn.log_softmax(z_t, -1), jax.nn.log_softmax(z_s, -1))


def jsd(z_s: jax.Array, z_t: jax.Array, tokens: jax.Array, *, beta: float = 0.5) -> jax.Array:
    """GKD's generalised JSD ``beta KL(p_T || m) + (1 - beta) KL(p_S || m)``,
    ``m = beta p_T + (1 - beta) p_S``; ``0 < beta < 1``."""
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd needs 0 < beta < 1, got beta={beta}: use loss kind 'forward_kl' or "
            "'reverse_kl' for the limits."
        )
    s, q = jax.nn.log_softmax(z_s, -1), jax.nn.log_softmax(z_t, -1)
    m = jnp.logaddexp(jnp.log(beta) + q, jnp.log1p(-beta) + s)
    return beta * _kl(q, m) + (1.0 - beta) * _kl(s, m)


def topk_reverse_kl(z_s: jax.Array, z_t: jax.Array, tokens: jax.Array, *, k: int = 16) -> jax.Array:
    """``KL(p_S || p_T)``, both renormalised over the student's top-``k`` tokens."""
    checks.require_k(k, z_s.shape[-1])
    _, ids = jax.lax.top_k(canonical_zeros(jax.lax.stop_gradient(z_s)), k)
    s_k = jax.nn.log_softmax(jnp.take_along_axis(z_s, ids, axis=-1), axis=-1)
    q_k = jax.nn.log_softmax(jnp.take_along_axis(z_t, ids, axis=-1), axis=-1)
    return _kl(s_k, q_k)


LOSSES: dict[str, Loss] = {
    "sampled_reverse_kl": sampled_reverse_kl,
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "jsd": jsd,
    "topk_reverse_kl": topk_reverse_kl,
}


def loss_options(kind: str) -> dict[str, Any]:
    """The options of loss ``kind`` with their defaults."""
    checks.require_choice(kind, LOSSES, "loss kind")
    return keyword_options(LOSSES[kind])


def check_loss(kind: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``options`` of loss ``kind``, checked before any compute: unknown names fail naming the
    nearest, and the loss is traced once on abstract inputs so that it rejects values it
    cannot take (``jsd`` with ``beta=1``). Returns the options as a dict."""
    options = check_options(options, loss_options(kind), f"loss {kind!r}")
    sizes = [v for v in (loss_options(kind) | options).values() if isinstance(v, int)]
    z = jax.ShapeDtypeStruct((1, max([2, *sizes])), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    jax.eval_shape(functools.partial(LOSSES[kind], **options), z, z, y)
    return options


def apply_loss(
    kind: str,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    options: Mapping[str, Any] | None = None,
) -> jax.Array:
    """``LOSSES[kind]`` on float32 logits, the teacher's behind ``stop_gradient``; any leading
    dims ``[..., V]`` (shapes unchecked: see :func:`token_loss`)."""
    z_s = student_logits.astype(jnp.float32)
    z_t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    return LOSSES[kind](z_s, z_t, tokens, **(options or {}))


def token_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    kind: str = "sampled_reverse_kl",
    **options: Any,
) -> jax.Array:
    """Per-token loss terms ``[B, T]`` of loss ``kind`` with its ``options`` (e.g. ``beta=0.3``
    for ``jsd``, ``k=8`` for ``topk_reverse_kl``) from ``[B, T, V]`` logits and ``[B, T]``
    tokens. With ``s``, ``q`` the student and teacher log-probs (``p_S``, ``p_T`` their exps),
    the kinds of :data:`LOSSES` are those of docs/method.md §5."""
    options = check_loss(kind, options)
    check_logits_pair(student_logits, teacher_logits, tokens, options.get("k", 1))
    return apply_loss(kind, student_logits, teacher_logits, tokens, options)


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
