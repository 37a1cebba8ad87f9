"""The decoder's projections: the MLP's gated down projection and what its backward keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models.projections import after, dense, swiglu_down


def _plain(gate, up, down):
    return dense(jax.nn.silu(gate) * up, down)


def _inputs(dtype, B=2, T=5, F=8, D=4):
    k = jax.random.split(jax.random.key(0), 4)
    gate = 3 * jax.random.normal(k[0], (B, T, F))  # both tails of silu
    up, down = jax.random.normal(k[1], (B, T, F)), jax.random.normal(k[2], (F, D))
    probe = jax.random.normal(k[3], (B, T, D))
    return *(x.astype(dtype) for x in (gate, up, down)), probe


# a few roundings apart in a different order: ~80 float32 ulps, ~8 bfloat16 ulps (eps 2**-8)
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_swiglu_down_and_its_gradients_equal_jax_differentiation(dtype, tol):
    gate, up, down, probe = _inputs(dtype)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)) * probe)  # noqa: E731
    np.testing.assert_allclose(
        swiglu_down(gate, up, down).astype(jnp.float32),
        _plain(gate, up, down).astype(jnp.float32), rtol=tol, atol=tol,
    )  # fmt: skip
    ours = jax.grad(loss(swiglu_down), (0, 1, 2))(gate, up, down)
    theirs = jax.grad(loss(_plain), (0, 1, 2))(gate, up, down)
    for a, b, x in zip(ours, theirs, (gate, up, down), strict=True):
        assert a.dtype == x.dtype and a.shape == x.shape
        scale = float(jnp.abs(b.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            a.astype(jnp.float32), b.astype(jnp.float32), rtol=tol, atol=tol * scale
        )


def test_after_keeps_the_value_and_waits_for_its_dependence():
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((4, 5))
    np.testing.assert_array_equal(jax.jit(after)(x, y), x)
    # compiled, the result still depends on y: XLA did not simplify the product away
    assert jnp.isnan(jax.jit(after)(x, y.at[0, 0].set(jnp.nan))).all()


def _mlp_stack_temp_bytes(layer) -> tuple[int, int]:
    """XLA's temporary bytes for the gradient of 8 SwiGLU MLPs in sequence, and the bytes of
    one [rows, F] array for each of them."""
    layers, rows, D, F = 8, 256, 64, 512
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (1, rows, D))
    ws = [jax.random.normal(k[i + 1], (layers, *s)) / 10 for i, s in enumerate(
        [(D, F), (D, F), (F, D)])]  # fmt: skip

    def loss(ws, x):
        for i in range(layers):
            x = x + layer(dense(x, ws[0][i]), dense(x, ws[1][i]), ws[2][i])
        return jnp.sum(x * x)

    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    memory = compiled.memory_analysis()
    assert memory is not None, "XLA gave no memory analysis for the compiled program"
    return memory.temp_size_in_bytes, layers * rows * F * 4


def test_backward_keeps_only_gate_and_up_of_each_layer():
    """JAX's differentiation keeps five [rows, F] arrays a layer for the backward (gate, up,
    sigmoid, silu, their product); swiglu_down two, its recomputation not hoisted forward."""
    ours, per_layer_array = _mlp_stack_temp_bytes(swiglu_down)
    theirs, _ = _mlp_stack_temp_bytes(_plain)
    assert ours < 3.5 * per_layer_array  # 2 a layer, with the residual stream and transients
    assert theirs > 4.5 * per_layer_array
