"""Per-position statistics: hand-computed margins, and clear errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core

# One position, vocabulary 5. Student ranks ids 0 > 1 > 2 > 3 > 4; the teacher prefers 1.
STUDENT = jnp.log(jnp.array([[[0.4, 0.3, 0.2, 0.06, 0.04]]]))
TEACHER = jnp.log(jnp.array([[[0.1, 0.6, 0.05, 0.2, 0.05]]]))
Q = np.log([0.1, 0.6, 0.05, 0.2, 0.05])
S = np.log([0.4, 0.3, 0.2, 0.06, 0.04])


@pytest.mark.parametrize(
    ("kind", "k", "expected"),
    [
        ("gap", 3, Q[1] - Q[0]),
        ("mean_gap", 3, Q[1] - Q[[0, 1, 2]].mean()),
        ("advantage_spread", 3, (Q - S)[1] - (Q - S)[2]),
        ("teacher_mass", 3, 0.75),
        ("gap", 1, 0.0),
        ("teacher_mass", 5, 1.0),
    ],
)
def test_margin_kinds_match_hand_computed_values(kind, k, expected):
    margin = core.topk_margin(STUDENT, TEACHER, k=k, kind=kind)
    np.testing.assert_allclose(margin[0, 0], expected, rtol=1e-5)


def test_sampled_gap_is_signed_against_the_best_other_candidate():
    sampled_best = core.topk_margin(STUDENT, TEACHER, 3, "sampled_gap", tokens=jnp.array([[1]]))
    sampled_worse = core.topk_margin(STUDENT, TEACHER, 3, "sampled_gap", tokens=jnp.array([[2]]))
    np.testing.assert_allclose(sampled_best[0, 0], Q[1] - Q[0], rtol=1e-5)
    np.testing.assert_allclose(sampled_worse[0, 0], Q[2] - Q[1], rtol=1e-5)


def test_renormalize_only_changes_teacher_mass():
    for kind in ("gap", "mean_gap", "advantage_spread"):
        a = core.topk_margin(STUDENT, TEACHER, 3, kind)
        b = core.topk_margin(STUDENT, TEACHER, 3, kind, renormalize=True)
        np.testing.assert_allclose(a, b, rtol=1e-5)
    mass = core.topk_margin(STUDENT, TEACHER, 3, "teacher_mass", renormalize=True)
    np.testing.assert_allclose(mass, 1.0, rtol=1e-6)


def test_token_stats_are_k_sized_and_sorted_by_student_preference():
    stats = core.token_stats(STUDENT, TEACHER, jnp.array([[3]]), k=2)
    np.testing.assert_array_equal(stats.student_topk_ids[0, 0], [0, 1])
    np.testing.assert_array_equal(stats.teacher_topk_ids[0, 0], [1, 3])
    np.testing.assert_allclose(stats.student_logp[0, 0], S[3], rtol=1e-6)
    np.testing.assert_allclose(core.sampled_advantage(stats)[0, 0], Q[3] - S[3], rtol=1e-5)
    assert stats.k == 2


def test_entropy_is_normalised_to_the_unit_interval():
    uniform = jnp.zeros((1, 1, 8))
    stats = core.token_stats(uniform, uniform, jnp.zeros((1, 1), jnp.int32), k=4)
    np.testing.assert_allclose(core.topk_entropy(stats), 1.0, rtol=1e-6)
    np.testing.assert_allclose(core.topk_entropy(stats, k=1), 0.0)


def test_union_forward_kl_is_zero_when_teacher_equals_student():
    z = jax.random.normal(jax.random.key(0), (2, 3, 11))
    stats = core.token_stats(z, z, jnp.zeros((2, 3), jnp.int32), k=4)
    np.testing.assert_allclose(core.union_forward_kl(stats), 0.0, atol=1e-6)


def test_statistics_agree_under_jit():
    z_s = jax.random.normal(jax.random.key(1), (2, 6, 9))
    z_t = jax.random.normal(jax.random.key(2), (2, 6, 9))
    for kind in core.MARGIN_KINDS:
        tokens = jnp.ones((2, 6), jnp.int32)
        eager = core.topk_margin(z_s, z_t, 4, kind, tokens=tokens)
        jitted = jax.jit(lambda a, b, y, kind=kind: core.topk_margin(a, b, 4, kind, tokens=y))(
            z_s, z_t, tokens
        )
        np.testing.assert_allclose(eager, jitted, rtol=1e-6)


@pytest.mark.parametrize(
    ("student", "teacher", "tokens", "k", "message"),
    [
        ((2, 3, 5), (2, 4, 5), (2, 3), 2, "must share"),
        ((2, 3, 5), (2, 3, 6), (2, 3), 2, "same tokenizer"),
        ((2, 3, 5), (2, 3, 5), (3, 3), 2, "tokens"),
        ((2, 3, 5), (2, 3, 5), (2, 3), 6, "k=6"),
        ((2, 3, 5), (2, 3, 5), (2, 3), 0, "k=0"),
        ((3, 5), (3, 5), (3,), 2, r"\[B, T, V\]"),
    ],
)
def test_bad_shapes_and_k_are_refused_with_a_clear_message(student, teacher, tokens, k, message):
    with pytest.raises(ValueError, match=message):
        core.token_stats(jnp.zeros(student), jnp.zeros(teacher), jnp.zeros(tokens, jnp.int32), k=k)


def test_nan_logits_are_refused():
    bad = jnp.zeros((1, 2, 4)).at[0, 1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        core.token_stats(bad, jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32), k=2)
    with pytest.raises(ValueError, match="teacher_logits contains NaN"):
        core.topk_margin(jnp.zeros((1, 2, 4)), bad, k=2)


def test_float_tokens_and_unknown_kinds_are_refused():
    z = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="integer ids"):
        core.token_stats(z, z, jnp.zeros((1, 2)), k=2)
    with pytest.raises(ValueError, match="Did you mean 'gap'"):
        core.topk_margin(z, z, 2, kind="gapp")
    with pytest.raises(ValueError, match="needs the sampled tokens"):
        core.topk_margin(z, z, 2, kind="sampled_gap")
