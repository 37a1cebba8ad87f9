"""Seed-level inference: paired t-test over seeds, hierarchical bootstrap, a rule's row."""

import math

import numpy as np
import pytest
from scipy import stats

from opd_jax.experiment.inference import (
    hierarchical_bootstrap,
    paired_seed_test,
    pooled_estimate,
)

# Three seeds, four problems; per-problem accuracy of each seed's run.
A = {0: [1, 1, 0, 0], 1: [1, 1, 1, 0], 2: [1, 0, 1, 0]}  # per seed: 0.5, 0.75, 0.5
B = {0: [1, 0, 0, 0], 1: [1, 1, 0, 0], 2: [0, 1, 1, 0]}  # per seed: 0.25, 0.5, 0.5


def _arrays(x, scale=1.0):
    return {s: np.asarray(v, np.float64) * scale for s, v in x.items()}


def test_paired_seed_test_matches_a_hand_computation_and_ttest_rel():
    test = paired_seed_test(_arrays(A), _arrays(B))
    # d = (1/4, 1/4, 0): mean 1/6; deviations (1/12, 1/12, -2/12), sum of squares 6/144,
    # sample variance 3/144, sd sqrt(3)/12, SE = sd / sqrt(3) = 1/12; t = (1/6) / (1/12) = 2.
    # Student's t with 2 df has F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - 2 / sqrt(6).
    assert test.seeds == (0, 1, 2)
    np.testing.assert_allclose(test.differences, [0.25, 0.25, 0.0])
    assert test.value == pytest.approx(1 / 6)
    assert test.stderr == pytest.approx(1 / 12)
    assert test.t == pytest.approx(2.0)
    assert test.df == 2
    assert test.p == pytest.approx(1 - 2 / math.sqrt(6))  # 0.1835
    assert test.note == ""
    per_seed_a = [np.mean(A[s]) for s in A]
    per_seed_b = [np.mean(B[s]) for s in B]
    reference = stats.ttest_rel(per_seed_a, per_seed_b)
    assert test.t == pytest.approx(reference.statistic)
    assert test.p == pytest.approx(reference.pvalue)
    assert test.to_dict()["n"] == 3


def test_the_quickstarts_release_against_full_is_not_significant_over_seeds():
    # The per-seed in-domain accuracies of docs/results/quickstart_full (800 problems each).
    release, full = [0.4525, 0.50125, 0.47875], [0.43, 0.465, 0.48875]
    test = paired_seed_test(
        {s: np.full(800, v) for s, v in enumerate(release)},
        {s: np.full(800, v) for s, v in enumerate(full)},
    )
    # d = (2.25, 3.625, -1.0) points: mean 1.625, deviations (0.625, 2, -2.625), sum of
    # squares 11.28125, variance 5.640625, sd 2.375, SE 2.375 / sqrt(3) = 1.37, t(2) = 1.19.
    assert test.value == pytest.approx(0.01625)
    assert test.stderr == pytest.approx(0.02375 / math.sqrt(3))
    assert test.p == pytest.approx(stats.ttest_rel(release, full).pvalue)
    assert 0.3 < test.p < 0.4


def test_only_seeds_both_rules_ran_are_paired():
    a = _arrays({0: [1, 0], 1: [1, 1], 2: [0, 0]})
    b = _arrays({1: [0, 1], 2: [0, 1], 3: [1, 1]})
    test = paired_seed_test(a, b)
    assert test.seeds == (1, 2)
    np.testing.assert_allclose(test.differences, [0.5, -0.5])
    assert hierarchical_bootstrap(a, b, resamples=50) is not None


def test_fewer_than_two_seeds_give_no_error_and_no_interval():
    one = paired_seed_test({0: np.array([1.0, 0.0])}, {0: np.array([0.0, 0.0])})
    assert one.seeds == (0,) and one.value == 0.5
    assert (one.stderr, one.t, one.df, one.p) == (None, None, None, None)
    assert one.note == "one seed: no error"
    assert hierarchical_bootstrap({0: np.ones(3)}, {0: np.zeros(3)}) is None
    none = paired_seed_test({0: np.ones(3)}, {1: np.zeros(3)})
    assert none.seeds == () and none.value is None and none.note == "no seed ran both"


