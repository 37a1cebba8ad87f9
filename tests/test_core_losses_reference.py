"""`opd_jax.core` per-token losses, their reductions and gradients, and chunked scoring against
the NumPy reference (tests/reference_losses.py, docs/method.md §5).

Every test draws small random problems (tests/core_strategies.py) and compares the float32
implementation with the float64 reference at rtol = atol = 1e-5; discrete outputs must match
exactly, except where the reference itself reports a float32 near-tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import opd_jax.core as core
from tests import reference_basics, reference_losses, reference_stats
from tests.core_strategies import (
    FAST,
    SHAPES,
    SLOW,
    close,
    k_choices,
    no_near_ties,
    problems,
)

# --------------------------------------------------------------------------- losses
LOSS_SHAPES = [(1, 1, 1), (2, 5, 9), (3, 12, 4)]


def own_options(kind, beta, k):
    """The options of ``kind`` among the reference's ``beta`` and ``k``."""
    return {"jsd": {"beta": beta}, "topk_reverse_kl": {"k": k}}.get(kind, {})


@FAST
@given(p=problems(LOSS_SHAPES), data=st.data())
def test_token_loss_matches_reference_for_every_kind(p, data):
    kind = data.draw(st.sampled_from(reference_losses.LOSS_KINDS))
    beta = data.draw(st.sampled_from([0.1, 0.5, 0.9]))
    k = data.draw(st.sampled_from(k_choices(p["V"])))
    got = core.token_loss(
        jnp.asarray(p["zs"]),
        jnp.asarray(p["zt"]),
        jnp.asarray(p["tokens"]),
        kind,
        **own_options(kind, beta, k),
    )
    want = reference_losses.token_loss(p["zs"], p["zt"], p["tokens"], kind, beta=beta, k=k)
    assert np.asarray(got).shape == (p["B"], p["T"])
    close(got, want, msg=f"{kind} beta={beta} k={k}")


@st.composite
def weights(draw, B, T):
    """Hard, soft (IW-OPD-like) or all-zero weights, with some zero rows."""
    kind = draw(st.sampled_from(["hard", "soft", "zero"]))
    if kind == "zero":
        return np.zeros((B, T), np.float32)
    if kind == "hard":
        return draw(hnp.arrays(bool, (B, T))).astype(np.float32)
    return draw(hnp.arrays(np.float32, (B, T), elements=st.sampled_from([0.0, 0.25, 1.0, 1.5])))


@FAST
@given(data=st.data())
def test_reduce_loss_token_and_sequence_means_never_nan(data):
    B, T, _ = data.draw(st.sampled_from(SHAPES))
    loss = data.draw(hnp.arrays(np.float32, (B, T), elements=st.floats(-10, 10, width=32)))
    w = data.draw(weights(B, T))
    for reduction in ("token_mean", "sequence_mean"):
        got = core.reduce_loss(jnp.asarray(loss), jnp.asarray(w), reduction)
        assert np.isfinite(np.asarray(got)), reduction
        close(got, reference_losses.reduce_loss(loss, w, reduction), msg=reduction)


