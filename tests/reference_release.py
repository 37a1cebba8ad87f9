"""Reference segment means, BIC change point and release mask, with near-tie flags
(docs/method.md §2-§4; conventions in tests/reference_basics.py).
"""

from __future__ import annotations

import math

import numpy as np

from tests.reference_basics import f64, response_positions


# --------------------------------------------------------------------------- segments
def segment_means(values, seg, response_mask, num_segments: int):
    values = f64(values)
    seg = np.asarray(seg)
    B, T = values.shape
    sums = np.zeros((B, num_segments))
    counts = np.zeros((B, num_segments), np.int64)
    lengths = np.zeros(B, np.int64)
    for b in range(B):
        for t in range(T):
            if bool(response_mask[b, t]):
                j = int(seg[b, t])
                sums[b, j] += values[b, t]
                counts[b, j] += 1
                lengths[b] = max(lengths[b], j + 1)
    means = np.zeros((B, num_segments))
    for b in range(B):
        for j in range(num_segments):
            if counts[b, j] > 0:
                means[b, j] = sums[b, j] / counts[b, j]
    return means, counts, lengths


def fixed_segments(response_mask, size: int) -> np.ndarray:
    B, T = np.shape(response_mask)
    seg = -np.ones((B, T), np.int64)
    for b in range(B):
        for i, t in enumerate(response_positions(response_mask[b])):
            seg[b, t] = i // size
    return seg


# --------------------------------------------------------------------------- change point
def _bic(rss: float, n: int, kpen: float, penalty: float, eps: float) -> float:
    return n * math.log(rss / n + eps) + kpen * penalty * math.log(n)


def _bic_interval(rss, n, kpen, penalty, eps, delta):
    lo = n * math.log(max(rss - delta, 0.0) / n + eps) + kpen * penalty * math.log(n)
    hi = n * math.log((rss + delta) / n + eps) + kpen * penalty * math.log(n)
    return lo, hi


def _near(a: float, b: float, ia, ib, rel: float) -> bool:
    """True when two BIC values cannot be ordered reliably from float32 arithmetic."""
    if abs(a - b) <= rel * max(1.0, abs(a), abs(b)):
        return True
    return ia[0] <= ib[1] and ib[0] <= ia[1]


def changepoint_row(
    M,
    *,
    min_segments=2,
    k0=1,
    k1=3,
    penalty=1.0,
    min_drop_std=0.0,
    eps=1e-8,
    rel_tol=1e-4,
    mu_tol=None,
    rss_tol=None,
) -> dict:
    """docs/method.md §3 on one valid series M_1..M_n, with near-tie diagnostics.

    Returns tau (n when not released), released, and `ambiguous`: True when a BIC comparison
    (best vs runner-up admissible split, best vs BIC0) or an admissibility test
    (mu_pre - mu_post against 0 or against min_drop_std * std(M)) is too close to call in
    float32.
    """
    M = f64(M)
    n = len(M)
    lmin = min_segments
    res = {"tau": n, "released": False, "ambiguous": False, "bic0": None, "bic1": {}}
    if n < 2 * lmin:
        return res
    scale = float(np.max(np.abs(M))) if n else 0.0
    if mu_tol is None:
        mu_tol = 1e-5 * (1.0 + scale)
    if rss_tol is None:
        rss_tol = 1e-6 * n * (float(np.sum(M * M)) + 1.0)
    mean = float(np.mean(M))
    rss0 = float(np.sum((M - mean) ** 2))
    bic0 = _bic(rss0, n, k0, penalty, eps)
    i0 = _bic_interval(rss0, n, k0, penalty, eps, rss_tol)
    res["bic0"] = bic0
    std = float(np.std(M))  # population std, ddof = 0
    threshold = min_drop_std * std
    admissible = []
    near_admissible = []
    bic1 = {}
    i1 = {}
    for tau in range(lmin, n - lmin + 1):
        pre, post = M[:tau], M[tau:]
        mu_pre, mu_post = float(np.mean(pre)), float(np.mean(post))
        rss1 = float(np.sum((pre - mu_pre) ** 2) + np.sum((post - mu_post) ** 2))
        bic1[tau] = _bic(rss1, n, k1, penalty, eps)
        i1[tau] = _bic_interval(rss1, n, k1, penalty, eps, rss_tol)
        drop = mu_pre - mu_post
        ok = drop > 0 and (min_drop_std <= 0 or drop >= threshold)
        if ok:
            admissible.append(tau)
        if abs(drop) <= mu_tol or (min_drop_std > 0 and abs(drop - threshold) <= mu_tol):
            near_admissible.append(tau)
    res["bic1"] = bic1
    best = None
    for tau in admissible:  # argmin, earliest on ties
        if best is None or bic1[tau] < bic1[best]:
            best = tau
    released = best is not None and bic1[best] < bic0
    ambiguous = False
    for tau in near_admissible:
        # flipping this split's admissibility matters only if it could beat BIC0
        if i1[tau][0] <= i0[1] or bic1[tau] - bic0 <= rel_tol * max(1.0, abs(bic0)):
            ambiguous = True
    if best is not None:
        release_near = _near(bic1[best], bic0, i1[best], i0, rel_tol)
        ambiguous |= release_near
        if released or release_near:
            for tau in admissible:
                if tau != best and _near(bic1[tau], bic1[best], i1[tau], i1[best], rel_tol):
                    ambiguous = True
    res.update(tau=best if released else n, released=released, ambiguous=ambiguous)
    return res


