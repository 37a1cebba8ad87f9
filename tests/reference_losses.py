"""Reference per-token losses and their reductions (docs/method.md §5; conventions in
tests/reference_basics.py).
"""

from __future__ import annotations

import numpy as np

from tests.reference_basics import f64, log_softmax, logsumexp, topk_ids

LOSS_KINDS = ("sampled_reverse_kl", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl")


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
