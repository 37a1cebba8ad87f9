"""Per-position statistics of a student and a teacher over the student's top-K candidates.

Notation (docs/method.md §1): ``s = log_softmax(student_logits)``, ``q =
log_softmax(teacher_logits)``, ``y`` the sampled tokens, ``S_t`` the ids of the K largest
``s[t]`` (ties: lowest id first; ordered by descending ``s``). Position ``t`` of the logits
predicts ``y[t]`` (the caller aligns them).

Everything downstream of scoring (margins, entropy, TA-OPD's C and D, advantages) needs only
the K-sized values gathered here, so a chunked scoring pass keeps a :class:`TokenStats` and
never a ``[B, T, V]`` array.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.core import checks

MARGIN_KINDS = ("gap", "mean_gap", "sampled_gap", "advantage_spread", "teacher_mass")


class TokenStats(NamedTuple):
    """K-sized per-position quantities of one scored batch. Leading dims ``[B, T]``."""

    tokens: jax.Array  # [B, T] int32, the sampled tokens y
    student_logp: jax.Array  # [B, T] s[y]
    teacher_logp: jax.Array  # [B, T] q[y]
    student_topk_ids: jax.Array  # [B, T, K] S_t, by descending s
    student_topk_logp: jax.Array  # [B, T, K] s on S_t
    teacher_at_student_topk: jax.Array  # [B, T, K] q on S_t
    teacher_topk_ids: jax.Array  # [B, T, K] the teacher's own top-K
    teacher_topk_logp: jax.Array  # [B, T, K] q on the teacher's top-K
    student_at_teacher_topk: jax.Array  # [B, T, K] s on the teacher's top-K

    @property
    def k(self) -> int:
        return self.student_topk_ids.shape[-1]


def canonical_zeros(x: jax.Array) -> jax.Array:
    """``-0.0 -> 0.0``, so that ``top_k`` (a total order) ranks them as the tie they are."""
    return jnp.where(x == 0, jnp.zeros_like(x), x)


def stats_from_logits(
    student_logits: jax.Array, teacher_logits: jax.Array, tokens: jax.Array, k: int
) -> TokenStats:
    """Unchecked kernel of :func:`token_stats`; any leading dims ``[..., V]``."""
    z_s = student_logits.astype(jnp.float32)
    z_t = teacher_logits.astype(jnp.float32)
    # Only K-sized gathers of log-probs are needed: z[ids] - logsumexp(z), never the full
    # log_softmax. Ranking on the raw logits also keeps exact ties exact.
    lse_s = jax.nn.logsumexp(z_s, axis=-1, keepdims=True)
    lse_t = jax.nn.logsumexp(z_t, axis=-1, keepdims=True)
    _, s_ids = jax.lax.top_k(canonical_zeros(z_s), k)
    _, q_ids = jax.lax.top_k(canonical_zeros(z_t), k)
    y = tokens.astype(jnp.int32)[..., None]
    s_at = lambda ids: jnp.take_along_axis(z_s, ids, axis=-1) - lse_s  # noqa: E731
    q_at = lambda ids: jnp.take_along_axis(z_t, ids, axis=-1) - lse_t  # noqa: E731
    return TokenStats(
        tokens=y[..., 0],
        student_logp=s_at(y)[..., 0],
        teacher_logp=q_at(y)[..., 0],
        student_topk_ids=s_ids,
        student_topk_logp=s_at(s_ids),
        teacher_at_student_topk=q_at(s_ids),
        teacher_topk_ids=q_ids,
        teacher_topk_logp=q_at(q_ids),
        student_at_teacher_topk=s_at(q_ids),
    )


def check_logits_pair(
    student_logits: jax.Array, teacher_logits: jax.Array, tokens: jax.Array | None, k: int
) -> None:
    """Validates a ``[B, T, V]`` logits pair, optional ``[B, T]`` tokens and ``k``."""
    checks.require_rank(student_logits, 3, "student_logits", "[B, T, V]")
    checks.require_rank(teacher_logits, 3, "teacher_logits", "[B, T, V]")
    checks.require_floating(student_logits, "student_logits")
    checks.require_floating(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {student_logits.shape} and teacher_logits "
            f"{teacher_logits.shape} must share [B, T, V]: a teacher and student must use "
            "the same tokenizer and be scored on the same batch."
        )
    if tokens is not None:
        checks.require_integer(tokens, "tokens")
        if tokens.shape != student_logits.shape[:2]:
            raise ValueError(
                f"tokens {tokens.shape} must be [B, T] = {student_logits.shape[:2]}, "
                "aligned with the logits that predict them."
            )
    checks.require_k(k, student_logits.shape[-1])
    checks.require_finite(student_logits, "student_logits")
    checks.require_finite(teacher_logits, "teacher_logits")


def token_stats(
    student_logits: jax.Array, teacher_logits: jax.Array, tokens: jax.Array, *, k: int = 16
) -> TokenStats:
    """Gathers the K-sized statistics of ``[B, T, V]`` logits at ``[B, T]`` tokens."""
    check_logits_pair(student_logits, teacher_logits, tokens, k)
    return stats_from_logits(student_logits, teacher_logits, tokens, k)


def _first_k(stats: TokenStats, k: int | None) -> int:
    if k is None:
        return stats.k
    checks.require_k(k, stats.k, "the K the statistics were scored with")
    return k


def margin_from_stats(
    stats: TokenStats, kind: str = "gap", *, k: int | None = None, renormalize: bool = False
) -> jax.Array:
    """The teacher's per-position margin over the student's top-``k`` candidates, ``[B, T]``.

    kinds (docs/method.md §1), with ``q`` restricted to ``S_t``:
      gap               max q - second largest q (0 when k = 1)
      mean_gap          max q - mean q
      sampled_gap       q[y] - max of q over S_t minus y (0 when that set is empty)
      advantage_spread  max (q - s) - min (q - s)
      teacher_mass      sum exp(q)
    ``renormalize`` subtracts ``logsumexp`` of q over S_t from every teacher log-prob first
    (all kinds but ``teacher_mass`` are invariant to it). ``k`` (default: the stats' K)
    takes the student's first k candidates.
    """
    checks.require_choice(kind, MARGIN_KINDS, "margin kind")
    k = _first_k(stats, k)
    q_BxTxK = stats.teacher_at_student_topk[..., :k]
    q_y_BxT = stats.teacher_logp
    if renormalize:
        lse_BxT = jax.nn.logsumexp(q_BxTxK, axis=-1)
        q_BxTxK = q_BxTxK - lse_BxT[..., None]
        q_y_BxT = q_y_BxT - lse_BxT
    if kind == "gap":
        if k == 1:
            return jnp.zeros_like(q_y_BxT)
        # Two maxima rather than top_k: several times faster on CPU for small K.
        first = jax.nn.one_hot(q_BxTxK.argmax(-1), k, dtype=bool)
        return q_BxTxK.max(-1) - jnp.where(first, -jnp.inf, q_BxTxK).max(-1)
    if kind == "mean_gap":
        return q_BxTxK.max(-1) - q_BxTxK.mean(-1)
    if kind == "sampled_gap":
        is_y = stats.student_topk_ids[..., :k] == stats.tokens[..., None]
        best_other = jnp.where(is_y, -jnp.inf, q_BxTxK).max(-1)
        return jnp.where(jnp.isneginf(best_other), 0.0, q_y_BxT - best_other)
    if kind == "advantage_spread":
        adv_BxTxK = q_BxTxK - stats.student_topk_logp[..., :k]
        return adv_BxTxK.max(-1) - adv_BxTxK.min(-1)
    return jnp.exp(q_BxTxK).sum(-1)


def topk_margin(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    k: int = 16,
    kind: str = "gap",
    *,
    tokens: jax.Array | None = None,
    renormalize: bool = False,
) -> jax.Array:
    """Margin ``[B, T]`` of the teacher over the student's top-``k`` from ``[B, T, V]`` logits.

    ``tokens [B, T]`` is required by ``kind="sampled_gap"`` only. See
    :func:`margin_from_stats` for the kinds.
    """
    if kind == "sampled_gap" and tokens is None:
        raise ValueError("kind='sampled_gap' needs the sampled tokens: pass tokens=[B, T].")
    check_logits_pair(student_logits, teacher_logits, tokens, k)
    if tokens is None:
        tokens = jnp.zeros(student_logits.shape[:2], jnp.int32)
    stats = stats_from_logits(student_logits, teacher_logits, tokens, k)
    return margin_from_stats(stats, kind, renormalize=renormalize)


def sampled_advantage(stats: TokenStats) -> jax.Array:
    """Per-token OPD advantage ``A = q[y] - s[y]``, ``[B, T]``."""
    return stats.teacher_logp - stats.student_logp


def topk_entropy(stats: TokenStats, k: int | None = None) -> jax.Array:
    """Student entropy renormalised over its top-``k``, divided by ``log k``, ``[B, T]``.

    In [0, 1]; 0 when k = 1.
    """
    k = _first_k(stats, k)
    if k == 1:
        return jnp.zeros_like(stats.student_logp)
    logp_BxTxK = jax.nn.log_softmax(stats.student_topk_logp[..., :k], axis=-1)
    return -(jnp.exp(logp_BxTxK) * logp_BxTxK).sum(-1) / jnp.log(k)


def teacher_mass(stats: TokenStats, k: int | None = None) -> jax.Array:
    """TA-OPD's compatibility ``C = sum over S_t of exp(q)``, ``[B, T]``."""
    return margin_from_stats(stats, "teacher_mass", k=k)


def union_forward_kl(stats: TokenStats) -> jax.Array:
    """TA-OPD's divergence ``D``, ``[B, T]``.

    ``KL(teacher || student)`` on ``U_t`` = union of the student's and the teacher's top-K
    ids, with both distributions renormalised over ``U_t`` (shared ids counted once).
    """
    shared_BxTxK = (
        stats.teacher_topk_ids[..., :, None] == stats.student_topk_ids[..., None, :]
    ).any(-1)
    q_BxTx2K = jnp.concatenate(
        [stats.teacher_at_student_topk, jnp.where(shared_BxTxK, -jnp.inf, stats.teacher_topk_logp)],
        axis=-1,
    )
    s_BxTx2K = jnp.concatenate(
        [stats.student_topk_logp, jnp.where(shared_BxTxK, -jnp.inf, stats.student_at_teacher_topk)],
        axis=-1,
    )
    q_BxTx2K = jax.nn.log_softmax(q_BxTx2K, axis=-1)
    s_BxTx2K = jax.nn.log_softmax(s_BxTx2K, axis=-1)
    in_union = jnp.isfinite(q_BxTx2K)
    terms = jnp.where(
        in_union, jnp.exp(q_BxTx2K) * (q_BxTx2K - jnp.where(in_union, s_BxTx2K, 0)), 0
    )
    return terms.sum(-1)
