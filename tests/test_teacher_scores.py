"""Scoring with the teacher's scores kept from sampling equals scoring with its hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core

B, T, D, V, K = 3, 10, 8, 37, 5


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    h_s = jax.random.normal(keys[0], (B, T, D))
    h_t = jax.random.normal(keys[1], (B, T, D))
    w_s, w_t = jax.random.normal(keys[2], (D, V)), jax.random.normal(keys[3], (D, V))
    tokens = jax.random.randint(keys[4], (B, T), 0, V)
    return h_s, w_s, h_t, w_t, tokens


def _given(h_s, w_s, h_t, w_t, tokens):
    """What sampling keeps: the student's candidates from its logits, the teacher's side."""
    ids = jax.lax.top_k(core.stats.canonical_zeros(h_s @ w_s), K)[1]
    return core.teacher_scores_from_logits(ids, h_t @ w_t, tokens)


@pytest.mark.parametrize("chunk_size", [7, 1024])  # several chunks (rematerialised), one
def test_given_teacher_scores_give_the_statistics_loss_and_gradient_of_its_hidden_states(
    chunk_size,
):
    h_s, w_s, h_t, w_t, tokens = _inputs()
    given = _given(h_s, w_s, h_t, w_t, tokens)
    kw = dict(loss_kind="sampled_reverse_kl", chunk_size=chunk_size)

    def both(h):
        want = core.score_chunked(h, w_s, h_t, w_t, tokens, k=K, **kw)
        got = core.score_given_teacher(h, w_s, given, tokens, **kw)
        return want, got

    want, got = both(h_s)
    # the same float32 operations on the same logits, gathered in another order: rounding
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda h, i=i: both(h)[i].token_loss.sum())(h_s) for i in (0, 1)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_the_objective_with_given_scores_equals_the_objective_with_the_teacher():
    h_s, w_s, h_t, w_t, tokens = _inputs(1)
    response = jnp.ones((B, T), jnp.int32).at[1, 6:].set(0)
    seg = jnp.where(response > 0, jnp.arange(T) // 3, -1)
    settings = core.ObjectiveSettings(rule="release", loss="sampled_reverse_kl", k=K)
    rows = (tokens, response, seg, None, settings)
    want, want_aux = core.opd_objective(h_s, w_s, h_t, w_t, *rows)
    given = _given(h_s, w_s, h_t, w_t, tokens)
    got, got_aux = core.opd_objective_given_teacher(h_s, w_s, given, *rows)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got_aux.weights, want_aux.weights)


def test_a_loss_that_needs_the_teachers_distribution_is_refused():
    h_s, w_s, h_t, w_t, tokens = _inputs()
    given = _given(h_s, w_s, h_t, w_t, tokens)
    with pytest.raises(ValueError, match="reverse_kl"):
        core.score_given_teacher(h_s, w_s, given, tokens, loss_kind="reverse_kl")
