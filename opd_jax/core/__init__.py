"""The pure functional core of opd_jax: ``jax.numpy`` only, no Flax, no I/O.

The OPD objective (:func:`opd_objective`) and its parts: scoring (K-sized statistics and loss
terms, chunked over positions), margins, segment means, the BIC downward change point, the
release rule and its baselines, losses and diagnostics. Every function is jit-compatible and
batched over ``[B, T]`` without ``vmap``; the maths is specified in docs/method.md.
"""

from opd_jax.core.changepoint import bic_downward_changepoint, bic_split, changepoint_options
from opd_jax.core.diagnostics import (
    boundary_histogram,
    kept_fraction,
    position_profile,
    segment_profile,
    step_diagnostics,
)
from opd_jax.core.losses import (
    LOSSES,
    REDUCTIONS,
    SAMPLED_TOKEN_LOSSES,
    apply_loss,
    check_loss,
    loss_options,
    reduce_loss,
    token_loss,
)
from opd_jax.core.objective import (
    COMPARED_RULES,
    COUNTS,
    ObjectiveAux,
    ObjectiveSettings,
    objective_from_scores,
    opd_objective,
    opd_objective_given_teacher,
)
from opd_jax.core.online_release import (
    OnlineCut,
    OnlineReplay,
    first_certain,
    online_cut,
    online_options,
    replay_online,
)
from opd_jax.core.release import Release, find_release
from opd_jax.core.rules import (
    RULES,
    RuleBatch,
    apply_rule,
    release_with_margin,
    rule_options,
    select_top,
)
from opd_jax.core.scoring import Scored, score_chunked, token_logprobs_chunked
from opd_jax.core.segments import fixed_segments, response_index, segment_means, token_segments
from opd_jax.core.stats import (
    MARGIN_KINDS,
    TokenStats,
    margin_from_stats,
    sampled_advantage,
    teacher_mass,
    token_stats,
    topk_entropy,
    topk_margin,
    union_forward_kl,
)
from opd_jax.core.teacher_scores import (
    TEACHER_HIDDEN,
    TeacherScores,
    score_given_teacher,
    teacher_scores_from_logits,
)

__all__ = [
    "COMPARED_RULES",
    "COUNTS",
    "LOSSES",
    "SAMPLED_TOKEN_LOSSES",
    "MARGIN_KINDS",
    "ObjectiveAux",
    "ObjectiveSettings",
    "REDUCTIONS",
    "RULES",
    "Release",
    "RuleBatch",
    "Scored",
    "TokenStats",
    "apply_loss",
    "apply_rule",
    "bic_downward_changepoint",
    "bic_split",
    "changepoint_options",
    "check_loss",
    "find_release",
    "OnlineCut",
    "OnlineReplay",
    "first_certain",
    "online_cut",
    "online_options",
    "replay_online",
    "boundary_histogram",
    "fixed_segments",
    "kept_fraction",
    "loss_options",
    "margin_from_stats",
    "objective_from_scores",
    "opd_objective",
    "opd_objective_given_teacher",
    "position_profile",
    "reduce_loss",
    "release_with_margin",
    "response_index",
    "rule_options",
    "sampled_advantage",
    "score_chunked",
    "score_given_teacher",
    "TEACHER_HIDDEN",
    "TeacherScores",
    "teacher_scores_from_logits",
    "segment_means",
    "segment_profile",
    "select_top",
    "step_diagnostics",
    "teacher_mass",
    "token_logprobs_chunked",
    "token_loss",
    "token_segments",
    "token_stats",
    "topk_entropy",
    "topk_margin",
    "union_forward_kl",
]