def test_equal_differences_over_seeds_give_a_zero_stderr_and_no_t():
    a = _arrays({0: [1, 0], 1: [1, 1]})
    b = _arrays({0: [0, 0], 1: [1, 0]})  # d = (0.5, 0.5)
    test = paired_seed_test(a, b)
    assert test.value == 0.5 and test.stderr == 0.0 and test.df == 1
    assert test.t is None and test.p is None and "equal" in test.note


def test_problems_are_paired_within_a_seed_in_the_bootstrap():
    rng = np.random.default_rng(0)
    shifts = {0: 0.1, 1: 0.1, 2: 0.1}
    b = {s: rng.uniform(size=50) for s in shifts}
    a = {s: b[s] + shift for s, shift in shifts.items()}
    # Every problem's difference is 0.1: any paired resample has mean 0.1, however
    # different the problems are from one another.
    interval = hierarchical_bootstrap(a, b, resamples=200)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)


def test_bootstrap_over_two_constant_seeds_has_the_exact_seed_resampling_interval():
    # Problems agree within a seed, so only the seeds vary: a resample's mean is d_0, the
    # midpoint or d_1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [d_0, d_1].
    a = {0: np.full(10, 0.3), 1: np.full(10, 0.6)}
    b = {0: np.full(10, 0.2), 1: np.full(10, 0.2)}
    interval = hierarchical_bootstrap(a, b, resamples=4000, seed=3)
    assert (interval.low, interval.high) == pytest.approx((0.1, 0.4))
    assert interval.to_dict() == {
        "low": interval.low,
        "high": interval.high,
        "confidence": 0.95,
        "resamples": 4000,
        "seed": 3,
    }


def test_bootstrap_is_deterministic_under_its_seed_and_contains_the_mean():
    rng = np.random.default_rng(1)
    a = {s: (rng.uniform(size=200) < 0.5 + 0.02 * s).astype(float) for s in range(4)}
    b = {s: (rng.uniform(size=200) < 0.45).astype(float) for s in range(4)}
    mean = paired_seed_test(a, b).value
    first = hierarchical_bootstrap(a, b, seed=7)
    assert first == hierarchical_bootstrap(a, b, seed=7)
    other = hierarchical_bootstrap(a, b, seed=8)
    assert other != first
    assert other.low == pytest.approx(first.low, abs=0.02)
    assert other.high == pytest.approx(first.high, abs=0.02)
    assert first.low < mean < first.high
    narrower = hierarchical_bootstrap(a, b, seed=7, confidence=0.5)
    assert first.low < narrower.low < mean < narrower.high < first.high


def test_bootstrap_refuses_bad_settings():
    with pytest.raises(ValueError, match="confidence"):
        hierarchical_bootstrap(_arrays(A), _arrays(B), confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        hierarchical_bootstrap(_arrays(A), _arrays(B), resamples=0)


def test_pooled_estimate_gives_the_problem_stderr_and_the_sd_over_seeds():
    row = pooled_estimate(_arrays(A))
    # Pooled per problem: (1, 2/3, 2/3, 0), mean 7/12; deviations (5, 1, 1, -7)/12, sum of
    # squares 76/144, variance 76/432, SE = sqrt(76/432) / 2 = sqrt(19/432).
    # Per seed: (1/2, 3/4, 1/2), deviations (-1, 2, -1)/12, variance 3/144, sd sqrt(3)/12.
    assert row.value == pytest.approx(7 / 12)
    assert row.stderr == pytest.approx(math.sqrt(19 / 432))
    assert row.seed_sd == pytest.approx(math.sqrt(3) / 12)
    assert row.seeds == (0, 1, 2) and row.per_seed == (0.5, 0.75, 0.5)
    assert pooled_estimate({5: np.array([1.0, 0.0])}).seed_sd is None
    assert set(row.to_dict()) == {"value", "stderr", "seed_sd", "seeds", "per_seed"}


def test_seeds_over_different_problems_are_refused():
    with pytest.raises(ValueError, match="same problems"):
        paired_seed_test({0: np.ones(3), 1: np.ones(4)}, {0: np.ones(3), 1: np.ones(4)})
    with pytest.raises(ValueError, match="same problems"):
        paired_seed_test({0: np.ones(3)}, {0: np.ones(4)})
