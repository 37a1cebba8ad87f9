"""Attention kind `"splash"` (`opd_jax.models.splash`): the Pallas splash attention kernel, run
here on CPU in the Pallas interpreter (its real code path), against the masked scores and flash.
Shapes stay small: interpreted kernels are slow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.models import attention
from opd_jax.models.splash import splash_blocks
from tests.close import assert_trees_close


def _inputs(B, T, N, K, H, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((B, T, N, H), (B, T, K, H), (B, T, K, H))
    return [jax.random.normal(key, s, jnp.float32) for key, s in zip(keys, shapes, strict=True)]


def _real(T, lengths):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def masked(q, k, v, lengths):
    """The `"xla"` kernel over packed rows: causal, keys within each row's length."""
    T = q.shape[1]
    pos = jnp.arange(T)
    visible = (pos[None, :] <= pos[:, None])[None] & (pos < jnp.asarray(lengths)[:, None, None])
    return attention.attend("xla", q, k, v, visible, 0, jnp.float32)


def flash(q, k, v, lengths):
    return attention.flash_attention(q, k, v, jnp.asarray(lengths), 16)


def splash(q, k, v, lengths):
    return attention.attend("splash", q, k, v, jnp.asarray(lengths), 0, jnp.float32)


def test_blocks_pad_to_lanes_and_take_the_largest_dividing_block():
    assert splash_blocks(16) == (128, 128)
    assert splash_blocks(300) == (384, 128)
    assert splash_blocks(500) == (512, 512)
    assert splash_blocks(1100) == (1152, 128)
    assert splash_blocks(2000) == (2048, 512)


@pytest.mark.parametrize(
    "T, N, K, H, lengths",
    [(16, 4, 4, 32, [16, 9]), (40, 4, 2, 16, [33, 21]), (40, 4, 2, 16, [40, 0])],
)  # the last: a full row and an all-padding row
def test_splash_equals_masked_scores_and_flash_on_real_tokens(T, N, K, H, lengths):
    q, k, v = _inputs(len(lengths), T, N, K, H)
    out = jax.jit(splash)(q, k, v, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(out).all()  # padding queries: finite outputs nothing reads
    real = _real(T, lengths)
    for reference in (masked, flash):
        expected = np.asarray(reference(q, k, v, lengths))
        np.testing.assert_allclose(np.asarray(out)[real], expected[real], rtol=1e-5, atol=1e-5)


def test_splash_gradients_equal_the_masked_scores_and_flash():
    lengths = [37, 22]
    q, k, v = _inputs(2, 40, 4, 2, 16, seed=1)
    weight = jax.random.normal(jax.random.key(2), q.shape) * _real(40, lengths)[..., None, None]

    def grads(f):
        loss = lambda q, k, v: (f(q, k, v, lengths) * weight).sum()  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got = grads(splash)
    assert all(np.isfinite(g).all() for g in got)
    for reference in (masked, flash):
        for name, a, b in zip("qkv", grads(reference), got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_splash_is_causal_and_ignores_other_rows_padding():
    """A key/value change at position 20 moves queries >= 20 only; junk in a row's padding
    moves none of its real outputs."""
    lengths = [40, 25]
    q, k, v = _inputs(2, 40, 4, 2, 16, seed=3)
    run = jax.jit(splash)
    base = np.asarray(run(q, k, v, lengths))

    moved = np.asarray(run(q, k.at[:, 20].add(1.0), v.at[:, 20].add(1.0), lengths))
    np.testing.assert_array_equal(moved[:, :20], base[:, :20])
    assert (np.abs(moved[0, 20:] - base[0, 20:]) > 1e-6).any()

    junk = np.asarray(run(q, k.at[1, 25:].set(9.0), v.at[1, 25:].set(9.0), lengths))
    np.testing.assert_array_equal(junk[:, :25], base[:, :25])
    np.testing.assert_array_equal(junk[0], base[0])


def test_decoder_response_hidden_with_splash_equals_xla():
    from opd_jax.models import Decoder, ModelConfig
    from opd_jax.models.testing import tiny_hf_config

    model = Decoder(ModelConfig.from_hf(tiny_hf_config()), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 18), 0, 320)
    mask = jnp.ones((2, 18), jnp.int32).at[0, :3].set(0).at[1, :7].set(0)  # left-padded prompts

    def loss(p, kind):
        h = nnx.merge(graphdef, p).response_hidden(tokens, mask, 8, attention=kind)
        return (h**2).mean(), h

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (xla_loss, h_xla), g_xla = grad(params, "xla")
    (splash_loss, h_splash), g_splash = grad(params, "splash")
    np.testing.assert_allclose(h_splash, h_xla, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(splash_loss, xla_loss, rtol=1e-6)
    assert_trees_close(g_splash, g_xla)


def test_auto_is_splash_on_tpu_only_and_splash_refuses_query_chunks(monkeypatch):
    assert attention.resolve_attention("splash", (jnp.float32,)) == "splash"  # interpreted
    assert attention.resolve_attention("auto", (jnp.bfloat16,)) == "flash"
    with pytest.raises(ValueError, match="not 'splash'"):
        attention.resolve_attention("splash", (jnp.float32,), query_chunk=64)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention.resolve_attention("auto", (jnp.bfloat16,)) == "splash"
    assert attention.resolve_attention("auto", (jnp.float32,), query_chunk=64) == "flash"
