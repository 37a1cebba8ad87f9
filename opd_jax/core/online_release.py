"""The release rule decided while a rollout is sampled (docs/method.md §3a).

The offline rule (:mod:`opd_jax.core.release`) reads a finished rollout's sentence means. Online,
after ``n`` complete sentences, a row's cut is *certain* when the BIC test of §3 fires on the
first ``n``, ``n - 1``, ..., ``n - confirm`` sentences alike: each releases, with a gain
``BIC0 - BIC1`` of at least ``min_gain``, at the same sentence ``tau``. The row may then stop
sampling: it has shown its cut and ``confirm`` further sentences after the shortest series
that already placed it there. Everything here reads only the first ``n`` sentences, so on a
rollout sampled to its end, :func:`replay_online` finds where sampling would have stopped.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.core import checks
from opd_jax.core.changepoint import bic_split


class OnlineCut(NamedTuple):
    certain: jax.Array  # [B] bool: the cut is certain after the row's n sentences
    tau: jax.Array  # [B] int32 the cut (sentences kept) on all n sentences; n where none
    gain: jax.Array  # [B] float32 the smallest BIC gain over the confirming series


class OnlineReplay(NamedTuple):
    stopped: jax.Array  # [B] bool: some prefix of the row made its cut certain
    seen: jax.Array  # [B] int32 sentences complete when it became certain (n_b where never)
    tau: jax.Array  # [B] int32 the online cut where stopped, else the offline cut on n_b


def _check_online(confirm: int, min_gain: float) -> None:
    if not isinstance(confirm, int) or confirm < 0:
        raise ValueError(f"confirm must be an integer >= 0, got {confirm!r}.")
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}.")


def online_cut(
    means: jax.Array,
    lengths: jax.Array,
    *,
    confirm: int = 0,
    min_gain: float = 8.0,
    **changepoint: Any,
) -> OnlineCut:
    """Whether each row's cut is certain after its first ``lengths[b]`` sentences.

    Args:
      means: ``[B, N]`` sentence means of the margin (entries past ``lengths`` ignored).
      lengths: ``[B]`` complete sentences ``n_b`` so far.
      confirm: ``m``, the further series ``n - 1 .. n - m`` that must agree.
      min_gain: the smallest ``BIC0 - BIC1`` each of those series must show (> 0 always).
        The defaults (0, 8) are docs/method.md §3a's measured choice.
      **changepoint: options of :func:`~opd_jax.core.changepoint.bic_downward_changepoint`.

    Returns:
      :class:`OnlineCut`.
    """
    checks.require_rank(means, 2, "means", "[B, N]")
    checks.require_rank(lengths, 1, "lengths", "[B]")
    _check_online(confirm, min_gain)
    n_B = lengths.astype(jnp.int32)
    back_J = jnp.arange(confirm + 1, dtype=jnp.int32)
    tau_JxB, released_JxB, gain_JxB = jax.vmap(
        lambda j: bic_split(means, jnp.maximum(n_B - j, 0), **changepoint)
    )(back_J)
    gain_B = gain_JxB.min(0)
    agree_B = (released_JxB & (tau_JxB == tau_JxB[0])).all(0)
    certain_B = agree_B & (gain_B >= min_gain)
    return OnlineCut(certain=certain_B, tau=tau_JxB[0], gain=gain_B)


def first_certain(
    means: jax.Array,
    seen: jax.Array,
    lengths: jax.Array,
    *,
    window: int,
    confirm: int = 0,
    min_gain: float = 8.0,
    **changepoint: Any,
) -> OnlineReplay:
    """The first ``n`` in ``(seen[b], lengths[b]]`` (at most ``window`` of them) at which
    :func:`online_cut` is certain: what a look decides when sentences ``seen + 1 ..
    lengths`` completed since the last one, every count checked as if looked at alone.

    Args:
      means: ``[B, N]``; seen: ``[B]`` sentence counts already checked; lengths: ``[B]``
        complete sentences now; window: static bound on ``lengths - seen``; options as
        :func:`online_cut`.

    Returns:
      :class:`OnlineReplay`: ``stopped``, the first certain ``n`` as ``seen`` (``lengths``
      where none) and its cut ``tau`` (the offline cut on ``lengths`` where none).
    """
    checks.require_rank(means, 2, "means", "[B, N]")
    checks.require_rank(lengths, 1, "lengths", "[B]")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}.")
    n_B = lengths.astype(jnp.int32)
    n_WxB = seen.astype(jnp.int32)[None, :] + jnp.arange(1, window + 1, dtype=jnp.int32)[:, None]
    cuts = jax.vmap(
        lambda n: online_cut(
            means, jnp.minimum(n, n_B), confirm=confirm, min_gain=min_gain, **changepoint
        )
    )(n_WxB)  # [W, B] each
    certain_WxB = cuts.certain & (n_WxB <= n_B[None, :])
    stopped_B = certain_WxB.any(0)
    first_B = jnp.argmax(certain_WxB, axis=0)
    online_tau_B = jnp.take_along_axis(cuts.tau, first_B[None, :], axis=0)[0]
    offline_tau_B, _, _ = bic_split(means, n_B, **changepoint)
    return OnlineReplay(
        stopped=stopped_B,
        seen=jnp.where(stopped_B, n_WxB[first_B, jnp.arange(n_B.shape[0])], n_B).astype(jnp.int32),
        tau=jnp.where(stopped_B, online_tau_B, offline_tau_B).astype(jnp.int32),
    )


def replay_online(
    means: jax.Array,
    lengths: jax.Array,
    *,
    confirm: int = 0,
    min_gain: float = 8.0,
    **changepoint: Any,
) -> OnlineReplay:
    """The online rule replayed on whole rows: the first ``n <= lengths[b]`` at which
    :func:`online_cut` is certain, and its cut; rows never certain keep the offline cut on all
    ``lengths[b]`` sentences (what a row sampled to its end is cut at). Release-aware sampling
    checks every count as it completes (:func:`first_certain`), so this is where it stops.

    Args:
      means: ``[B, N]``; lengths: ``[B]`` all sentences of each row; options as
        :func:`online_cut`.

    Returns:
      :class:`OnlineReplay`.
    """
    checks.require_rank(means, 2, "means", "[B, N]")
    seen = jnp.zeros(means.shape[:1], jnp.int32)
    return first_certain(
        means, seen, lengths, window=max(means.shape[1], 1), confirm=confirm,
        min_gain=min_gain, **changepoint,
    )  # fmt: skip


def online_options() -> dict[str, Any]:
    """The online rule's own options and their defaults (beside the change point's): the
    keyword-only parameters of :func:`online_cut` that are not the change point's."""
    params = inspect.signature(online_cut).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
