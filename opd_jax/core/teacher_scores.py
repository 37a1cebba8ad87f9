"""Scoring with the teacher's scores given: the update's statistics and loss from the student's
hidden states and K-sized teacher values kept from sampling (no teacher forward pass).

Release-aware sampling (docs/method.md §3a) runs the teacher over every sampled token while
the rows are sampled. For a loss of :data:`~opd_jax.core.losses.SAMPLED_TOKEN_LOSSES` (it
reads the teacher only through ``q[y]``) what it kept there is enough: the update scores the
student alone, chunk by chunk as :func:`~opd_jax.core.scoring.score_chunked` does, and takes the
teacher's side of :class:`~opd_jax.core.stats.TokenStats` from :class:`TeacherScores`. The
student's candidates ``S_t`` are those decoding recorded: the same parameters' top-K, or the
previous step's with ``train.async_rollouts`` (only the diagnostics read them; the loss reads
``s[y]`` and ``q[y]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.core import checks
from opd_jax.core.losses import SAMPLED_TOKEN_LOSSES
from opd_jax.core.scoring import Scored, _from_chunks, _to_chunks
from opd_jax.core.stats import TokenStats, canonical_zeros

TEACHER_HIDDEN = "teacher_hidden"
"""The batch key of the teacher's final hidden states kept from sampling ``[B, N, D]`` (those
that predict each response token): for the other losses the update forms the teacher's logits
from them, with no forward pass (docs/method.md §3a)."""


class TeacherScores(NamedTuple):
    """The teacher's side of :class:`TokenStats` at each position, ``[B, T]`` / ``[B, T, K]``."""

    teacher_logp: jax.Array  # q[y]
    student_topk_ids: jax.Array  # S_t, by descending s (int32)
    teacher_at_student_topk: jax.Array  # q on S_t
    teacher_topk_ids: jax.Array  # the teacher's own top-K (int32)
    teacher_topk_logp: jax.Array  # q on them


def teacher_scores_from_logits(
    student_topk_ids: jax.Array, teacher_logits: jax.Array, tokens: jax.Array
) -> TeacherScores:
    """:class:`TeacherScores` of teacher logits ``[..., V]`` at the sampled ``tokens [...]``
    and the student's candidates ``[..., K]`` (ranked as :func:`stats_from_logits` ranks)."""
    z_t = teacher_logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z_t, axis=-1, keepdims=True)
    q_at = lambda ids: jnp.take_along_axis(z_t, ids, axis=-1) - lse  # noqa: E731
    k = student_topk_ids.shape[-1]
    q_ids = jax.lax.top_k(canonical_zeros(z_t), k)[1]
    return TeacherScores(
        teacher_logp=q_at(tokens.astype(jnp.int32)[..., None])[..., 0],
        student_topk_ids=student_topk_ids.astype(jnp.int32),
        teacher_at_student_topk=q_at(student_topk_ids),
        teacher_topk_ids=q_ids,
        teacher_topk_logp=q_at(q_ids),
    )


def score_given_teacher(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher: TeacherScores,
    tokens: jax.Array,
    *,
    loss_kind: str = "sampled_reverse_kl",
    loss_options: Mapping[str, Any] | None = None,
    chunk_size: int = 1024,
) -> Scored:
    """:func:`~opd_jax.core.scoring.score_chunked` with the teacher's scores given.

    Args:
      student_hidden: ``[B, T, D]`` final-norm hidden states; position t predicts tokens[t].
      student_unembed: ``[D, V]``.
      teacher: :class:`TeacherScores` of the same positions, K = ``student_topk_ids.shape[-1]``.
      tokens: ``[B, T]`` sampled tokens.
      loss_kind, loss_options: a loss of :data:`~opd_jax.core.losses.SAMPLED_TOKEN_LOSSES`.
      chunk_size: rows of ``[chunk_size, V]`` student logits alive at once.

    Returns:
      ``Scored(stats, token_loss)``.
    """
    checks.require_rank(tokens, 2, "tokens", "[B, T]")
    checks.require_rank(student_hidden, 3, "student_hidden", "[B, T, D]")
    checks.require_choice(loss_kind, tuple(SAMPLED_TOKEN_LOSSES), "loss with given teacher scores")
    if teacher.student_topk_ids.shape[:2] != tokens.shape:
        raise ValueError(
            f"teacher scores {teacher.student_topk_ids.shape} must be [B, T, K] with [B, T] = "
            f"tokens {tokens.shape}."
        )
    loss = SAMPLED_TOKEN_LOSSES[loss_kind]
    options = dict(loss_options or {})
    batch_shape = tokens.shape
    rows = batch_shape[0] * batch_shape[1]
    chunk_size = min(chunk_size, rows)
    n_chunks = -(-rows // chunk_size)

    def score_chunk(h_CxD, y_C, t: TeacherScores):
        z_CxV = jnp.dot(h_CxD, student_unembed, preferred_element_type=jnp.float32)
        lse_Cx1 = jax.nn.logsumexp(z_CxV, axis=-1, keepdims=True)
        s_at = lambda ids: jnp.take_along_axis(z_CxV, ids, axis=-1) - lse_Cx1  # noqa: E731
        s_y = s_at(y_C.astype(jnp.int32)[:, None])[:, 0]
        stats = TokenStats(
            tokens=y_C.astype(jnp.int32),
            student_logp=s_y,
            teacher_logp=t.teacher_logp,
            student_topk_ids=t.student_topk_ids,
            student_topk_logp=s_at(t.student_topk_ids),
            teacher_at_student_topk=t.teacher_at_student_topk,
            teacher_topk_ids=t.teacher_topk_ids,
            teacher_topk_logp=t.teacher_topk_logp,
            student_at_teacher_topk=s_at(t.teacher_topk_ids),
        )
        return jax.lax.stop_gradient(stats), loss(s_y, t.teacher_logp, **options)

    if n_chunks > 1:
        score_chunk = jax.checkpoint(score_chunk)
    teacher = jax.lax.stop_gradient(teacher)
    chunks = (
        _to_chunks(student_hidden, n_chunks, chunk_size),
        _to_chunks(tokens, n_chunks, chunk_size),
        TeacherScores(*(_to_chunks(x, n_chunks, chunk_size) for x in teacher)),
    )
    stats, token_loss = jax.lax.map(lambda c: score_chunk(*c), chunks)
    unchunk = lambda x: _from_chunks(x, batch_shape)  # noqa: E731
    return Scored(stats=jax.tree.map(unchunk, stats), token_loss=unchunk(token_loss))
