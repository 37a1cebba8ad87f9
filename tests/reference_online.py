"""Reference BIC split with its gain, online cut and online replay (docs/method.md §3 and the
online release; conventions in tests/reference_basics.py).

Written literally from the specification, independently of `opd_jax.core.online_release`:

* split: the §3 test on `M_1..M_n`, plus `gain = BIC0 - BIC1(tau*)` with `tau*` the best
  admissible split (earliest on ties), -inf where no split is admissible; released iff
  gain > 0.
* online cut at length n: splits of the first `n - j` entries for `j = 0..confirm`; `tau` is
  the j = 0 tau, `gain` the smallest gain, `certain` iff every j releases at the j = 0 tau and
  that smallest gain is >= min_gain.
* replay: the online cut at n = 1..N on lengths min(n, n_b); a row stops at the first n <= n_b
  where it is certain, with that cut's tau; otherwise seen = n_b and tau = the offline tau.

Near-ties. Besides the decisions, every function reports `ambiguous` (a discrete decision a
float32 implementation may legitimately flip: taken from `reference_release.changepoint_row`,
plus the `gain >= min_gain` comparison) and, for gains, an interval `[gain_lo, gain_hi]` that
any float32 evaluation must land in, with `gain_ambiguous` where the admissible set itself is
in doubt (then the interval means nothing). The interval: float32 prefix sums give
`RSS = sum x^2 - (sum x)^2 / n` to within about `3 n eps32 sum x^2` (eps32 = 6e-8), so
`RSS +- RSS_TOL * n * (sum x^2 + 1)` brackets it (RSS_TOL = 1e-6, 5x slack); each BIC's own
float32 evaluation (a log, a few products) adds `BIC_RTOL * (1 + |BIC|)` (BIC_RTOL = 1e-5,
~100 ulps). The implementation's BIC1 minimum over admissible splits then lies in
[min lo, min hi] whichever split it picks, so gains need no near-tie skipping of their own.
"""

from __future__ import annotations

import math

import numpy as np

from tests.reference_basics import f64
from tests.reference_release import changepoint_row

RSS_TOL = 1e-6
BIC_RTOL = 1e-5
MU_RTOL = 1e-5  # as reference_release: admissibility within 1e-5 * (1 + max|M|) is in doubt


# --------------------------------------------------------------------------- BIC split
def _bic(rss: float, n: int, k: float, penalty: float, eps: float) -> float:
    return n * math.log(rss / n + eps) + k * penalty * math.log(n)


def _bic_bounds(rss: float, n: int, k: float, penalty: float, eps: float, delta: float):
    lo = _bic(max(rss - delta, 0.0), n, k, penalty, eps)
    hi = _bic(rss + delta, n, k, penalty, eps)
    return lo - BIC_RTOL * (1 + abs(lo)), hi + BIC_RTOL * (1 + abs(hi))


def split_row(
    M, *, min_segments=2, k0=1.0, k1=3.0, penalty=1.0, min_drop_std=0.0, eps=1e-8
) -> dict:
    """§3 on one valid series M_1..M_n: tau (n when not released), released, gain with its
    float32 interval, and the near-tie flags `ambiguous` and `gain_ambiguous`."""
    M = f64(M)
    n = len(M)
    lmin = min_segments
    out = {
        "tau": n,
        "released": False,
        "gain": -math.inf,
        "gain_lo": -math.inf,
        "gain_hi": -math.inf,
        "ambiguous": False,
        "gain_ambiguous": False,
    }
    if n < 2 * lmin:
        return out
    delta = RSS_TOL * n * (float(np.sum(M * M)) + 1.0)
    mu_tol = MU_RTOL * (1.0 + float(np.max(np.abs(M))))
    rss0 = float(np.sum((M - np.mean(M)) ** 2))
    bic0 = _bic(rss0, n, k0, penalty, eps)
    threshold = min_drop_std * float(np.std(M))  # population std
    best = None
    best_bic = math.inf
    lo1 = hi1 = math.inf  # min over admissible splits of BIC1's bounds
    doubtful = []  # (lo, hi) bounds of splits whose admissibility is too close to call
    for tau in range(lmin, n - lmin + 1):
        pre, post = M[:tau], M[tau:]
        mu_pre, mu_post = float(np.mean(pre)), float(np.mean(post))
        rss1 = float(np.sum((pre - mu_pre) ** 2) + np.sum((post - mu_post) ** 2))
        bic1 = _bic(rss1, n, k1, penalty, eps)
        bounds = _bic_bounds(rss1, n, k1, penalty, eps, delta)
        drop = mu_pre - mu_post
        if drop > 0 and (min_drop_std <= 0 or drop >= threshold):
            if bic1 < best_bic:  # strict: the earliest split wins ties
                best, best_bic = tau, bic1
            lo1, hi1 = min(lo1, bounds[0]), min(hi1, bounds[1])
        if abs(drop) <= mu_tol or (min_drop_std > 0 and abs(drop - threshold) <= mu_tol):
            doubtful.append(bounds)
    if best is not None:
        lo0, hi0 = _bic_bounds(rss0, n, k0, penalty, eps, delta)
        out.update(gain=bic0 - best_bic, gain_lo=lo0 - hi1, gain_hi=hi0 - lo1)
        out.update(released=bic0 - best_bic > 0, tau=best if bic0 - best_bic > 0 else n)
    # a doubtful split moves the gain if it could be (or stop being) the smallest BIC1
    out["gain_ambiguous"] = any(lo <= hi1 for lo, _ in doubtful)
    cp = changepoint_row(
        M,
        min_segments=min_segments,
        k0=k0,
        k1=k1,
        penalty=penalty,
        min_drop_std=min_drop_std,
        eps=eps,
    )
    assert (cp["tau"], cp["released"]) == (out["tau"], out["released"]), "reference mismatch"
    out["ambiguous"] = cp["ambiguous"]
    return out


