"""OPD losses: zero at agreement, the reductions, and the policy-gradient form's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core
from tests.close import assert_trees_close

B, T, V = 2, 5, 7
OPTIONS = {"topk_reverse_kl": {"k": 3}}  # a top-K below V


def _logits(seed):
    return jax.random.normal(jax.random.key(seed), (B, T, V))


@pytest.mark.parametrize("kind", core.LOSSES)
def test_every_loss_vanishes_when_the_student_matches_the_teacher(kind):
    z = _logits(0)
    tokens = jnp.zeros((B, T), jnp.int32)
    loss = core.token_loss(z, z, tokens, kind, **OPTIONS.get(kind, {}))
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "topk_reverse_kl"])
def test_divergences_are_positive_when_they_disagree(kind):
    tokens = jnp.zeros((B, T), jnp.int32)
    loss = core.token_loss(_logits(0), _logits(1), tokens, kind, **OPTIONS.get(kind, {}))
    assert jnp.all(loss > 0)


def test_sampled_reverse_kl_gradient_is_minus_advantage_times_score():
    z_s, z_t = _logits(0), _logits(1)
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    w = jnp.array([[1.0, 1, 1, 0, 0], [1, 0.5, 0, 0, 0]])
    grad = jax.grad(lambda z: core.reduce_loss(core.token_loss(z, z_t, tokens), w))(z_s)
    s, q = jax.nn.log_softmax(z_s), jax.nn.log_softmax(z_t)
    onehot = jax.nn.one_hot(tokens, V)
    adv = (q * onehot).sum(-1) - (s * onehot).sum(-1)
    want = -(w * adv)[..., None] * (onehot - jnp.exp(s)) / w.sum()
    assert_trees_close(grad, want, rtol=1e-5)  # closed form: no long reduction


def test_token_and_sequence_means():
    loss = jnp.array([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    w = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(core.reduce_loss(loss, w), 16.0 / 4)
    np.testing.assert_allclose(core.reduce_loss(loss, w, "sequence_mean"), (2.0 + 10.0) / 2)
    zero = jnp.zeros_like(w)
    for reduction in core.REDUCTIONS:
        assert float(core.reduce_loss(loss, zero, reduction)) == 0.0
        assert not jnp.any(
            jnp.isnan(jax.grad(lambda x, r=reduction: core.reduce_loss(x, zero, r))(loss))
        )


def test_bad_loss_options_are_refused():
    z = _logits(0)
    tokens = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        core.token_loss(z, z, tokens, "jsd", beta=1.0)
    with pytest.raises(ValueError, match="Did you mean 'forward_kl'"):
        core.token_loss(z, z, tokens, "forward_k")
    with pytest.raises(ValueError, match="option of loss 'jsd' 'bta'.*Did you mean 'beta'"):
        core.token_loss(z, z, tokens, "jsd", bta=0.5)
    with pytest.raises(ValueError, match="loss 'reverse_kl' takes no options, got 'beta'"):
        core.token_loss(z, z, tokens, "reverse_kl", beta=0.5)
    with pytest.raises(ValueError, match="same shape"):
        core.reduce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="Did you mean 'token_mean'"):
        core.reduce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "token_means")
