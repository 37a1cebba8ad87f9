"""Rules: which response tokens receive the OPD loss, and with what weight (docs/method.md §6).

Every rule reads the same scored batch and returns weights ``w [B, T]`` (0 off the
response)::

    w = RULES[name](batch, key, **options)

``batch`` is a :class:`RuleBatch`; ``key`` a PRNG key (only ``random`` uses it). The rules of
:data:`CUT_RULES` also read ``batch.cut``, a per-row token index the host finds in the decoded
text (the batch carries it only for them). Use
:func:`apply_rule` to call a rule by name with options from a config: it names the nearest
valid rule or option on a typo.

Ratio rules (``ta_opd``, ``entropy``, ``tip``, ``random``) score every token and keep the
batch-global top ``ceil(ratio * N_valid)`` (ties: earliest in row-major order), plus each
non-empty row's best token so that every response keeps at least one. Counts ``ceil(x)`` are
computed as ``ceil(x - 1e-3)`` so that float rounding never adds a token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.core import checks
from opd_jax.core.changepoint import changepoint_options
from opd_jax.core.registry import check_options, keyword_options
from opd_jax.core.release import Release, find_release
from opd_jax.core.segments import response_index
from opd_jax.core.stats import (
    TokenStats,
    margin_from_stats,
    sampled_advantage,
    teacher_mass,
    topk_entropy,
    union_forward_kl,
)

_CEIL_SLACK = 1e-3


class RuleBatch(NamedTuple):
    """What every rule sees: statistics, the response mask and the segment ids, ``[B, T]``;
    for :data:`CUT_RULES` also ``cut``, int32 ``[B]``: each row's cut as a 0-based index into
    its response tokens (-1: none)."""

    stats: TokenStats
    response_mask: jax.Array
    seg: jax.Array
    cut: jax.Array | None = None


Rule = Callable[..., jax.Array]


def _mask(batch: RuleBatch) -> jax.Array:
    return batch.response_mask.astype(bool)


def _ceil_count(x: jax.Array) -> jax.Array:
    return jnp.ceil(x - _CEIL_SLACK).astype(jnp.int32)


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}.")


def select_top(score: jax.Array, valid: jax.Array, ratio: float) -> jax.Array:
    """Batch-global top ``ratio`` of the valid tokens by ``score`` plus each row's best.

    Args:
      score: ``[B, T]`` finite scores.
      valid: ``[B, T]`` bool, the candidate tokens.
      ratio: fraction of the valid tokens to keep.

    Returns:
      ``[B, T]`` float32 0/1 weights.
    """
    _check_ratio(ratio)
    neg = jnp.where(valid, -score.astype(jnp.float32), jnp.inf).ravel()
    order = jnp.argsort(neg, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    n_keep = _ceil_count(ratio * valid.sum())
    keep = (rank.reshape(score.shape) < n_keep) & valid
    best = jnp.argmax(jnp.where(valid, score, -jnp.inf), axis=-1)
    row_best = jax.nn.one_hot(best, score.shape[1], dtype=bool) & valid.any(-1, keepdims=True)
    return (keep | row_best).astype(jnp.float32)


def percentile_normalise(x: jax.Array, valid: jax.Array) -> jax.Array:
    """``clip((x - p5) / (p95 - p5), 0, 1)`` with percentiles over the valid tokens.

    Percentiles interpolate linearly (NumPy's default); 0 where ``p95 == p5``.
    """
    p5, p95 = jnp.nanpercentile(jnp.where(valid, x, jnp.nan), jnp.array([5.0, 95.0]))
    spread = p95 - p5
    scaled = jnp.clip((x - p5) / jnp.where(spread > 0, spread, 1.0), 0.0, 1.0)
    return jnp.where(spread > 0, scaled, 0.0)


def full(batch: RuleBatch, key: jax.Array | None = None) -> jax.Array:
    """Dense OPD: every response token, ``w = r``."""
    return _mask(batch).astype(jnp.float32)


def release_with_margin(
    batch: RuleBatch,
    *,
    margin_kind: str = "gap",
    margin_k: int = 16,
    renormalize: bool = False,
    **changepoint: Any,
) -> tuple[jax.Array, Release]:
    """The release rule with what it decided on: the margin ``[B, T]`` and the
    :class:`~opd_jax.core.release.Release` (weights, cut segment, boundary).

    ``margin_*`` choose the margin (:func:`~opd_jax.core.stats.margin_from_stats`);
    ``changepoint`` holds the options of
    :func:`~opd_jax.core.changepoint.bic_downward_changepoint`.
    """
    margin = margin_from_stats(batch.stats, margin_kind, k=margin_k, renormalize=renormalize)
    return margin, find_release(margin, batch.seg, batch.response_mask, **changepoint)


def release(batch: RuleBatch, key: jax.Array | None = None, **options: Any) -> jax.Array:
    """The paper's release rule: margin -> segment means -> BIC change point -> prefix.

    Options: those of :func:`release_with_margin` (see :func:`rule_options`).
    """
    return release_with_margin(batch, **options)[1].w


def prefix_fraction(
    batch: RuleBatch, key: jax.Array | None = None, *, rho: float = 0.5
) -> jax.Array:
    """The first ``ceil(rho * L_b)`` response tokens of each row."""
    _check_ratio(rho)
    idx = response_index(batch.response_mask)
    n_keep = _ceil_count(rho * _mask(batch).sum(-1, keepdims=True))
    return ((idx >= 0) & (idx < n_keep)).astype(jnp.float32)


def prefix_tokens(batch: RuleBatch, key: jax.Array | None = None, *, n: int = 100) -> jax.Array:
    """The first ``n`` response tokens of each row (as in Early Stopping Rollout)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    idx = response_index(batch.response_mask)
    return ((idx >= 0) & (idx < n)).astype(jnp.float32)


def _normalised_divergence(batch: RuleBatch) -> jax.Array:
    return percentile_normalise(union_forward_kl(batch.stats), _mask(batch))


def ta_opd(
    batch: RuleBatch, key: jax.Array | None = None, *, ratio: float = 0.05, k: int = 16
) -> jax.Array:
    """TA-OPD (arXiv 2605.26844): top tokens by normalised ``D * C``."""
    valid = _mask(batch)
    c = percentile_normalise(teacher_mass(batch.stats, k), valid)
    return select_top(_normalised_divergence(batch) * c, valid, ratio)


def entropy(
    batch: RuleBatch, key: jax.Array | None = None, *, ratio: float = 0.05, k: int = 16
) -> jax.Array:
    """Top tokens by the student's top-``k`` entropy (normalised by ``log k``)."""
    return select_top(topk_entropy(batch.stats, k), _mask(batch), ratio)


def tip(
    batch: RuleBatch, key: jax.Array | None = None, *, ratio: float = 0.05, k: int = 16
) -> jax.Array:
    """Top tokens by ``H + D - H D`` of normalised entropy H and divergence D."""
    h = topk_entropy(batch.stats, k)
    d = _normalised_divergence(batch)
    return select_top(h + d - h * d, _mask(batch), ratio)


def iw_opd(batch: RuleBatch, key: jax.Array | None = None, *, gamma: float = 0.5) -> jax.Array:
    """IW-OPD (arXiv 2606.22600): soft ``w_t = 1 + gamma (1 - C_<t / C_total)``.

    ``C`` accumulates ``|A|`` over the response; the fraction is 0 where ``C_total = 0``.
    """
    r = _mask(batch)
    a = jnp.where(r, jnp.abs(sampled_advantage(batch.stats)), 0.0)
    before = jnp.cumsum(a, axis=-1) - a
    total = a.sum(-1, keepdims=True)
    frac = jnp.where(total > 0, before / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.where(r, 1.0 + gamma * (1.0 - frac), 0.0)


def random(batch: RuleBatch, key: jax.Array | None = None, *, ratio: float = 0.05) -> jax.Array:
    """Uniformly random tokens, seeded by ``key``, selected like the other ratio rules."""
    if key is None:
        raise ValueError("the 'random' rule needs a PRNG key: pass key=jax.random.key(seed).")
    score = jax.random.uniform(key, batch.response_mask.shape)
    return select_top(score, _mask(batch), ratio)


def oracle(batch: RuleBatch, key: jax.Array | None = None) -> jax.Array:
    """The response tokens before each row's ``batch.cut`` (the first token after the graded
    answer sentence, found on the host: :func:`opd_jax.text_segments.answer_cuts`); every
    response token of a row whose cut is -1 (no answer sentence)."""
    if batch.cut is None:
        raise ValueError(
            "the 'oracle' rule needs each row's cut: pass RuleBatch(..., cut=int32 [B])."
        )
    idx = response_index(batch.response_mask)
    cut = batch.cut.astype(jnp.int32)[:, None]
    return ((idx >= 0) & ((cut < 0) | (idx < cut))).astype(jnp.float32)


RULES: dict[str, Rule] = {
    "release": release,
    "full": full,
    "prefix_fraction": prefix_fraction,
    "prefix_tokens": prefix_tokens,
    "ta_opd": ta_opd,
    "entropy": entropy,
    "tip": tip,
    "iw_opd": iw_opd,
    "random": random,
    "oracle": oracle,
}
CUT_RULES = ("oracle",)  # the rules that read RuleBatch.cut


def rule_options(name: str) -> dict[str, Any]:
    """The options of rule ``name`` with their defaults (``release``: the margin's and the
    change point's)."""
    checks.require_choice(name, RULES, "rule")
    if name == "release":
        return keyword_options(release_with_margin) | changepoint_options()
    return keyword_options(RULES[name])


def apply_rule(
    name: str,
    batch: RuleBatch,
    key: jax.Array | None = None,
    options: Mapping[str, Any] | None = None,
) -> jax.Array:
    """``RULES[name](batch, key, **options)`` with clear errors for unknown names or options."""
    options = check_options(options, rule_options(name), f"rule {name!r}")
    return RULES[name](batch, key, **options)