def test_sequence_mean_averages_rows_with_weight_only():
    loss = jnp.asarray([[1.0, 3.0, 100.0], [5.0, 5.0, 5.0], [7.0, 7.0, 7.0]])
    w = jnp.asarray([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    close(core.reduce_loss(loss, w, "sequence_mean"), (2.0 + 5.0) / 2)
    close(core.reduce_loss(loss, w, "token_mean"), (1.0 + 3.0 + 5.0) / 3)
    close(core.reduce_loss(loss, jnp.zeros_like(w), "token_mean"), 0.0)
    close(core.reduce_loss(loss, jnp.zeros_like(w), "sequence_mean"), 0.0)


GRAD_SHAPES = [(1, 1, 4), (1, 5, 4), (2, 5, 9)]


def reference_objective(zs, zt, tokens, w, kind, beta, k, reduction, advantage=None):
    return reference_losses.reduce_loss(
        reference_losses.token_loss(zs, zt, tokens, kind, beta=beta, k=k, advantage=advantage),
        w,
        reduction,
    )


def finite_difference_grad(f, z, h=1e-6):
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


def topk_boundary_is_clear(zs, k, gap=1e-3):
    s = np.sort(reference_basics.log_softmax(zs), axis=-1)[..., ::-1]
    return k == zs.shape[-1] or bool(np.all(s[..., k - 1] - s[..., k] > gap))


@pytest.mark.parametrize("kind", reference_losses.LOSS_KINDS)
@settings(SLOW, max_examples=3)
@given(p=problems(GRAD_SHAPES), data=st.data())
def test_loss_gradient_wrt_student_logits_matches_finite_differences(kind, p, data):
    reduction = data.draw(st.sampled_from(["token_mean", "sequence_mean"]))
    beta = data.draw(st.sampled_from([0.1, 0.5, 0.9]))
    k = data.draw(st.sampled_from(k_choices(p["V"])))
    if kind == "topk_reverse_kl":
        assume(topk_boundary_is_clear(p["zs"], k))
    w = data.draw(weights(p["B"], p["T"]))
    zs, zt = p["zs"].astype(np.float64), p["zt"].astype(np.float64)
    # sampled_reverse_kl: the advantage is a stop-gradient, held at its current value
    adv = (
        reference_stats.sampled_advantage(zs, zt, p["tokens"])
        if kind == "sampled_reverse_kl"
        else None
    )
    want = finite_difference_grad(
        lambda z: reference_objective(z, zt, p["tokens"], w, kind, beta, k, reduction, adv), zs
    )
    with jax.enable_x64(True):

        def objective(z):
            loss = core.token_loss(
                z, jnp.asarray(zt), jnp.asarray(p["tokens"]), kind, **own_options(kind, beta, k)
            )
            return core.reduce_loss(loss, jnp.asarray(w, jnp.float64), reduction)

        got = np.asarray(jax.grad(objective)(jnp.asarray(zs)), np.float64)
    close(got, want, rtol=1e-4, atol=1e-6, msg=f"{kind} {reduction} beta={beta} k={k}")


@SLOW
@given(p=problems(GRAD_SHAPES), data=st.data())
def test_sampled_reverse_kl_gradient_is_the_policy_gradient_with_fixed_advantage(p, data):
    w = data.draw(weights(p["B"], p["T"]))
    w[0, 0] = max(w[0, 0], 1.0)  # token_mean needs some weight
    zs, zt = p["zs"].astype(np.float64), p["zt"].astype(np.float64)
    A = reference_stats.sampled_advantage(zs, zt, p["tokens"])
    onehot = np.eye(p["V"])[p["tokens"]]
    probs = np.exp(reference_basics.log_softmax(zs))
    want = -(w * A)[..., None] * (onehot - probs) / w.sum()
    with jax.enable_x64(True):

        def objective(z):
            loss = core.token_loss(
                z, jnp.asarray(zt), jnp.asarray(p["tokens"]), "sampled_reverse_kl"
            )
            return core.reduce_loss(loss, jnp.asarray(w, jnp.float64), "token_mean")

        got = np.asarray(jax.grad(objective)(jnp.asarray(zs)), np.float64)
    close(got, want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- chunked scoring
@settings(SLOW, max_examples=6)
@given(data=st.data())
def test_score_chunked_equals_token_stats_and_token_loss_on_full_logits(data):
    B, T, V = data.draw(st.sampled_from([(2, 5, 9), (3, 12, 4)]))
    Ds, Dt = 3, 2
    ints = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))

    def draw_array(shape):
        if ints:  # integer logits: exact in float32, with exact ties
            return rng.integers(-2, 3, shape).astype(np.float32)
        return rng.normal(0, 1, shape).astype(np.float32)

    hs, us = draw_array((B, T, Ds)), draw_array((Ds, V))
    ht, ut = draw_array((B, T, Dt)), draw_array((Dt, V))
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    zs = hs.astype(np.float64) @ us
    zt = ht.astype(np.float64) @ ut
    if not ints:
        assume(no_near_ties(zs) and no_near_ties(zt))
    k = data.draw(st.sampled_from(k_choices(V)))
    kind = data.draw(st.sampled_from(reference_losses.LOSS_KINDS))
    chunk = data.draw(st.sampled_from([1, 3, 7, 64]))
    out = core.score_chunked(
        jnp.asarray(hs),
        jnp.asarray(us),
        jnp.asarray(ht),
        jnp.asarray(ut),
        jnp.asarray(tokens),
        k=k,
        loss_kind=kind,
        loss_options=own_options(kind, 0.5, k),
        chunk_size=chunk,
    )
    want = reference_stats.token_stats(zs, zt, tokens, k)
    for name in reference_stats.TOKEN_STATS_FIELDS:
        got = np.asarray(getattr(out.stats, name))
        if want[name].dtype.kind == "i":
            np.testing.assert_array_equal(got, want[name], err_msg=f"{name} chunk={chunk}")
        else:
            close(got, want[name], msg=f"{name} chunk={chunk}")
    close(
        out.token_loss,
        reference_losses.token_loss(zs, zt, tokens, kind, beta=0.5, k=k),
        msg=f"{kind} chunk={chunk}",
    )
    unchunked = core.token_loss(
        jnp.asarray(zs, jnp.float32),
        jnp.asarray(zt, jnp.float32),
        jnp.asarray(tokens),
        kind,
        **own_options(kind, 0.5, k),
    )
    close(out.token_loss, np.asarray(unchunked, np.float64), msg="vs core.token_loss")
