"""`core.opd_objective`: score -> rule -> loss -> diagnostics, the same with and without jit."""

import chex
import jax
import jax.numpy as jnp
from absl.testing import parameterized

from opd_jax import core

B, T, D, V, K = 3, 10, 8, 13, 4


def _batch(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h_s, h_t = jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (B, T, D))
    w_s, w_t = jax.random.normal(k[2], (D, V)), 2 * jax.random.normal(k[3], (D, V))
    tokens = jax.random.randint(k[4], (B, T), 0, V)
    mask = jnp.ones((B, T), jnp.int32).at[1, 7:].set(0).at[2, 4:].set(0)
    return h_s, w_s, h_t, w_t, tokens, mask, core.fixed_segments(mask, 2)


def _by_hand(h_s, w_s, h_t, w_t, tokens, mask, seg, key, s: core.ObjectiveSettings):
    """The objective written out from its public parts: scores, the rule's weights, the loss."""
    scored = core.score_chunked(h_s, w_s, h_t, w_t, tokens, k=s.k, loss_kind=s.loss)
    batch = core.RuleBatch(scored.stats, mask, seg)
    capped = {"release": {"margin_k": s.k}, "ta_opd": {"k": s.k}}.get(s.rule, {})
    w = core.apply_rule(s.rule, batch, key, capped | dict(s.rule_options))
    return core.reduce_loss(scored.token_loss, w, s.reduction), w, scored


RULES = ("release", "full", "ta_opd", "iw_opd", "random")


class ObjectiveTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(rule=RULES, loss=("sampled_reverse_kl", "reverse_kl"))
    def test_is_the_rule_weighted_loss_of_the_scored_batch(self, rule, loss):
        batch, key = _batch(), jax.random.key(7)
        settings = core.ObjectiveSettings(rule=rule, loss=loss, k=K, chunk_size=7)
        value, aux = self.variant(lambda *a: core.opd_objective(*a, key, settings))(*batch)
        want_loss, want_w, scored = _by_hand(*batch, key, settings)
        chex.assert_trees_all_close(aux.weights, want_w, rtol=1e-6)
        chex.assert_trees_all_close(value, want_loss, rtol=1e-5)
        chex.assert_trees_all_close(aux.token_loss, scored.token_loss, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_is_the_gradient_of_the_composition(self):
        h_s, w_s, h_t, w_t, tokens, mask, seg = _batch(1)
        settings = core.ObjectiveSettings(rule="release", k=K)

        def loss(h, w):
            return core.opd_objective(h, w, h_t, w_t, tokens, mask, seg, None, settings)[0]

        def by_hand(h, w):
            return _by_hand(h, w, h_t, w_t, tokens, mask, seg, None, settings)[0]

        got = self.variant(jax.grad(loss, (0, 1)))(h_s, w_s)
        chex.assert_trees_all_close(got, jax.grad(by_hand, (0, 1))(h_s, w_s), rtol=1e-5)

    def test_diagnostics_follow_the_training_rule_and_the_release_cut(self):
        batch = _batch(2)
        diag = {}
        for rule in ("release", "full"):
            settings = core.ObjectiveSettings(rule=rule, k=K)
            _, aux = core.opd_objective(*batch, None, settings)
            diag[rule] = aux.diagnostics
        kept = diag["release"]
        self.assertAlmostEqual(float(kept["kept_fraction"]), float(kept["kept/release"]), places=6)
        # the margin, the cut and every compared rule's kept fraction depend on the batch only
        for name in ("margin_mean", "released_fraction", "kept/release", "kept/ta_opd"):
            self.assertAlmostEqual(
                float(diag["release"][name]), float(diag["full"][name]), places=6, msg=name
            )
        self.assertEqual(float(diag["full"]["kept_fraction"]), 1.0)
        self.assertEqual(diag["full"]["margin_by_position"].shape, (20,))
