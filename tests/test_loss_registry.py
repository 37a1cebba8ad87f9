"""A loss is one function in ``core.LOSSES``: its options come from its signature, and the
config, the scorer and the objective take a new one with nothing else changed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core
from opd_jax.config import ConfigError, config_from_dict, load_config
from opd_jax.core import losses
from opd_jax.trajectory import trajectory_changes

PATHS = ["student.path=s", "teacher.path=t"]  # never loaded: load_config only checks


def scaled(z_s, z_t, tokens, *, scale: float = 1.0):
    """A toy loss: ``scale`` times the sampled reverse KL; refuses a negative scale."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}.")
    return scale * losses.sampled_reverse_kl(z_s, z_t, tokens)


@pytest.fixture
def toy_loss(monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "scaled", scaled)
    return "scaled"


def _batch(seed=0, B=2, T=6, D=5, V=11):
    k = jax.random.split(jax.random.key(seed), 5)
    h_s, h_t = jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (B, T, D))
    w_s, w_t = jax.random.normal(k[2], (D, V)), jax.random.normal(k[3], (D, V))
    tokens = jax.random.randint(k[4], (B, T), 0, V)
    mask = jnp.ones((B, T), jnp.int32).at[1, 4:].set(0)
    return h_s, w_s, h_t, w_t, tokens, mask, core.fixed_segments(mask, 2)


def test_a_registered_loss_is_called_by_name_with_its_own_option(toy_loss):
    assert core.loss_options(toy_loss) == {"scale": 1.0}
    z_s, z_t = jax.random.normal(jax.random.key(1), (2, 2, 3, 7))
    tokens = jnp.zeros((2, 3), jnp.int32)
    want = 2.5 * core.token_loss(z_s, z_t, tokens)
    np.testing.assert_allclose(core.token_loss(z_s, z_t, tokens, toy_loss, scale=2.5), want)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        core.check_loss(toy_loss, {"scale": -1.0})


def test_the_objective_trains_on_a_registered_loss(toy_loss):
    batch, key = _batch(), jax.random.key(0)
    base = core.ObjectiveSettings(rule="full", k=4)
    toy = core.ObjectiveSettings(rule="full", k=4, loss=toy_loss, loss_options=(("scale", 3.0),))
    want, _ = core.opd_objective(*batch, key, base)
    got, aux = jax.jit(lambda *a: core.opd_objective(*a, key, toy))(*batch)
    np.testing.assert_allclose(got, 3.0 * want, rtol=1e-6)
    grad = jax.grad(lambda w: core.opd_objective(batch[0], w, *batch[2:], key, toy)[0])(batch[1])
    assert jnp.all(jnp.isfinite(grad)) and jnp.any(grad != 0)


def test_the_config_takes_a_registered_loss_and_checks_its_options(toy_loss):
    config = load_config(None, [*PATHS, f"loss.kind={toy_loss}", "loss.options.scale=2"])
    assert config.loss.options == {"scale": 2.0}  # an int read as the default's float
    with pytest.raises(ConfigError, match="Did you mean 'loss.options.scale'"):
        load_config(None, [*PATHS, f"loss.kind={toy_loss}", "loss.options.scal=2"])
    with pytest.raises(ConfigError, match="loss.options: scale must be >= 0, got -1"):
        load_config(None, [*PATHS, f"loss.kind={toy_loss}", "loss.options.scale=-1"])


def test_jsd_takes_beta_as_its_option_and_refuses_the_limits():
    config = load_config(None, [*PATHS, "loss.kind=jsd", "loss.options.beta=0.25"])
    assert config.loss.options == {"beta": 0.25}
    with pytest.raises(ConfigError, match="jsd needs 0 < beta < 1, got beta=1"):
        load_config(None, [*PATHS, "loss.kind=jsd", "loss.options.beta=1"])
    with pytest.raises(ConfigError, match="loss 'forward_kl' has no option 'beta'"):
        load_config(None, [*PATHS, "loss.kind=forward_kl", "loss.options.beta=0.5"])


def test_an_older_runs_global_beta_becomes_the_losss_option():
    old = {"loss": {"kind": "jsd", "reduction": "token_mean", "beta": 0.3}}
    assert config_from_dict(old).loss.options == {"beta": 0.3}
    old_default = {"loss": {"kind": "sampled_reverse_kl", "reduction": "token_mean", "beta": 0.5}}
    assert config_from_dict(old_default).loss.options == {}
    now = config_from_dict({}).to_dict()
    assert trajectory_changes(old_default, now) == {}  # resuming an older run changes nothing
    changed = load_config(None, [*PATHS, "loss.kind=jsd", "loss.beta=0.3"])  # old overrides
    assert changed.loss.options == {"beta": 0.3}
