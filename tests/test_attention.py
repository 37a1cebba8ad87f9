"""The attention kernels (`opd_jax.models.attention`) against a NumPy softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import attention


def numpy_causal_attention(q, k, v, lengths):
    """`softmax(q k^T / sqrt(H))` over keys `s <= t`, `s < length`; `[B, T, N, H]`, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # head n uses kv head n // G
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    pos = np.arange(T)
    visible = (pos[None, :] <= pos[:, None])[None] & (pos < np.asarray(lengths)[:, None, None])
    scores = np.where(visible[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def _inputs(B, T, N, K, H, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((B, T, N, H), (B, T, K, H), (B, T, K, H))
    return [jax.random.normal(key, s, dtype) for key, s in zip(keys, shapes, strict=True)]


def _real(T, lengths):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


@pytest.mark.parametrize(
    "T, block, lengths",
    [
        (45, 8, [45, 30]),
        (45, 16, [1, 44]),
        (64, 16, [64, 64]),
        (20, 256, [20, 7]),
        (64, 16, [20, 7]),
    ],  # the last: key blocks past the longest row are skipped
)
@pytest.mark.parametrize("N, K", [(4, 2), (3, 3), (4, 1)])
def test_flash_attention_equals_numpy_on_real_tokens(T, block, lengths, N, K):
    q, k, v = _inputs(len(lengths), T, N, K, 16)
    out = jax.jit(attention.flash_attention, static_argnums=4)(q, k, v, jnp.array(lengths), block)
    real = _real(T, lengths)
    expected = numpy_causal_attention(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, block, shorter", [(45, 8, 12), (33, 64, 12), (64, 8, 40)])
def test_flash_attention_gradients_equal_the_masked_scores(T, block, shorter):
    """Its own VJP (one blockwise pass) against autodiff through the masked scores."""
    lengths = jnp.array([T - shorter // 2, T - shorter])
    q, k, v = _inputs(2, T, 4, 2, 16, seed=1)
    weight = jax.random.normal(jax.random.key(2), q.shape) * _real(T, lengths)[..., None, None]
    pos = jnp.arange(T)
    visible = (pos[None, :] <= pos[:, None])[None] & (pos < lengths[:, None, None])

    def masked(q, k, v):
        out = attention.masked_attention(q.reshape(2, T, 2, 2, 16), k, v, visible, jnp.float32)
        return out.reshape(q.shape)

    def flash(q, k, v):
        return attention.flash_attention(q, k, v, lengths, block)

    grads = [
        jax.jit(jax.grad(lambda *a, f=f: (f(*a) * weight).sum(), argnums=(0, 1, 2)))(q, k, v)
        for f in (masked, flash)
    ]
    for name, a, b in zip("qkv", *grads, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_flash_attention_real_outputs_ignore_padding_and_padding_outputs_are_finite():
    """Only the diagonal block is masked: junk in a row's padding moves none of its real
    outputs (causality), and padding queries, which attend over it, stay finite."""
    lengths = jnp.array([40, 25])
    q, k, v = _inputs(2, 40, 4, 2, 16, seed=3)
    run = jax.jit(attention.flash_attention, static_argnums=4)
    base = np.asarray(run(q, k, v, lengths, 16))
    junk = np.asarray(run(q, k.at[1, 25:].set(9.0), v.at[1, 25:].set(9.0), lengths, 16))
    np.testing.assert_array_equal(junk[:, :25], base[:, :25])
    np.testing.assert_array_equal(junk[0], base[0])
    assert np.isfinite(junk).all()


def test_flash_attention_keeps_bfloat16_and_stays_close():
    q, k, v = _inputs(1, 40, 4, 2, 16, dtype=jnp.bfloat16)
    out = attention.flash_attention(q, k, v, jnp.array([40]), 16)
    assert out.dtype == jnp.bfloat16
    expected = numpy_causal_attention(q, k, v, [40])
    np.testing.assert_allclose(np.float32(out), expected, atol=0.05)


def test_flash_attention_of_an_empty_row_is_finite():
    q, k, v = _inputs(1, 12, 2, 1, 8)
    out, grads = jax.value_and_grad(
        lambda q: attention.flash_attention(q, k, v, jnp.array([0]), 4).sum()
    )(q)
    assert np.isfinite(out) and np.isfinite(grads).all()


def test_auto_attention_off_gpu_is_flash_and_cudnn_is_refused():
    assert attention.resolve_attention("auto", (jnp.float32,)) == "flash"
    assert attention.resolve_attention("xla", (jnp.float32,)) == "xla"
    with pytest.raises(ValueError, match="'cudnn' needs a CUDA GPU and bfloat16/float16"):
        attention.resolve_attention("cudnn", (jnp.bfloat16,))
    with pytest.raises(ValueError, match="attention must be 'auto' or one of"):
        attention.resolve_attention("ring", (jnp.bfloat16,))
