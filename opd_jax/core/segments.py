"""Segment ids and segment means on the device (docs/method.md §2).

A segment map ``seg[B, T]`` holds, for each response token, its segment 0..n_b-1
(non-decreasing along the response) and -1 off the response. Sentence segments come from the
host (:mod:`opd_jax.text_segments`); fixed-size and per-token segments are built here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.core import checks


def response_index(response_mask: jax.Array) -> jax.Array:
    """``[B, T]`` 0-based index of each response token within its row's response; -1 off it."""
    r = response_mask.astype(bool)
    return jnp.where(r, jnp.cumsum(r, axis=-1, dtype=jnp.int32) - 1, -1)


def fixed_segments(response_mask: jax.Array, size: int) -> jax.Array:
    """Consecutive blocks of ``size`` response tokens: ``seg = index // size``, ``[B, T]``."""
    checks.require_rank(response_mask, 2, "response_mask", "[B, T]")
    if size < 1:
        raise ValueError(f"segment size must be >= 1, got {size}.")
    idx = response_index(response_mask)
    return jnp.where(idx >= 0, idx // size, -1)


def token_segments(response_mask: jax.Array) -> jax.Array:
    """One segment per response token, ``[B, T]``."""
    return fixed_segments(response_mask, 1)


def check_segment_inputs(values: jax.Array, seg: jax.Array, response_mask: jax.Array) -> None:
    checks.require_rank(values, 2, "values", "[B, T]")
    checks.require_same_shape(values, seg, "values", "seg")
    checks.require_same_shape(values, response_mask, "values", "response_mask")
    checks.require_integer(seg, "seg")


def segment_means(
    values: jax.Array, seg: jax.Array, response_mask: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean of ``values`` over the response tokens of each segment.

    Args:
      values: ``[B, T]`` per-token values (e.g. the margin).
      seg: ``[B, T]`` segment ids, -1 off the response.
      response_mask: ``[B, T]`` 1 on response tokens.
      num_segments: N, a static bound on the number of segments of a row (ids >= N are
        ignored).

    Returns:
      ``means [B, N]`` (0 for empty segments), ``counts [B, N]`` (tokens per segment) and
      ``lengths [B]`` = 1 + the largest segment id on the response (0 for an empty row,
      at most N).
    """
    check_segment_inputs(values, seg, response_mask)
    batch, _ = values.shape
    valid = response_mask.astype(bool) & (seg >= 0) & (seg < num_segments)
    flat_ids = jnp.where(valid, jnp.arange(batch)[:, None] * num_segments + seg, -1).ravel()
    total = batch * num_segments
    sums = jax.ops.segment_sum(
        jnp.where(valid, values, 0).astype(jnp.float32).ravel(), flat_ids, total
    )
    counts = jax.ops.segment_sum(valid.astype(jnp.float32).ravel(), flat_ids, total)
    sums = sums.reshape(batch, num_segments)
    counts = counts.reshape(batch, num_segments)
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)
    lengths = jnp.where(valid, seg + 1, 0).max(axis=-1).astype(jnp.int32)
    return means, counts, lengths
