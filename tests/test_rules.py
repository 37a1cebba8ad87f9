"""The rule registry: every rule's contract, the baselines' definitions, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core

B, T, V = 3, 24, 17
LENGTHS = np.array([24, 10, 0])
CUTS = np.array([7, -1, -1], np.int32)  # the oracle's: row 0 after 7 tokens, row 1 none


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(jax.random.key(0), 3)
    z_s = jax.random.normal(keys[0], (B, T, V))
    z_t = 2.0 * jax.random.normal(keys[1], (B, T, V))
    tokens = jax.random.randint(keys[2], (B, T), 0, V)
    response = jnp.asarray(np.arange(T)[None] < LENGTHS[:, None], jnp.float32)
    stats = core.token_stats(z_s, z_t, tokens, k=16)
    return core.RuleBatch(stats, response, core.fixed_segments(response, 3), jnp.asarray(CUTS))


def test_registry_holds_the_release_rule_and_every_baseline():
    assert set(core.RULES) == {
        "release", "full", "prefix_fraction", "prefix_tokens", "ta_opd",
        "entropy", "tip", "iw_opd", "random", "oracle",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(core.RULES))
def test_every_rule_weights_only_response_tokens_and_jits(name, batch):
    key = jax.random.key(3)
    w = core.apply_rule(name, batch, key)
    assert w.shape == (B, T) and w.dtype == jnp.float32
    assert not jnp.any(w[batch.response_mask == 0])
    assert jnp.all(w >= 0)
    jitted = jax.jit(lambda b, k: core.RULES[name](b, k))(batch, key)
    np.testing.assert_allclose(jitted, w, rtol=1e-6)


@pytest.mark.parametrize("name", ["ta_opd", "entropy", "tip", "random"])
def test_ratio_rules_keep_the_ratio_and_at_least_one_token_per_response(name, batch):
    w = core.apply_rule(name, batch, jax.random.key(1), {"ratio": 0.1})
    kept = np.asarray(w.sum(-1))
    assert kept[0] >= 1 and kept[1] >= 1 and kept[2] == 0
    assert int(np.ceil(0.1 * LENGTHS.sum())) <= kept.sum() <= int(np.ceil(0.1 * LENGTHS.sum())) + 2


def test_prefix_rules_keep_leading_response_tokens(batch):
    w = core.apply_rule("prefix_fraction", batch, options={"rho": 0.25})
    np.testing.assert_array_equal(w.sum(-1), [6, 3, 0])
    assert jnp.all(w[0, :6] == 1) and jnp.all(w[0, 6:] == 0)
    w = core.apply_rule("prefix_tokens", batch, options={"n": 12})
    np.testing.assert_array_equal(w.sum(-1), [12, 10, 0])


def oracle_reference(response_mask, cut):
    """NumPy: each row's response tokens with index below its cut; all of them at cut -1."""
    w = np.zeros(response_mask.shape, np.float32)
    for b, row in enumerate(response_mask):
        positions = np.flatnonzero(row)
        keep = positions if cut[b] < 0 else positions[: cut[b]]
        w[b, keep] = 1.0
    return w


def test_oracle_keeps_the_response_tokens_before_each_rows_cut(batch):
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 6, size=5)
    lengths = rng.integers(0, 12, size=5)
    response = (np.arange(18) >= starts[:, None]) & (np.arange(18) < (starts + lengths)[:, None])
    cut = np.array([3, -1, 0, 20, 5], np.int32)  # mid-response, none, empty, past the end
    rows = core.RuleBatch(None, jnp.asarray(response, jnp.float32), None, jnp.asarray(cut))
    w = jax.jit(lambda b: core.apply_rule("oracle", b))(rows)
    np.testing.assert_array_equal(w, oracle_reference(response, cut))
    np.testing.assert_array_equal(core.RULES["oracle"](batch).sum(-1), [7, 10, 0])


def test_oracle_needs_the_cut_in_the_batch(batch):
    with pytest.raises(ValueError, match="needs each row's cut"):
        core.apply_rule("oracle", batch._replace(cut=None))


def test_iw_opd_weights_decay_from_one_plus_gamma_towards_one(batch):
    w = np.asarray(core.apply_rule("iw_opd", batch, options={"gamma": 0.5}))
    np.testing.assert_allclose(w[0, 0], 1.5)
    assert np.all(np.diff(w[0]) <= 1e-6) and w[0, -1] >= 1.0


def test_random_rule_is_deterministic_per_key_and_needs_one(batch):
    a = core.apply_rule("random", batch, jax.random.key(7))
    np.testing.assert_array_equal(a, core.apply_rule("random", batch, jax.random.key(7)))
    with pytest.raises(ValueError, match="PRNG key"):
        core.apply_rule("random", batch)


def test_rule_options_list_the_defaults_of_method_section_6():
    assert core.rule_options("prefix_fraction") == {"rho": 0.5}
    assert core.rule_options("ta_opd") == {"ratio": 0.05, "k": 16}
    assert core.rule_options("iw_opd") == {"gamma": 0.5}
    assert core.rule_options("release")["margin_kind"] == "gap"


def test_mistyped_rule_names_and_options_suggest_the_nearest(batch):
    with pytest.raises(ValueError, match="Did you mean 'release'"):
        core.apply_rule("relase", batch)
    with pytest.raises(ValueError, match="Did you mean 'ratio'"):
        core.apply_rule("entropy", batch, options={"ration": 0.2})
    with pytest.raises(ValueError, match="ratio must lie"):
        core.apply_rule("entropy", batch, options={"ratio": 2.0})
