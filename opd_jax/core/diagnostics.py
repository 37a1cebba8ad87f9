"""Per-step diagnostics of docs/method.md §7, as fixed-size arrays (cheap to log).

They reproduce the paper's central picture: the advantage stays non-zero late in the
rollout while the teacher's margin over the student's candidates collapses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.core.release import Release
from opd_jax.core.segments import response_index, segment_means


def relative_bin(response_mask: jax.Array, bins: int) -> jax.Array:
    """``[B, T]`` bin ``floor(bins * index / L_b)`` of each response token; -1 off it."""
    idx = response_index(response_mask)
    length = jnp.maximum(response_mask.astype(bool).sum(-1, keepdims=True), 1)
    return jnp.where(idx >= 0, (bins * idx) // length, -1)


def position_profile(
    values: jax.Array, response_mask: jax.Array, bins: int = 20
) -> tuple[jax.Array, jax.Array]:
    """Mean of ``values [B, T]`` over response tokens binned by relative position ``t / L_b``.

    Returns ``means [bins]`` (0 for empty bins) and ``counts [bins]``.
    """
    b = relative_bin(response_mask, bins).ravel()
    sums = jax.ops.segment_sum(jnp.where(b >= 0, values.ravel(), 0).astype(jnp.float32), b, bins)
    counts = jax.ops.segment_sum((b >= 0).astype(jnp.float32), b, bins)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0), counts


def segment_profile(
    values: jax.Array, seg: jax.Array, response_mask: jax.Array, num_segments: int = 16
) -> tuple[jax.Array, jax.Array]:
    """Mean over rows of each segment's mean of ``values [B, T]``, by segment index.

    The per-sentence series the change point reads (:func:`segment_means`), averaged over the
    rows that reach each index. Returns ``means [num_segments]`` (0 where no row reaches the
    index) and ``rows [num_segments]``; segments past ``num_segments`` are left out.
    """
    means_BxS, counts_BxS, _ = segment_means(values, seg, response_mask, num_segments)
    present_BxS = counts_BxS > 0
    rows_S = present_BxS.sum(0).astype(jnp.float32)
    sums_S = jnp.where(present_BxS, means_BxS, 0.0).sum(0)
    return jnp.where(rows_S > 0, sums_S / jnp.maximum(rows_S, 1.0), 0.0), rows_S


def kept_fraction(w: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Fraction of the batch's response tokens with ``w > 0``."""
    r = response_mask.astype(bool)
    return ((w > 0) & r).sum() / jnp.maximum(r.sum(), 1)


def boundary_histogram(result: Release, response_mask: jax.Array, bins: int = 20) -> jax.Array:
    """Counts ``[bins]`` of ``t* / L_b`` (kept response tokens over L_b) over released rows."""
    r = response_mask.astype(bool)
    kept = (r & (result.w > 0)).sum(-1)
    rel = kept / jnp.maximum(r.sum(-1), 1)
    b = jnp.where(result.released, jnp.clip(jnp.floor(rel * bins), 0, bins - 1), -1).astype(
        jnp.int32
    )
    return jax.ops.segment_sum(result.released.astype(jnp.float32), b, bins)


def step_diagnostics(
    margin: jax.Array,
    advantage: jax.Array,
    response_mask: jax.Array,
    seg: jax.Array,
    w: jax.Array,
    result: Release,
    bins: int = 20,
    segment_bins: int = 16,
) -> dict[str, jax.Array]:
    """All §7 diagnostics of one batch: profiles by relative position (``bins``) and by
    sentence index (``segment_bins``), kept and released fractions, and the boundary
    histogram. Inputs ``[B, T]`` plus the release rule's :class:`Release`."""
    margin_profile, counts = position_profile(margin, response_mask, bins)
    advantage_profile, _ = position_profile(advantage, response_mask, bins)
    margin_by_segment, rows = segment_profile(margin, seg, response_mask, segment_bins)
    advantage_by_segment, _ = segment_profile(advantage, seg, response_mask, segment_bins)
    return {
        "margin_by_position": margin_profile,
        "advantage_by_position": advantage_profile,
        "tokens_by_position": counts,
        "margin_by_sentence": margin_by_segment,
        "advantage_by_sentence": advantage_by_segment,
        "rows_by_sentence": rows,
        "kept_fraction": kept_fraction(w, response_mask),
        "released_fraction": result.released.mean(),
        "boundary_histogram": boundary_histogram(result, response_mask, bins),
    }
