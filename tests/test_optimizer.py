"""The run's optimizer: global-norm clipping as optax defines it, without a copy of the gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from opd_jax.config import OptimConfig
from opd_jax.train.optimizer import clip_by_global_norm, make_optimizer


def _grads(scale: float) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    shapes = {"embed": (64, 16), "w": (16, 32), "b": (32,)}
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, 30.0, np.inf, np.nan])
def test_clipping_equals_optax_clip_by_global_norm(scale):
    grads = _grads(scale)
    ours, _ = clip_by_global_norm(2.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)  # (g / n) * m against g * (m / n)


def test_clipped_gradient_has_the_limit_as_its_norm():
    clipped, _ = clip_by_global_norm(2.0).update(_grads(10.0), optax.EmptyState())
    # float32 sums of 1,568 squares, scaled: a few units of sqrt(n) * eps
    assert float(optax.tree.norm(clipped)) == pytest.approx(2.0, rel=2e-5)


def test_clipping_state_is_optax_s_so_checkpoints_load_either_way():
    params = _grads(1.0)
    ours = clip_by_global_norm(1.0).init(params)
    theirs = optax.clip_by_global_norm(1.0).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)


def test_clipped_adamw_update_writes_no_copy_of_the_gradient():
    """The clipping factor fuses into both moments' updates: the compiled update of donated
    state needs no temporary buffer the size of the gradient (optax's division needs one)."""
    tx = make_optimizer(OptimConfig(clip_norm=1.0, weight_decay=0.1), steps=10)
    params = {f"w{i}": jnp.ones((256, 1024)) for i in range(4)}
    grads = jax.tree.map(lambda p: p * 3.0, params)

    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = (
        jax.jit(update, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
    )
    memory = compiled.memory_analysis()
    assert memory is not None, "XLA gave no memory analysis for the compiled program"
    gradient_bytes = sum(g.nbytes for g in jax.tree.leaves(grads))
    assert memory.temp_size_in_bytes < gradient_bytes // 8
