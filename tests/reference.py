"""Plain NumPy reference for `opd_jax.core`, written literally from docs/method.md.

Everything here is float64 and loops over batch rows, positions and segments on purpose:
each function is meant to be read against the specification, not to be fast. Inputs are
raw logits (or plain arrays); the reference never sees the implementation's intermediate
statistics.

Conventions (docs/method.md plus the conventions fixed by the test brief):
  * `s = log_softmax(student_logits)`, `q = log_softmax(teacher_logits)`, last axis.
  * top-K: `numpy.argsort(-logp, kind="stable")[:K]`, i.e. descending log-prob, lowest token
    id first on exact ties (for the student and, by the same convention, the teacher).
  * `ceil` with float slack: `ceil(x - 1e-3)`.

Where float32 arithmetic in the implementation can legitimately flip a discrete decision
(near-ties), the reference also reports *ambiguity* flags so the tests can skip exactly
those comparisons.
"""

from __future__ import annotations

import math

import numpy as np

TOKEN_STATS_FIELDS = (
    "tokens",
    "student_logp",
    "teacher_logp",
    "student_topk_ids",
    "student_topk_logp",
    "teacher_at_student_topk",
    "teacher_topk_ids",
    "teacher_topk_logp",
    "student_at_teacher_topk",
)

