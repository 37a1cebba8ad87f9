"""Accuracy metrics from a ``[P, K]`` correctness matrix (P problems, K samples each), NumPy.

- avg@K: the mean of all ``P * K`` samples, ``mean_p (c_p / K)`` with ``c_p`` the correct
  samples of problem ``p``.
- pass@k (``k <= K``): the unbiased estimator of Chen et al. (2021) per problem,
  ``1 - C(K - c_p, k) / C(K, k)``, averaged over problems. pass@1 equals avg@K.

Every estimate carries its standard error across problems: ``std_p(x_p) / sqrt(P)`` with the
sample standard deviation (``ddof=1``) of the per-problem values ``x_p``; 0 when ``P = 1``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over problems and its standard error."""

    value: float
    stderr: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "stderr": self.stderr}


def _check(correct_PxK: np.ndarray) -> np.ndarray:
    correct_PxK = np.asarray(correct_PxK, dtype=bool)
    if correct_PxK.ndim != 2 or correct_PxK.size == 0:
        raise ValueError(
            f"need a non-empty [problems, samples] matrix, got shape {correct_PxK.shape}"
        )
    return correct_PxK


def mean_and_stderr(values_P: np.ndarray) -> Estimate:
    """``mean(x)`` and ``std(x, ddof=1) / sqrt(P)`` of per-problem values ``x [P]``."""
    values_P = np.asarray(values_P, dtype=np.float64)
    if values_P.ndim != 1 or values_P.size == 0:
        raise ValueError(f"need a non-empty vector of per-problem values, got {values_P.shape}")
    count = values_P.size
    stderr = float(np.std(values_P, ddof=1) / np.sqrt(count)) if count > 1 else 0.0
    return Estimate(float(np.mean(values_P)), stderr)


def paired_difference(a_P: np.ndarray, b_P: np.ndarray) -> Estimate:
    """``mean(a - b)`` and its standard error, paired per problem: ``a`` and ``b`` are two
    models' per-problem values on the same problems, so problem difficulty cancels."""
    a_P, b_P = np.asarray(a_P, np.float64), np.asarray(b_P, np.float64)
    if a_P.shape != b_P.shape:
        raise ValueError(f"paired values need one shape, got {a_P.shape} and {b_P.shape}")
    return mean_and_stderr(a_P - b_P)


def pass_at_k_per_problem(
    num_samples_P: np.ndarray, num_correct_P: np.ndarray, k: int
) -> np.ndarray:
    """Unbiased pass@k ``[P]`` from ``n`` samples of which ``c`` are correct:

    ``1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, and 1 when
    ``n - c < k`` (every draw of ``k`` holds a correct sample). Needs ``1 <= k <= n``.
    """
    n_P = np.asarray(num_samples_P, dtype=np.int64)
    c_P = np.asarray(num_correct_P, dtype=np.int64)
    if np.any(k > n_P) or k < 1:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples per problem, got {n_P.min()}")
    if np.any((c_P < 0) | (c_P > n_P)):
        raise ValueError("need 0 <= correct <= samples for every problem")
    out_P = np.ones(n_P.shape, np.float64)
    for p, (n, c) in enumerate(zip(n_P, c_P, strict=True)):
        if n - c >= k:
            out_P[p] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64))
    return out_P


def avg_at_k(correct_PxK: np.ndarray) -> Estimate:
    """avg@K: the mean accuracy over all samples, with the stderr of per-problem accuracies."""
    return mean_and_stderr(_check(correct_PxK).mean(axis=1))


def pass_at_k(correct_PxK: np.ndarray, k: int) -> Estimate:
    """pass@k averaged over problems (unbiased estimator from all ``K >= k`` samples)."""
    correct_PxK = _check(correct_PxK)
    num_samples_P = np.full(correct_PxK.shape[0], correct_PxK.shape[1])
    return mean_and_stderr(pass_at_k_per_problem(num_samples_P, correct_PxK.sum(axis=1), k))


def summarize(correct_PxK: np.ndarray) -> dict[str, float | int | dict[str, float]]:
    """``{"num_problems": P, "k": K, "avg@K": {...}, "pass@1": {...}, ..., "pass@K": {...}}``
    where each estimate is ``{"value", "stderr"}``."""
    correct_PxK = _check(correct_PxK)
    num_problems, k = correct_PxK.shape
    summary: dict[str, float | int | dict[str, float]] = {
        "num_problems": num_problems,
        "k": k,
        f"avg@{k}": avg_at_k(correct_PxK).to_dict(),
    }
    for j in range(1, k + 1):
        summary[f"pass@{j}"] = pass_at_k(correct_PxK, j).to_dict()
    return summary
