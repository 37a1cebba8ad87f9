"""Reference token-selection rules, with tolerances and fragility flags for float32 near-ties
(docs/method.md §6; conventions in tests/reference_basics.py).
"""

from __future__ import annotations

import numpy as np

from tests.reference_basics import f64, log_softmax, response_positions, slack_ceil
from tests.reference_release import release
from tests.reference_stats import (
    sampled_advantage,
    teacher_mass,
    topk_entropy,
    topk_margin,
    union_forward_kl,
)


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