MARGIN_KINDS = ("gap", "mean_gap", "sampled_gap", "advantage_spread", "teacher_mass")
LOSS_KINDS = ("sampled_reverse_kl", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl")

CEIL_SLACK = 1e-3


# --------------------------------------------------------------------------- basics
def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def logsumexp(x) -> float:
    x = f64(x)
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def log_softmax(logits) -> np.ndarray:
    """log_softmax over the last axis, float64."""
    z = f64(logits)
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def topk_ids(logp_row, k: int) -> np.ndarray:
    """The k ids with the largest log-prob, descending; lowest id first on exact ties."""
    return np.argsort(-f64(logp_row), kind="stable")[:k]


def slack_ceil(x: float) -> int:
    return int(math.ceil(x - CEIL_SLACK))


def response_positions(mask_row) -> list[int]:
    """Positions t of a row with r[t] = 1, in order (response index = list index)."""
    return [t for t in range(len(mask_row)) if bool(mask_row[t])]


# --------------------------------------------------------------------------- token stats
def token_stats(student_logits, teacher_logits, tokens, k: int) -> dict:
    """TokenStats as a dict of arrays (docs/method.md §1's K values per position)."""
    s = log_softmax(student_logits)
    q = log_softmax(teacher_logits)
    tokens = np.asarray(tokens)
    B, T, _ = s.shape
    out = {
        "tokens": tokens.astype(np.int64),
        "student_logp": np.zeros((B, T)),
        "teacher_logp": np.zeros((B, T)),
        "student_topk_ids": np.zeros((B, T, k), np.int64),
        "student_topk_logp": np.zeros((B, T, k)),
        "teacher_at_student_topk": np.zeros((B, T, k)),
        "teacher_topk_ids": np.zeros((B, T, k), np.int64),
        "teacher_topk_logp": np.zeros((B, T, k)),
        "student_at_teacher_topk": np.zeros((B, T, k)),
    }
    for b in range(B):
        for t in range(T):
            y = int(tokens[b, t])
            out["student_logp"][b, t] = s[b, t, y]
            out["teacher_logp"][b, t] = q[b, t, y]
            sid = topk_ids(s[b, t], k)
            tid = topk_ids(q[b, t], k)
            out["student_topk_ids"][b, t] = sid
            out["student_topk_logp"][b, t] = s[b, t, sid]
            out["teacher_at_student_topk"][b, t] = q[b, t, sid]
            out["teacher_topk_ids"][b, t] = tid
            out["teacher_topk_logp"][b, t] = q[b, t, tid]
            out["student_at_teacher_topk"][b, t] = s[b, t, tid]
    return out


# --------------------------------------------------------------------------- margins
def margin_at(s_row, q_row, y: int, k: int, kind: str, renormalize: bool = False) -> float:
    """docs/method.md §1 at one position, from full log-prob rows."""
    S = topk_ids(s_row, k)
    qS = f64(q_row)[S]
    sS = f64(s_row)[S]
    qy = float(q_row[y])
    if renormalize:
        c = logsumexp(qS)
        qS = qS - c
        qy = qy - c
    if kind == "gap":
        if k == 1:
            return 0.0
        desc = np.sort(qS)[::-1]
        return float(desc[0] - desc[1])
    if kind == "mean_gap":
        return float(np.max(qS) - np.mean(qS))
    if kind == "sampled_gap":
        others = [qS[i] for i in range(len(S)) if int(S[i]) != y]
        if not others:
            return 0.0
        return float(qy - max(others))
    if kind == "advantage_spread":
        d = qS - sS
        return float(np.max(d) - np.min(d))
    if kind == "teacher_mass":
        return float(np.sum(np.exp(qS)))
    raise ValueError(kind)


def topk_margin(
    student_logits, teacher_logits, k, kind="gap", *, tokens=None, renormalize=False
) -> np.ndarray:
    s = log_softmax(student_logits)
    q = log_softmax(teacher_logits)
    B, T, _ = s.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            y = int(tokens[b, t]) if tokens is not None else -1
            out[b, t] = margin_at(s[b, t], q[b, t], y, k, kind, renormalize)
    return out


def sampled_advantage(student_logits, teacher_logits, tokens) -> np.ndarray:
    """A_t = q[y_t] - s[y_t]."""
    s = log_softmax(student_logits)
    q = log_softmax(teacher_logits)
    B, T, _ = s.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            y = int(tokens[b, t])
            out[b, t] = q[b, t, y] - s[b, t, y]
    return out


def topk_entropy_at(s_row, k: int) -> float:
    """Entropy of the student renormalised over its top-k, divided by log k (0 if k = 1)."""
    if k == 1:
        return 0.0
    sS = f64(s_row)[topk_ids(s_row, k)]
    logp = sS - logsumexp(sS)
    p = np.exp(logp)
    return float(-np.sum(p * logp) / math.log(k))


def topk_entropy(student_logits, k) -> np.ndarray:
    s = log_softmax(student_logits)
    B, T, _ = s.shape
    return np.array([[topk_entropy_at(s[b, t], k) for t in range(T)] for b in range(B)])


def teacher_mass(student_logits, teacher_logits, k) -> np.ndarray:
    """C = sum over the student's top-k of exp(q)."""
    s = log_softmax(student_logits)
    q = log_softmax(teacher_logits)
    B, T, _ = s.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            out[b, t] = float(np.sum(np.exp(q[b, t, topk_ids(s[b, t], k)])))
    return out


def union_forward_kl_at(s_row, q_row, k: int) -> float:
    """TA-OPD's D: KL(teacher || student) on the union of both top-k sets, renormalised."""
    U = sorted(set(topk_ids(s_row, k).tolist()) | set(topk_ids(q_row, k).tolist()))
    qU = f64(q_row)[U]
    sU = f64(s_row)[U]
    logpT = qU - logsumexp(qU)
    logpS = sU - logsumexp(sU)
    return float(np.sum(np.exp(logpT) * (logpT - logpS)))


def union_forward_kl(student_logits, teacher_logits, k) -> np.ndarray:
    s = log_softmax(student_logits)
    q = log_softmax(teacher_logits)
    B, T, _ = s.shape
    return np.array(
        [[union_forward_kl_at(s[b, t], q[b, t], k) for t in range(T)] for b in range(B)]
    )


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


# --------------------------------------------------------------------------- losses
def token_loss_at(z_s, z_t, y: int, kind: str, beta=0.5, k=16, advantage=None) -> float:
    """docs/method.md §5 per-token term at one position, from logit rows.

    `advantage` overrides A = q[y] - s[y] in `sampled_reverse_kl` (to hold it fixed, as the
    stop-gradient does, when taking finite differences).
    """
    s = log_softmax(z_s)
    q = log_softmax(z_t)
    pS, pT = np.exp(s), np.exp(q)
    if kind == "sampled_reverse_kl":
        A = q[y] - s[y] if advantage is None else advantage
        return float(-A * s[y])
    if kind == "reverse_kl":
        return float(np.sum(pS * (s - q)))
    if kind == "forward_kl":
        return float(np.sum(pT * (q - s)))
    if kind == "jsd":
        m = beta * pT + (1 - beta) * pS
        logm = np.log(m)
        kl_t = np.sum(pT * (q - logm))
        kl_s = np.sum(pS * (s - logm))
        return float(beta * kl_t + (1 - beta) * kl_s)
    if kind == "topk_reverse_kl":
        S = topk_ids(s, k)
        ls = s[S] - logsumexp(s[S])
        lt = q[S] - logsumexp(q[S])
        return float(np.sum(np.exp(ls) * (ls - lt)))
    raise ValueError(kind)


def token_loss(
    student_logits,
    teacher_logits,
    tokens,
    kind="sampled_reverse_kl",
    *,
    beta=0.5,
    k=16,
    advantage=None,
) -> np.ndarray:
    zs, zt = f64(student_logits), f64(teacher_logits)
    B, T, _ = zs.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            a = None if advantage is None else advantage[b, t]
            out[b, t] = token_loss_at(zs[b, t], zt[b, t], int(tokens[b, t]), kind, beta, k, a)
    return out


def reduce_loss(loss, w, reduction="token_mean") -> float:
    loss, w = f64(loss), f64(w)
    if reduction == "token_mean":
        total = float(np.sum(w))
        return float(np.sum(w * loss)) / total if total > 0 else 0.0
    if reduction == "sequence_mean":
        rows = []
        for b in range(loss.shape[0]):
            wb = float(np.sum(w[b]))
            if wb > 0:
                rows.append(float(np.sum(w[b] * loss[b])) / wb)
        return float(np.mean(rows)) if rows else 0.0
    raise ValueError(reduction)


# --------------------------------------------------------------------------- rules
def mask01(response_mask) -> np.ndarray:
    return np.asarray(response_mask).astype(bool).astype(np.float64)


def rule_full(batch) -> np.ndarray:
    return mask01(batch["response_mask"])


def rule_prefix_tokens(batch, n=100) -> np.ndarray:
    r = mask01(batch["response_mask"])
    w = np.zeros_like(r)
    for b in range(r.shape[0]):
        for i, t in enumerate(response_positions(r[b])):
            if i < n:
                w[b, t] = 1.0
    return w


def rule_prefix_fraction(batch, rho=0.5) -> np.ndarray:
    r = mask01(batch["response_mask"])
    w = np.zeros_like(r)
    for b in range(r.shape[0]):
        pos = response_positions(r[b])
        keep = slack_ceil(rho * len(pos))
        for i, t in enumerate(pos):
            if i < keep:
                w[b, t] = 1.0
    return w


def rule_iw_opd(batch, gamma=0.5) -> dict:
    """w_t = r_t (1 + gamma (1 - C_<t / C_total)), C = cumulative r |A| (exclusive).

    Also returns a per-row tolerance `tol[B]` covering float32 error in A (it grows as
    C_total -> 0, where the fraction is ill-conditioned).
    """
    r = mask01(batch["response_mask"])
    A = sampled_advantage(batch["student_logits"], batch["teacher_logits"], batch["tokens"])
    s = log_softmax(batch["student_logits"])
    q = log_softmax(batch["teacher_logits"])
    B, T = r.shape
    w = np.zeros((B, T))
    tol = np.zeros(B)
    for b in range(B):
        c_total = sum(r[b, t] * abs(A[b, t]) for t in range(T))
        err = sum(
            r[b, t]
            * 2e-6
            * (1 + abs(s[b, t, batch["tokens"][b, t]]) + abs(q[b, t, batch["tokens"][b, t]]))
            for t in range(T)
        )
        c_before = 0.0
        for t in range(T):
            frac = c_before / c_total if c_total > 0 else 0.0
            w[b, t] = r[b, t] * (1 + gamma * (1 - frac))
            c_before += r[b, t] * abs(A[b, t])
        if gamma == 0 or (c_total == 0 and s.shape[-1] == 1):  # V = 1: A = 0 exactly
            tol[b] = 1e-5
        else:
            tol[b] = 1e-5 + (gamma * 2 * err / c_total if c_total > 0 else np.inf)
    return {"w": w, "tol": tol}


def rule_release(
    batch,
    margin_kind="gap",
    margin_k=16,
    renormalize=False,
    min_segments=2,
    k0=1,
    k1=3,
    penalty=1.0,
    min_drop_std=0.0,
    eps=1e-8,
) -> dict:
    margin = topk_margin(
        batch["student_logits"],
        batch["teacher_logits"],
        margin_k,
        margin_kind,
        tokens=batch["tokens"],
        renormalize=renormalize,
    )
    return release(
        margin,
        batch["seg"],
        batch["response_mask"],
        num_segments=None,
        min_segments=min_segments,
        k0=k0,
        k1=k1,
        penalty=penalty,
        min_drop_std=min_drop_std,
        eps=eps,
    )


def batch_global_selection(score, response_mask, ratio) -> np.ndarray:
    """Keep the batch-global top ceil(ratio * N_valid - 1e-3) valid tokens by score (ties:
    earliest flattened index), plus every non-empty row's own best token (earliest on ties)."""
    score = f64(score)
    B, T = score.shape
    valid = [(b, t) for b in range(B) for t in range(T) if bool(response_mask[b, t])]
    n_keep = min(max(slack_ceil(ratio * len(valid)), 0), len(valid))
    order = sorted(valid, key=lambda bt: (-score[bt], bt[0] * T + bt[1]))
    w = np.zeros((B, T))
    for bt in order[:n_keep]:
        w[bt] = 1.0
    for b in range(B):
        row = [bt for bt in order if bt[0] == b]
        if row:
            w[row[0]] = 1.0
    return w


def _row_keys(batch) -> np.ndarray:
    """Positions with bitwise-identical (student, teacher) logit rows get identical float32
    statistics in any implementation; with V = 1 every row is identical after log_softmax."""
    zs, zt = np.asarray(batch["student_logits"]), np.asarray(batch["teacher_logits"])
    B, T, V = zs.shape
    keys = np.empty((B, T), object)
    skeys = np.empty((B, T), object)
    for b in range(B):
        for t in range(T):
            if V == 1:
                keys[b, t] = skeys[b, t] = "V1"
            else:
                skeys[b, t] = zs[b, t].tobytes()
                keys[b, t] = zs[b, t].tobytes() + zt[b, t].tobytes()
    return keys, skeys


def percentile_normalise(x, response_mask, err: float, keys):
    """clip((x - p5) / (p95 - p5), 0, 1), p5/p95 = numpy.percentile over valid tokens
    (0 everywhere when p95 == p5). Also returns a per-token uncertainty `u` for an input
    error `err`, and `exact` in {None, 'zero', 'one'} for values that any float32
    implementation also gets exactly (clipped far from the boundary)."""
    x = f64(x)
    B, T = x.shape
    valid = [(b, t) for b in range(B) for t in range(T) if bool(response_mask[b, t])]
    out = np.zeros((B, T))
    u = np.zeros((B, T))
    exact = np.full((B, T), None, object)
    if not valid:
        return out, u, exact
    xs = np.array([x[bt] for bt in valid])
    p5, p95 = np.percentile(xs, [5, 95])
    spread = p95 - p5
    identical = len({keys[bt] for bt in valid}) == 1
    for bt in valid:
        if spread == 0:
            out[bt] = 0.0
            if identical:
                exact[bt] = "zero"
            else:
                u[bt] = 1.0
            continue
        raw = (x[bt] - p5) / spread
        out[bt] = min(max(raw, 0.0), 1.0)
        if spread <= 10 * err:
            u[bt] = 1.0
            continue
        ur = 3 * err / spread
        if raw <= -ur:
            exact[bt] = "zero"
        elif raw >= 1 + ur:
            exact[bt] = "one"
        else:
            u[bt] = ur
    return out, u, exact


def selection_scores(batch, name, k=16, stats_k=None) -> dict:
    """Scores of ta_opd / entropy / tip with their uncertainty and robust-tie keys.

    C (teacher mass) and H (top-k entropy) use the first k student candidates; D is
    `union_forward_kl(stats)`, i.e. over the stats' own K (`stats_k`; k when None), since that
    statistic takes no k.
    """
    zs, zt = batch["student_logits"], batch["teacher_logits"]
    mask = batch["response_mask"]
    keys, skeys = _row_keys(batch)
    B, T = np.shape(mask)
    H = topk_entropy(zs, k)
    uH = np.full((B, T), 0.0 if k == 1 else 5e-6)
    if name == "entropy":
        tie = np.empty((B, T), object)
        for b in range(B):
            for t in range(T):
                tie[b, t] = {("s", skeys[b, t])} | ({"zero"} if k == 1 else set())
        return {"score": H, "u": uH, "tie": tie}
    D = union_forward_kl(zs, zt, k if stats_k is None else stats_k)
    errD = 1e-5 * (1.0 + float(np.max(np.abs(D))))
    Dn, uD, exD = percentile_normalise(D, mask, errD, keys)
    tie = np.empty((B, T), object)
    if name == "ta_opd":
        C = teacher_mass(zs, zt, k)
        Cn, uC, exC = percentile_normalise(C, mask, 2e-6, keys)
        score = Dn * Cn
        u = uD * Cn + uC * Dn + uC * uD
        for b in range(B):
            for t in range(T):
                tie[b, t] = {("st", keys[b, t])}
                if exD[b, t] == "zero" or exC[b, t] == "zero":
                    tie[b, t].add("zero")
                if exD[b, t] == "one" and exC[b, t] == "one":
                    tie[b, t].add("one")
        return {"score": score, "u": u, "tie": tie}
    if name == "tip":
        score = H + Dn - H * Dn
        u = uH * (1 - Dn) + uD * (1 - H) + uH * uD
        for b in range(B):
            for t in range(T):
                tie[b, t] = {("st", keys[b, t])}
                if k == 1 and exD[b, t] is not None:  # H = 0 exactly, score = Dn
                    tie[b, t].add(exD[b, t])
                if exD[b, t] == "zero":  # score = H exactly
                    tie[b, t].add(("s", skeys[b, t]))
                    if k == 1:
                        tie[b, t].add("zero")
        return {"score": score, "u": u, "tie": tie}
    raise ValueError(name)


def selection_is_fragile(score, u, tie, response_mask, ratio) -> bool:
    """True when two valid tokens whose float32 order is uncertain (|diff| <= u_i + u_j and
    not a guaranteed bitwise tie) sit on different sides of a decision: one inside the
    global top-n and the other outside, or one of them is its row's best token and the other
    is in the same row."""
    score = f64(score)
    B, T = score.shape
    valid = [(b, t) for b in range(B) for t in range(T) if bool(response_mask[b, t])]
    n_keep = min(max(slack_ceil(ratio * len(valid)), 0), len(valid))
    order = sorted(valid, key=lambda bt: (-score[bt], bt[0] * T + bt[1]))
    in_top = {bt: i < n_keep for i, bt in enumerate(order)}
    row_best = {}
    for bt in order:
        row_best.setdefault(bt[0], bt)
    for i, a in enumerate(valid):
        for c in valid[i + 1 :]:
            if abs(score[a] - score[c]) > u[a] + u[c]:
                continue
            if score[a] == score[c] and tie[a] & tie[c]:
                continue
            if in_top[a] != in_top[c]:
                return True
            if a[0] == c[0] and (row_best[a[0]] in (a, c)):
                return True
    return False


def rule_scored(batch, name, ratio=0.05, k=16, stats_k=None) -> dict:
    """ta_opd / entropy / tip: w from batch-global selection, plus a fragility flag."""
    sc = selection_scores(batch, name, k, stats_k)
    w = batch_global_selection(sc["score"], batch["response_mask"], ratio)
    fragile = selection_is_fragile(sc["score"], sc["u"], sc["tie"], batch["response_mask"], ratio)
    return {"w": w, "fragile": fragile, "score": sc["score"]}


def selection_count_bounds(response_mask, ratio):
    """Kept count of any batch-global selection: between max(n_keep, rows) and n_keep+rows."""
    m = np.asarray(response_mask).astype(bool)
    n_valid = int(m.sum())
    rows = int(np.sum(m.any(axis=1)))
    n_keep = min(max(slack_ceil(ratio * n_valid), 0), n_valid)
    return max(n_keep, rows), min(n_keep + rows, n_valid)


# --------------------------------------------------------------------------- diagnostics
def position_profile(values, response_mask, bins=20):
    values = f64(values)
    sums = np.zeros(bins)
    counts = np.zeros(bins, np.int64)
    for b in range(values.shape[0]):
        pos = response_positions(response_mask[b])
        L = len(pos)
        for i, t in enumerate(pos):
            j = (bins * i) // L  # floor(bins * i / L), exact integer arithmetic
            sums[j] += values[b, t]
            counts[j] += 1
    means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return means, counts
