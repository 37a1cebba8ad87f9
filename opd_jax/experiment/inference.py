"""Seed-level inference: comparisons between training recipes with the training run as unit.

A rule trained with seeds ``s = 1..n`` is evaluated on the same ``P`` problems; ``x_sp`` is
seed ``s``'s accuracy on problem ``p`` (the mean of its ``K`` samples), given per seed as a
``[P]`` vector (``{seed: x_P}``). Seeds, not problems, carry a recipe's error: pooling three
runs' samples per problem treats them as one run and overstates the evidence.

- :func:`paired_seed_test`: for every seed both rules ran, ``d_s = mean_p a_sp - mean_p b_sp``
  (one seed, the same prompts for both); ``d = mean_s d_s``, ``SE = sd_s(d_s) / sqrt(n)``
  (``ddof=1``), ``t = d / SE`` with ``n - 1`` degrees of freedom, two-sided
  ``p = 2 (1 - F_{n-1}(|t|))`` (``scipy.stats.ttest_rel`` on the per-seed accuracies).
- :func:`hierarchical_bootstrap`: a percentile interval for ``d`` that resamples seeds with
  replacement, then problems within each drawn seed, with the same problem indices for both
  rules (paired), so it carries the variation of runs and of problems.
- :func:`pooled_estimate`: one rule's row: mean accuracy, standard error over problems of the
  per-problem accuracy pooled over seeds, and the standard deviation over seeds of ``mean_p x_sp``.

Undefined quantities are None (JSON ``null``) with a ``note`` saying why; nothing raises for
few seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from scipy import stats

PerSeed = Mapping[int, np.ndarray]  # {seed: per-problem accuracy [P]}


@dataclasses.dataclass(frozen=True)
class SeedTest:
    """A paired t-test over seeds of ``a - b`` (fractions, not points)."""

    seeds: tuple[int, ...]  # the seeds both rules ran, in order
    differences: tuple[float, ...]  # d_s per seed
    value: float | None  # mean_s d_s; None when no seed is paired
    stderr: float | None  # sd_s(d_s) / sqrt(n); None when n < 2
    t: float | None  # value / stderr; None when n < 2 or stderr = 0
    df: int | None  # n - 1
    p: float | None  # two-sided, Student's t with df degrees of freedom
    note: str  # why a field is None, else ""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "n": len(self.seeds)}


@dataclasses.dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval."""

    low: float
    high: float
    confidence: float
    resamples: int
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PooledEstimate:
    """One rule's accuracy over its seeds, with both of its spreads."""

    value: float  # mean over seeds and problems
    stderr: float  # over problems, of x_p = mean_s x_sp
    seed_sd: float | None  # sd_s(mean_p x_sp), ddof=1; None when n < 2
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]  # mean_p x_sp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stack(x: PerSeed, seeds: list[int], name: str) -> np.ndarray:
    """``[n, P]`` of ``x``'s vectors for ``seeds``; they must share one length ``P``."""
    rows = [np.asarray(x[s], np.float64) for s in seeds]
    if any(r.ndim != 1 or r.shape != rows[0].shape for r in rows):
        shapes = {s: r.shape for s, r in zip(seeds, rows, strict=True)}
        raise ValueError(f"{name}: need one [P] vector per seed over the same problems: {shapes}")
    return np.stack(rows) if rows else np.zeros((0, 0))


def paired(a: PerSeed, b: PerSeed) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """The seeds in both ``a`` and ``b`` (in ``a``'s order) and their ``[n, P]`` stacks."""
    seeds = [s for s in a if s in b]
    a_SxP, b_SxP = _stack(a, seeds, "a"), _stack(b, seeds, "b")
    if a_SxP.shape != b_SxP.shape:
        raise ValueError(f"paired seeds need the same problems: {a_SxP.shape} vs {b_SxP.shape}")
    return tuple(seeds), a_SxP, b_SxP


def paired_seed_test(a: PerSeed, b: PerSeed) -> SeedTest:
    """The t-test over seeds of the per-seed differences ``d_s`` (module doc); seeds only one
    rule ran are left out. ``n < 2`` gives no stderr, t or p; a zero stderr gives no t or p."""
    seeds, a_SxP, b_SxP = paired(a, b)
    d_S = a_SxP.mean(axis=1) - b_SxP.mean(axis=1) if seeds else np.zeros(0)
    n, differences = len(seeds), tuple(float(d) for d in d_S)
    if n == 0:
        return SeedTest(seeds, differences, None, None, None, None, None, "no seed ran both")
    value = float(d_S.mean())
    if n == 1:
        return SeedTest(seeds, differences, value, None, None, None, None, "one seed: no error")
    stderr = float(d_S.std(ddof=1) / np.sqrt(n))
    if stderr == 0.0:
        note = "the seeds' differences are equal: no t"
        return SeedTest(seeds, differences, value, 0.0, None, n - 1, None, note)
    t = value / stderr
    p = float(2.0 * stats.t.sf(abs(t), n - 1))
    return SeedTest(seeds, differences, value, stderr, t, n - 1, p, "")


def hierarchical_bootstrap(
    a: PerSeed,
    b: PerSeed,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval | None:
    """Percentile interval of ``mean_s d_s`` under a two-level paired bootstrap.

    Each of ``B = resamples`` draws picks ``n`` seeds with replacement, then for each picked
    seed ``P`` problems with replacement, and averages ``a_sp - b_sp`` over the picked
    (seed, problem) pairs; both rules share the problem indices. The interval is the
    ``(1 -+ confidence) / 2`` quantiles of the ``B`` means. Memory ``O(B P)`` (one loop over
    the ``n`` seed positions). None when fewer than 2 seeds are paired (one run says nothing
    of the spread between runs). With few seeds it is narrower than the t interval: the
    bootstrap's variance over seeds is ``(n - 1) / n`` of the sample variance.
    """
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1: {resamples}, {confidence}")
    seeds, a_SxP, b_SxP = paired(a, b)
    if len(seeds) < 2:
        return None
    d_SxP = a_SxP - b_SxP
    n, num_problems = d_SxP.shape
    rng = np.random.default_rng(seed)
    picked_BxS = rng.integers(0, n, size=(resamples, n))
    total_B = np.zeros(resamples)
    for j in range(n):
        problems_BxP = rng.integers(0, num_problems, size=(resamples, num_problems))
        total_B += d_SxP[picked_BxS[:, j, None], problems_BxP].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(total_B / n, [tail, 1.0 - tail])
    return Interval(float(low), float(high), confidence, resamples, seed)


def pooled_estimate(x: PerSeed) -> PooledEstimate:
    """A rule's row (module doc) from its ``{seed: [P]}`` accuracies; needs one seed or more."""
    seeds = list(x)
    if not seeds:
        raise ValueError("need at least one seed")
    x_SxP = _stack(x, seeds, "x")
    pooled_P = x_SxP.mean(axis=0)
    num_problems = pooled_P.size
    stderr = float(pooled_P.std(ddof=1) / np.sqrt(num_problems)) if num_problems > 1 else 0.0
    per_seed_S = x_SxP.mean(axis=1)
    seed_sd = float(per_seed_S.std(ddof=1)) if len(seeds) > 1 else None
    per_seed = tuple(float(v) for v in per_seed_S)
    return PooledEstimate(float(pooled_P.mean()), stderr, seed_sd, tuple(seeds), per_seed)
