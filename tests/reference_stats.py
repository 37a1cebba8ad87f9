"""Reference token statistics, margins, per-token statistics and position profiles
(docs/method.md §1; conventions in tests/reference_basics.py).
"""

from __future__ import annotations

import math

import numpy as np

from tests.reference_basics import f64, log_softmax, logsumexp, response_positions, topk_ids

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