def _rows(fn, series, lengths, keys, **kw) -> dict:
    series = f64(series)
    rows = [fn(series[b], int(lengths[b]), **kw) for b in range(series.shape[0])]
    return {k: np.array([r[k] for r in rows]) for k in keys}


SPLIT_KEYS = ("tau", "released", "gain", "gain_lo", "gain_hi", "ambiguous", "gain_ambiguous")


def bic_split(series, lengths, **changepoint) -> dict:
    """Per row b, `split_row(series[b, :lengths[b]])`, as arrays keyed by SPLIT_KEYS."""
    return _rows(
        lambda M, n, **kw: split_row(M[:n], **kw), series, lengths, SPLIT_KEYS, **changepoint
    )


# --------------------------------------------------------------------------- online cut
def cut_row(M, n: int, *, confirm=0, min_gain=8.0, _splits=None, **changepoint) -> dict:
    """The online cut of a row seen up to length n: splits of M[:max(n - j, 0)], j = 0..confirm."""
    splits = {} if _splits is None else _splits  # length -> split_row, shared by a replay
    js = []
    for j in range(confirm + 1):
        m = max(n - j, 0)
        if m not in splits:
            splits[m] = split_row(M[:m], **changepoint)
        js.append(splits[m])
    tau0 = js[0]["tau"]
    agree = all(s["released"] and s["tau"] == tau0 for s in js)
    gain = min(s["gain"] for s in js)
    lo, hi = min(s["gain_lo"] for s in js), min(s["gain_hi"] for s in js)
    ambiguous = any(s["ambiguous"] for s in js) or (agree and lo <= min_gain <= hi)
    return {
        "certain": agree and gain >= min_gain,
        "tau": tau0,
        "gain": gain,
        "gain_lo": lo,
        "gain_hi": hi,
        "ambiguous": ambiguous,
        "gain_ambiguous": any(s["gain_ambiguous"] for s in js),
    }


CUT_KEYS = ("certain", "tau", "gain", "gain_lo", "gain_hi", "ambiguous", "gain_ambiguous")


def online_cut(means, lengths, *, confirm=0, min_gain=8.0, **changepoint) -> dict:
    """Per row, `cut_row` at n = lengths[b], as arrays keyed by CUT_KEYS."""
    return _rows(
        cut_row, means, lengths, CUT_KEYS, confirm=confirm, min_gain=min_gain, **changepoint
    )


# --------------------------------------------------------------------------- replay
def replay_row(M, n_b: int, N: int, *, confirm=0, min_gain=8.0, **changepoint) -> dict:
    """Online cuts at n = 1..N on length min(n, n_b); stop at the first certain n <= n_b.

    `ambiguous`: some cut up to the stop (or, never stopping, the offline split) is a near-tie.
    """
    splits = {}
    ambiguous = False
    for n in range(1, N + 1):
        c = cut_row(
            M, min(n, n_b), confirm=confirm, min_gain=min_gain, _splits=splits, **changepoint
        )
        ambiguous |= c["ambiguous"]
        if c["certain"] and n <= n_b:
            return {"stopped": True, "seen": n, "tau": c["tau"], "ambiguous": ambiguous}
    offline = split_row(M[:n_b], **changepoint)
    return {
        "stopped": False,
        "seen": n_b,
        "tau": offline["tau"],
        "ambiguous": ambiguous or offline["ambiguous"],
    }


def replay_online(means, lengths, *, confirm=0, min_gain=8.0, **changepoint) -> dict:
    """Per row, `replay_row`, as arrays keyed by stopped, seen, tau, ambiguous."""
    N = np.shape(means)[1]
    return _rows(
        lambda M, n_b, **kw: replay_row(M, n_b, N, **kw),
        means,
        lengths,
        ("stopped", "seen", "tau", "ambiguous"),
        confirm=confirm,
        min_gain=min_gain,
        **changepoint,
    )