def bic_downward_changepoint(
    series, lengths, *, min_segments=2, k0=1, k1=3, penalty=1.0, min_drop_std=0.0, eps=1e-8, **tol
):
    """Per row: (tau[B], released[B], ambiguous[B]); only series[b, :lengths[b]] is read."""
    series = f64(series)
    B = series.shape[0]
    tau = np.zeros(B, np.int64)
    released = np.zeros(B, bool)
    ambiguous = np.zeros(B, bool)
    for b in range(B):
        r = changepoint_row(
            series[b, : int(lengths[b])],
            min_segments=min_segments,
            k0=k0,
            k1=k1,
            penalty=penalty,
            min_drop_std=min_drop_std,
            eps=eps,
            **tol,
        )
        tau[b], released[b], ambiguous[b] = r["tau"], r["released"], r["ambiguous"]
    return tau, released, ambiguous


# --------------------------------------------------------------------------- release mask
def release(
    margin,
    seg,
    response_mask,
    *,
    num_segments=None,
    min_segments=2,
    k0=1,
    k1=3,
    penalty=1.0,
    min_drop_std=0.0,
    eps=1e-8,
    **tol,
) -> dict:
    """docs/method.md §2-§4: segment means of the margin, change point, w = r * [t < t*]."""
    margin = f64(margin)
    B, T = margin.shape
    N = T if num_segments is None else num_segments
    means, _, lengths = segment_means(margin, seg, response_mask, N)
    tau, released, ambiguous = bic_downward_changepoint(
        means,
        lengths,
        min_segments=min_segments,
        k0=k0,
        k1=k1,
        penalty=penalty,
        min_drop_std=min_drop_std,
        eps=eps,
        **tol,
    )
    r = np.array([[1.0 if bool(response_mask[b, t]) else 0.0 for t in range(T)] for b in range(B)])
    w = r.copy()
    boundary = np.full(B, T, np.int64)
    for b in range(B):
        if released[b]:
            t_star = min(t for t in range(T) if bool(response_mask[b, t]) and seg[b, t] == tau[b])
            boundary[b] = t_star
            for t in range(T):
                w[b, t] = r[b, t] * (1.0 if t < t_star else 0.0)
    return {"w": w, "tau": tau, "released": released, "boundary": boundary, "ambiguous": ambiguous}
