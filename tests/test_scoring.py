"""Chunked scoring: equal to scoring the full logits, with memory bounded by the chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core
from tests.close import assert_trees_close

B, T, DS, DT, V, K = 2, 7, 6, 5, 13, 4


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    return (
        jax.random.normal(keys[0], (B, T, DS)),
        jax.random.normal(keys[1], (DS, V)),
        jax.random.normal(keys[2], (B, T, DT)),
        jax.random.normal(keys[3], (DT, V)),
        jax.random.randint(keys[4], (B, T), 0, V),
    )


def _options(loss_kind: str) -> dict[str, int]:
    """The loss's options at this test's top-K."""
    return {"k": K} if loss_kind == "topk_reverse_kl" else {}


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 14, 100])
@pytest.mark.parametrize("loss_kind", core.LOSSES)
def test_chunked_scoring_equals_full_logits(chunk_size, loss_kind):
    h_s, w_s, h_t, w_t, y = _inputs()
    scored = core.score_chunked(
        h_s, w_s, h_t, w_t, y, k=K, loss_kind=loss_kind, loss_options=_options(loss_kind),
        chunk_size=chunk_size,
    )  # fmt: skip
    full_stats = core.token_stats(h_s @ w_s, h_t @ w_t, y, k=K)
    for got, want in zip(scored.stats, full_stats, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want_loss = core.token_loss(h_s @ w_s, h_t @ w_t, y, loss_kind, **_options(loss_kind))
    np.testing.assert_allclose(scored.token_loss, want_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [3, B * T])  # rematerialised chunks; one kept whole
@pytest.mark.parametrize("loss_kind", core.LOSSES)
def test_chunked_gradients_equal_full_logit_gradients_and_skip_the_teacher(chunk_size, loss_kind):
    h_s, w_s, h_t, w_t, y = _inputs(1)
    w = (jnp.arange(T) < 5).astype(jnp.float32)[None].repeat(B, 0)

    def chunked(h_s, w_s, h_t, w_t):
        scored = core.score_chunked(
            h_s, w_s, h_t, w_t, y, k=K, loss_kind=loss_kind, loss_options=_options(loss_kind),
            chunk_size=chunk_size,
        )  # fmt: skip
        return core.reduce_loss(scored.token_loss, w)

    def full(h_s, w_s, h_t, w_t):
        loss = core.token_loss(h_s @ w_s, h_t @ w_t, y, loss_kind, **_options(loss_kind))
        return core.reduce_loss(loss, w)

    got = jax.grad(chunked, argnums=(0, 1, 2, 3))(h_s, w_s, h_t, w_t)
    want = jax.grad(full, argnums=(0, 1))(h_s, w_s, h_t, w_t)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)
    assert not jnp.any(got[2]) and not jnp.any(got[3])


def _numpy_logprobs(h, w, y):
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(y)[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk_size", [1, 4, 14, 100])
def test_chunked_token_logprobs_equal_a_numpy_log_softmax(chunk_size):
    h, w, _, _, y = _inputs(2)
    got = jax.jit(core.token_logprobs_chunked, static_argnames="chunk_size")(
        h, w, y, chunk_size=chunk_size
    )
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _numpy_logprobs(h, w, y), rtol=1e-5, atol=1e-5)


def test_chunked_token_logprob_gradients_equal_full_logit_gradients():
    h, w, _, _, y = _inputs(3)

    def full(h, w):
        return jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[..., None], -1).sum()

    got = jax.grad(lambda h, w: core.token_logprobs_chunked(h, w, y, chunk_size=3).sum(), (0, 1))
    want = jax.grad(full, (0, 1))(h, w)
    assert_trees_close(got(h, w), want)


def test_mismatched_widths_and_vocabularies_are_refused():
    h_s, w_s, h_t, w_t, y = _inputs()
    with pytest.raises(ValueError, match="does not match student_unembed"):
        core.score_chunked(h_s, w_t, h_t, w_t, y)
    with pytest.raises(ValueError, match="one tokenizer"):
        core.score_chunked(h_s, w_s, h_t, w_t[:, :-1], y, k=2)
    with pytest.raises(ValueError, match="tokens"):
        core.score_chunked(h_s, w_s, h_t, w_t, y[:1])


def test_qwen_vocabulary_at_a_length_whose_full_logits_exceed_4_gib():
    """B x T x V = 1 x 8192 x 151,936 float32 logits would take 4.6 GiB per model."""
    batch, length, vocab, width = 1, 8192, 151_936, 16
    assert batch * length * vocab * 4 > 4 * 2**30
    keys = jax.random.split(jax.random.key(0), 3)
    h_BxTxD = jax.random.normal(keys[0], (batch, length, width))
    w_DxV = 0.3 * jax.random.normal(keys[1], (width, vocab))
    y_BxT = jax.random.randint(keys[2], (batch, length), 0, vocab)

    def score(h, w, y):
        return core.score_chunked(h, w, h, 1.5 * w, y, k=16, chunk_size=256)

    compiled = jax.jit(score).lower(h_BxTxD, w_DxV, y_BxT).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30

    def loss(h, w, y):
        return core.reduce_loss(score(h, w, y).token_loss, jnp.ones(y.shape))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h_BxTxD, w_DxV, y_BxT).compile()
    assert grad.memory_analysis().temp_size_in_bytes < 2**30

    scored = compiled(h_BxTxD, w_DxV, y_BxT)
    assert scored.stats.student_topk_ids.shape == (batch, length, 16)
    assert bool(jnp.all(jnp.isfinite(scored.token_loss)))
    tail = slice(length - 3, length)  # spot-check the last (padded) chunk against full logits
    want = core.token_stats(
        h_BxTxD[:, tail] @ w_DxV, h_BxTxD[:, tail] @ (1.5 * w_DxV), y_BxT[:, tail], k=16
    )
    np.testing.assert_allclose(
        scored.stats.teacher_at_student_topk[:, tail],
        want.teacher_at_student_topk,
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_array_equal(scored.stats.student_topk_ids[:, tail], want.student_topk_ids)
