"""The plain NumPy reference for `opd_jax.core`: its conventions and shared basics.

The reference lives in tests/reference_*.py, written literally from docs/method.md.

Everything in it is float64 and loops over batch rows, positions and segments on purpose:
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
