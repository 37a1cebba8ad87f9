"""BIC test for one downward change point in each row of a padded series (docs/method.md §3).

For a series ``M_1..M_n`` and a split after ``tau`` segments (``l <= tau <= n - l``)::

    RSS0       = sum_j (M_j - mean M)^2
    RSS1(tau)  = within-prefix + within-suffix squared deviations
    BIC0       = n log(RSS0 / n + eps) + k0 * penalty * log n
    BIC1(tau)  = n log(RSS1(tau) / n + eps) + k1 * penalty * log n

A split is admissible when the prefix mean exceeds the suffix mean (downward only) and, if
``min_drop_std > 0``, the drop is at least ``min_drop_std * std(M)`` (population std). The
row is released iff the best admissible split (earliest on ties) has ``BIC1 < BIC0``.
All splits of all rows come from prefix sums of the centred series in one pass.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax.core import checks


def _check_options(
    min_segments: int, k0: float, k1: float, penalty: float, min_drop_std: float, eps: float
) -> None:
    if not isinstance(min_segments, int) or min_segments < 1:
        raise ValueError(f"min_segments must be an integer >= 1, got {min_segments!r}.")
    for name, value in (
        ("penalty", penalty),
        ("min_drop_std", min_drop_std),
        ("eps", eps),
        ("k0", k0),
        ("k1", k1),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")


def bic_split(
    series: jax.Array,
    lengths: jax.Array,
    *,
    min_segments: int = 2,
    k0: float = 1.0,
    k1: float = 3.0,
    penalty: float = 1.0,
    min_drop_std: float = 0.0,
    eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`bic_downward_changepoint` with each row's BIC gain.

    Args:
      series: ``[B, N]`` padded series; entries at or past ``lengths[b]`` are ignored.
      lengths: ``[B]`` number of valid entries n_b.
      min_segments: l, the fewest segments on each side; rows with n_b < 2 l never release.
      k0, k1, penalty, min_drop_std, eps: as in the module docstring.

    Returns:
      ``tau [B] int32`` (segments in the kept prefix; ``n_b`` where not released),
      ``released [B] bool`` and ``gain [B] float32``: ``BIC0 - BIC1`` of the best admissible
      split (``-inf`` where none is admissible; released iff ``gain > 0``).
    """
    checks.require_rank(series, 2, "series", "[B, N]")
    checks.require_rank(lengths, 1, "lengths", "[B]")
    if lengths.shape[0] != series.shape[0]:
        raise ValueError(f"lengths {lengths.shape} must be [B] for series {series.shape}.")
    _check_options(min_segments, k0, k1, penalty, min_drop_std, eps)
    x_BxN = series.astype(jnp.float32)
    n_B = jnp.clip(lengths.astype(jnp.int32), 0, x_BxN.shape[1])
    valid_BxN = jnp.arange(x_BxN.shape[1]) < n_B[:, None]
    n = jnp.maximum(n_B, 1).astype(jnp.float32)[:, None]  # [B, 1]
    x_BxN = jnp.where(valid_BxN, x_BxN, 0.0)
    # Centring first keeps the prefix-sum differences well conditioned in float32.
    x_BxN = jnp.where(valid_BxN, x_BxN - x_BxN.sum(-1, keepdims=True) / n, 0.0)
    c1_BxN = jnp.cumsum(x_BxN, axis=-1)  # sum of the first tau = j + 1 entries
    c2_BxN = jnp.cumsum(x_BxN * x_BxN, axis=-1)
    total1 = c1_BxN[:, -1:]
    rss0 = c2_BxN[:, -1:]
    n_pre = jnp.arange(1, x_BxN.shape[1] + 1, dtype=jnp.float32)[None, :]
    n_post = n - n_pre
    mu_pre = c1_BxN / n_pre
    mu_post = (total1 - c1_BxN) / jnp.maximum(n_post, 1.0)
    rss_pre = jnp.maximum(c2_BxN - c1_BxN * mu_pre, 0.0)
    rss_post = jnp.maximum((rss0 - c2_BxN) - (total1 - c1_BxN) * mu_post, 0.0)
    rss1 = rss_pre + rss_post
    admissible = (n_pre >= min_segments) & (n_post >= min_segments) & (mu_pre > mu_post)
    if min_drop_std > 0:
        admissible &= mu_pre - mu_post >= min_drop_std * jnp.sqrt(rss0 / n)
    log_n = jnp.log(n)
    bic0 = n * jnp.log(rss0 / n + eps) + k0 * penalty * log_n
    bic1 = jnp.where(admissible, n * jnp.log(rss1 / n + eps) + k1 * penalty * log_n, jnp.inf)
    best = jnp.argmin(bic1, axis=-1)
    gain = bic0[:, 0] - jnp.take_along_axis(bic1, best[:, None], axis=-1)[:, 0]
    released = gain > 0
    tau = jnp.where(released, best + 1, n_B).astype(jnp.int32)
    return tau, released, gain


def bic_downward_changepoint(
    series: jax.Array, lengths: jax.Array, **options: Any
) -> tuple[jax.Array, jax.Array]:
    """Finds one downward change point per row.

    Args:
      series: ``[B, N]`` padded series; entries at or past ``lengths[b]`` are ignored.
      lengths: ``[B]`` number of valid entries n_b.
      **options: those of :func:`bic_split` (:func:`changepoint_options`): ``min_segments``
        (l, the fewest segments on each side; rows with n_b < 2 l never release), ``k0``,
        ``k1``, ``penalty``, ``min_drop_std``, ``eps`` as in the module docstring.

    Returns:
      ``tau [B] int32`` (segments in the kept prefix; ``n_b`` where not released) and
      ``released [B] bool``.
    """
    tau, released, _ = bic_split(series, lengths, **options)
    return tau, released


def changepoint_options() -> dict[str, Any]:
    """The change point's options and their defaults: the keyword-only parameters of
    :func:`bic_split`, which the release rule passes on unchanged."""
    params = inspect.signature(bic_split).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
