"""The OPD objective of one batch: score -> rule -> loss, with the step's diagnostics.

::

    settings = core.ObjectiveSettings(rule="release", loss="sampled_reverse_kl", k=16)
    loss, aux = core.opd_objective(h_s, W_s, h_t, W_t, tokens, response_mask, seg, key, settings)
    aux.weights          # [B, T] the rule's loss weights
    aux.diagnostics      # scalars and [bins] profiles (docs/method.md §7)

:func:`objective_from_scores` is the part after scoring, for callers that score themselves.
Differentiate ``loss`` with respect to the student's hidden states and unembedding (e.g.
``jax.value_and_grad(..., has_aux=True)`` through the student's forward pass); the teacher is
never differentiated. Scoring is chunked (:func:`~opd_jax.core.scoring.score_chunked`): the
``[B, T, V]`` logits are never formed. The release rule runs once a batch: its margin and cut
feed the diagnostics whatever rule trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.core.diagnostics import kept_fraction, step_diagnostics
from opd_jax.core.losses import reduce_loss
from opd_jax.core.rules import RULES, RuleBatch, apply_rule, release_with_margin, rule_options
from opd_jax.core.scoring import Scored, score_chunked
from opd_jax.core.stats import TokenStats, sampled_advantage
from opd_jax.core.teacher_scores import TeacherScores, score_given_teacher

# The rules whose kept fraction is logged beside the training rule's (deterministic ones).
COMPARED_RULES = ("release", "prefix_fraction", "ta_opd", "entropy", "tip")
# Diagnostics that are counts (they add up over micro-batches); the others are means.
COUNTS = (
    "boundary_histogram",
    "tokens_by_position",
    "rows_by_sentence",
    "kept_tokens",
    "response_token_sum",
)


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """Static settings of :func:`opd_objective` (hashable: a change recompiles).

    Attributes:
      rule: a name of :data:`~opd_jax.core.rules.RULES`.
      rule_options: ``(name, value)`` pairs of the rule's options (:func:`rule_options`).
      loss: a name of :data:`~opd_jax.core.losses.LOSSES`.
      loss_options: ``(name, value)`` pairs of the loss's options (:func:`loss_options`).
      reduction: ``token_mean`` or ``sequence_mean`` (:func:`reduce_loss`).
      k: the student's and teacher's top-K kept per position.
      chunk_size: positions whose ``[chunk, V]`` logits are alive at once.
      bins: relative-position bins of the profiles.
      segment_bins: sentence indices of the per-sentence profiles.
      compared_rules: rules whose kept fraction on the same batch is logged.
    """

    rule: str = "release"
    rule_options: tuple[tuple[str, Any], ...] = ()
    loss: str = "sampled_reverse_kl"
    loss_options: tuple[tuple[str, Any], ...] = ()
    reduction: str = "token_mean"
    k: int = 16
    chunk_size: int = 1024
    bins: int = 20
    segment_bins: int = 16
    compared_rules: tuple[str, ...] = COMPARED_RULES


class ObjectiveAux(NamedTuple):
    """What :func:`opd_objective` computed on the way to the loss."""

    weights: jax.Array  # [B, T] float32 loss weights of the rule
    token_loss: jax.Array  # [B, T] per-token loss terms
    stats: TokenStats  # K-sized statistics, [B, T, K]
    diagnostics: dict[str, jax.Array]  # scalars and [bins] profiles


def _capped_defaults(rule: str, k: int) -> dict[str, Any]:
    """A rule's top-K options (``k``, ``margin_k``) at their defaults, capped at the scored
    ``k``: a rule left at its defaults runs whatever ``k`` the batch was scored with."""
    return {
        name: min(value, k)
        for name, value in rule_options(rule).items()
        if name in ("k", "margin_k")
    }


def opd_objective(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array,
    teacher_unembed: jax.Array,
    tokens: jax.Array,
    response_mask: jax.Array,
    seg: jax.Array,
    key: jax.Array | None,
    settings: ObjectiveSettings = ObjectiveSettings(),
    cut: jax.Array | None = None,
) -> tuple[jax.Array, ObjectiveAux]:
    """The OPD loss of a batch and its diagnostics: :func:`score_chunked`, then
    :func:`objective_from_scores`.

    Args:
      student_hidden: ``[B, T, Ds]`` final-norm hidden states; position t predicts tokens[t].
      student_unembed: ``[Ds, V]``.
      teacher_hidden, teacher_unembed: ``[B, T, Dt]``, ``[Dt, V]`` (never differentiated).
      tokens: ``[B, T]`` the sampled response tokens.
      response_mask: ``[B, T]`` 1 on real response tokens (EOS included).
      seg: ``[B, T]`` segment ids from the host (-1 off the response).
      key: a PRNG key (the ``random`` rule's), or None.
      settings: :class:`ObjectiveSettings`.
      cut: int32 ``[B]`` each row's cut for the rules of
        :data:`~opd_jax.core.rules.CUT_RULES` (-1: none); None for the others.

    Returns:
      ``(loss, aux)`` as :func:`objective_from_scores` returns them.
    """
    s = settings
    scored = score_chunked(
        student_hidden,
        student_unembed,
        teacher_hidden,
        teacher_unembed,
        tokens,
        k=s.k,
        loss_kind=s.loss,
        loss_options=dict(s.loss_options),
        chunk_size=s.chunk_size,
    )
    return objective_from_scores(scored, response_mask, seg, key, settings, cut)


def opd_objective_given_teacher(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher: TeacherScores,
    tokens: jax.Array,
    response_mask: jax.Array,
    seg: jax.Array,
    key: jax.Array | None,
    settings: ObjectiveSettings = ObjectiveSettings(),
    cut: jax.Array | None = None,
) -> tuple[jax.Array, ObjectiveAux]:
    """:func:`opd_objective` with the teacher's scores given (:class:`TeacherScores` kept from
    sampling) instead of its hidden states: :func:`score_given_teacher`, then
    :func:`objective_from_scores`. ``settings.loss`` must read only ``q[y]``
    (:data:`~opd_jax.core.losses.SAMPLED_TOKEN_LOSSES`)."""
    s = settings
    scored = score_given_teacher(
        student_hidden,
        student_unembed,
        teacher,
        tokens,
        loss_kind=s.loss,
        loss_options=dict(s.loss_options),
        chunk_size=s.chunk_size,
    )
    return objective_from_scores(scored, response_mask, seg, key, settings, cut)


def objective_from_scores(
    scored: Scored,
    response_mask: jax.Array,
    seg: jax.Array,
    key: jax.Array | None,
    settings: ObjectiveSettings = ObjectiveSettings(),
    cut: jax.Array | None = None,
) -> tuple[jax.Array, ObjectiveAux]:
    """The rule, the loss and the diagnostics of a scored batch (``[B, T]`` inputs; ``cut
    [B]`` as :func:`opd_objective` takes it).

    Returns:
      ``(loss, aux)``: the scalar loss ``reduce_loss(token_loss, w)`` and
      :class:`ObjectiveAux`. Diagnostics: ``margin_by_position``, ``advantage_by_position``,
      ``tokens_by_position``, ``boundary_histogram`` ``[bins]``; ``margin_by_sentence``,
      ``advantage_by_sentence``, ``rows_by_sentence`` ``[segment_bins]``; ``kept_fraction``,
      ``released_fraction``, ``margin_mean``, ``advantage_mean``, ``response_tokens``,
      ``kept_tokens`` (tokens of weight > 0), ``response_token_sum`` and
      ``kept/<rule>`` for each compared rule (scalars). The margin and the cut are the
      release rule's, with the training rule's options when it is ``release``.
    """
    s = settings
    batch = RuleBatch(scored.stats, response_mask, seg, cut)
    options = _capped_defaults(s.rule, s.k) | dict(s.rule_options)
    training_release = s.rule == "release"
    release_options = options if training_release else _capped_defaults("release", s.k)
    margin, cut = release_with_margin(batch, **release_options)
    w = cut.w if training_release else apply_rule(s.rule, batch, key, options)
    loss = reduce_loss(scored.token_loss, w, s.reduction)

    advantage = sampled_advantage(scored.stats)
    diagnostics = step_diagnostics(
        margin, advantage, response_mask, seg, w, cut, s.bins, s.segment_bins
    )
    r = response_mask.astype(bool)
    n = jnp.maximum(r.sum(), 1)
    diagnostics["advantage_mean"] = jnp.where(r, advantage, 0).sum() / n
    diagnostics["margin_mean"] = jnp.where(r, margin, 0).sum() / n
    diagnostics["response_tokens"] = r.sum(-1).mean()
    diagnostics["kept_tokens"] = (r & (w > 0)).sum()
    diagnostics["response_token_sum"] = r.sum()
    for name in s.compared_rules:
        if name == s.rule:
            kept = w
        elif name == "release":
            kept = cut.w
        else:
            kept = RULES[name](batch, None, **_capped_defaults(name, s.k))
        diagnostics[f"kept/{name}"] = kept_fraction(kept, response_mask)
    return loss, ObjectiveAux(w, scored.token_loss, scored.stats, diagnostics)
