"""The release rule: truncate dense OPD supervision at the margin's change point.

Segment means of the per-position margin (docs/method.md §2), one downward BIC change point
per row (§3), and the loss mask that keeps only the prefix before it (§4).
The rollout is scored in full; only the loss is truncated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.core import checks
from opd_jax.core.changepoint import bic_downward_changepoint
from opd_jax.core.segments import segment_means


class Release(NamedTuple):
    w: jax.Array  # [B, T] float32 loss weights
    tau: jax.Array  # [B] int32 segments kept (n_b where not released)
    released: jax.Array  # [B] bool
    boundary: jax.Array  # [B] int32 t*, the first released position (T where not released)


def find_release(
    margin: jax.Array,
    seg: jax.Array,
    response_mask: jax.Array,
    *,
    num_segments: int | None = None,
    **changepoint: Any,
) -> Release:
    """The release rule on a margin: where each row is cut, and the loss weights.

    Args:
      margin: ``[B, T]`` per-position teacher margin.
      seg: ``[B, T]`` segment ids (-1 off the response).
      response_mask: ``[B, T]`` 1 on response tokens.
      num_segments: static bound on segments per row (default T).
      **changepoint: options of :func:`~opd_jax.core.changepoint.bic_downward_changepoint`.

    Returns:
      :class:`Release` with ``w = r * [t < t*]`` for released rows and ``w = r`` otherwise,
      ``t*`` being the first token of segment ``tau``.
    """
    checks.require_rank(margin, 2, "margin", "[B, T]")
    length = margin.shape[1]
    means, _, lengths = segment_means(margin, seg, response_mask, num_segments or length)
    tau, released = bic_downward_changepoint(means, lengths, **changepoint)
    r = response_mask.astype(bool)
    t = jnp.arange(length, dtype=jnp.int32)
    first = jnp.where(r & (seg == tau[:, None]), t, length).min(axis=-1)
    boundary = jnp.where(released, first, length).astype(jnp.int32)
    w = (r & (t < boundary[:, None])).astype(jnp.float32)
    return Release(w=w, tau=tau, released=released, boundary=boundary)
