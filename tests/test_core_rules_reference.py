"""`opd_jax.core` token-selection rules and every default against the NumPy reference
(tests/reference_rules.py, docs/method.md §6).

Every test draws small random problems (tests/core_strategies.py) and compares the float32
implementation with the float64 reference at rtol = atol = 1e-5; discrete outputs must match
exactly, except where the reference itself reports a float32 near-tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import opd_jax.core as core
from tests import reference_losses, reference_release, reference_rules, reference_stats
from tests.core_strategies import (
    CHANGEPOINT_OPTIONS,
    FAST,
    SLOW,
    as_mask_dtype,
    close,
    k_choices,
    make_stats,
    problems,
    ref_batch,
)

# --------------------------------------------------------------------------- rules
RULE_NAMES = (
    "release",
    "full",
    "prefix_fraction",
    "prefix_tokens",
    "ta_opd",
    "entropy",
    "tip",
    "random",
    "iw_opd",
)


def rule_batch(p, K, mdtype="bool"):
    return core.RuleBatch(
        stats=make_stats(p, K),
        response_mask=jnp.asarray(as_mask_dtype(p["mask"], mdtype)),
        seg=jnp.asarray(p["seg"]),
    )


def call_rule(name, p, K, key=0, mdtype="bool", **options):
    w = core.RULES[name](rule_batch(p, K, mdtype), jax.random.key(key), **options)
    w = np.asarray(w)
    assert w.shape == (p["B"], p["T"]) and w.dtype == np.float32, name
    return w.astype(np.float64)


def test_rules_registry_names_every_rule_of_method_section_6():
    assert set(RULE_NAMES) <= set(core.RULES)


@FAST
@given(p=problems(), mdtype=st.sampled_from(["bool", "float"]))
def test_full_rule_is_the_response_mask(p, mdtype):
    w = call_rule("full", p, 1, mdtype=mdtype)
    np.testing.assert_array_equal(w, reference_rules.rule_full(ref_batch(p)))


@FAST
@given(
    p=problems(),
    rho=st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0]),
    mdtype=st.sampled_from(["bool", "float"]),
)
def test_prefix_fraction_keeps_the_first_ceil_rho_L_response_tokens(p, rho, mdtype):
    w = call_rule("prefix_fraction", p, 1, mdtype=mdtype, rho=rho)
    np.testing.assert_array_equal(w, reference_rules.rule_prefix_fraction(ref_batch(p), rho=rho))


@pytest.mark.parametrize("rho, kept", [(0.07, [7, 4]), (0.14, [14, 7]), (0.3, [30, 15])])
def test_prefix_fraction_ceil_forgives_float_rounding(rho, kept):
    """ceil(rho * L - 1e-3): 0.07 * 100 is 7.000000000000001 in float64 and 0.3 * 50 is
    15.000001 in float32; they keep 7 and 15 tokens, not one more."""
    T = 100
    mask = np.zeros((2, T), bool)
    mask[0, :] = True  # L = 100
    mask[1, 0:50] = True  # L = 50
    seg = np.where(mask, 0, -1).astype(np.int32)
    zs = np.zeros((2, T, 1), np.float32)
    p = {
        "B": 2,
        "T": T,
        "V": 1,
        "zs": zs,
        "zt": zs,
        "tokens": np.zeros((2, T), np.int32),
        "mask": mask,
        "seg": seg,
    }
    w = call_rule("prefix_fraction", p, 1, rho=rho)
    assert w.sum(axis=1).tolist() == kept
    np.testing.assert_array_equal(w, reference_rules.rule_prefix_fraction(ref_batch(p), rho=rho))


@FAST
@given(
    p=problems(),
    n=st.sampled_from([0, 1, 3, 7, 100]),
    mdtype=st.sampled_from(["bool", "float"]),
)
def test_prefix_tokens_keeps_the_first_n_response_tokens(p, n, mdtype):
    w = call_rule("prefix_tokens", p, 1, mdtype=mdtype, n=n)
    np.testing.assert_array_equal(w, reference_rules.rule_prefix_tokens(ref_batch(p), n=n))


@FAST
@given(
    p=problems(),
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
    mdtype=st.sampled_from(["bool", "float"]),
)
def test_iw_opd_weights_decay_with_cumulative_absolute_advantage(p, gamma, mdtype):
    w = call_rule("iw_opd", p, 1, mdtype=mdtype, gamma=gamma)
    want = reference_rules.rule_iw_opd(ref_batch(p), gamma=gamma)
    r = p["mask"].astype(np.float64)
    for b in range(p["B"]):
        # always: soft weights between r and (1 + gamma) r, zero off the response
        assert np.all(w[b] >= r[b] - 1e-6) and np.all(w[b] <= (1 + gamma) * r[b] + 1e-5)
        if not r[b].any():
            continue
        if want["tol"][b] <= 1e-3:
            close(w[b], want["w"][b], atol=want["tol"][b], msg=f"row {b}")
        else:
            event("ill-conditioned C_total: bounds only")


@SLOW
@given(p=problems(), data=st.data())
def test_release_rule_is_release_mask_of_the_margin(p, data):
    K = data.draw(st.sampled_from(k_choices(p["V"])))
    options = {
        "margin_kind": data.draw(st.sampled_from(reference_stats.MARGIN_KINDS)),
        "margin_k": data.draw(st.sampled_from([j for j in k_choices(p["V"]) if j <= K])),
        "renormalize": data.draw(st.booleans()),
        **data.draw(CHANGEPOINT_OPTIONS),
    }
    mdtype = data.draw(st.sampled_from(["bool", "float"]))
    w = call_rule("release", p, K, mdtype=mdtype, **options)
    want = reference_rules.rule_release(ref_batch(p), **options)
    for b in range(p["B"]):
        if want["ambiguous"][b]:
            event("near-tie row skipped")
            continue
        np.testing.assert_array_equal(w[b], want["w"][b], err_msg=f"row {b} {options}")


def check_selection_structure(w, mask, ratio):
    m = np.asarray(mask, bool)
    assert np.all((w == 0) | (w == 1))
    assert np.all(w[~m] == 0), "weight off the response"
    for b in range(m.shape[0]):
        if m[b].any():
            assert w[b].sum() >= 1, f"row {b} lost its best token"
    lo, hi = reference_rules.selection_count_bounds(m, ratio)
    assert lo <= w.sum() <= hi


@settings(SLOW, max_examples=15)
@given(p=problems(), data=st.data())
def test_score_rules_keep_the_batch_global_top_ratio_plus_each_rows_best(p, data):
    name = data.draw(st.sampled_from(["ta_opd", "entropy", "tip"]))
    K = data.draw(st.sampled_from(k_choices(p["V"])))
    k = data.draw(st.sampled_from([j for j in k_choices(p["V"]) if j <= K]))
    ratio = data.draw(st.sampled_from([0.05, 0.2, 0.5, 1.0]))
    mdtype = data.draw(st.sampled_from(["bool", "float"]))
    w = call_rule(name, p, K, mdtype=mdtype, ratio=ratio, k=k)
    check_selection_structure(w, p["mask"], ratio)
    want = reference_rules.rule_scored(ref_batch(p), name, ratio=ratio, k=k, stats_k=K)
    if want["fragile"]:
        event("float32 near-tie in scores: structure only")
        return
    note(f"reference scores {want['score']}")
    np.testing.assert_array_equal(w, want["w"], err_msg=f"{name} ratio={ratio} k={k}")


@FAST
@given(p=problems(), ratio=st.sampled_from([0.05, 0.2, 0.5, 1.0]), key=st.integers(0, 2**31 - 1))
def test_random_rule_is_a_seeded_batch_global_selection(p, ratio, key):
    w = call_rule("random", p, 1, key=key, ratio=ratio)
    check_selection_structure(w, p["mask"], ratio)
    np.testing.assert_array_equal(w, call_rule("random", p, 1, key=key, ratio=ratio))


# --------------------------------------------------------------------------- defaults
def test_defaults_follow_method_md():
    """Every default (k = 16, gap, sampled_reverse_kl, beta = 0.5, token_mean, l = 2, k0 = 1,
    k1 = 3, lambda = 1, rho = 0.5, n = 100, ratio = 0.05, gamma = 0.5) is docs/method.md's."""
    B, T, V = 2, 12, 16
    rng = np.random.default_rng(7)
    zs = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    zt = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), bool)
    mask[0, 1:12] = True
    mask[1, 0:9] = True
    seg = reference_release.fixed_segments(mask, 2).astype(np.int32)
    p = {"B": B, "T": T, "V": V, "zs": zs, "zt": zt, "tokens": tokens, "mask": mask, "seg": seg}
    jzs, jzt, jtok = jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(tokens)
    stats = core.token_stats(jzs, jzt, jtok)
    assert np.asarray(stats.student_topk_ids).shape == (B, T, 16)
    close(core.topk_margin(jzs, jzt), reference_stats.topk_margin(zs, zt, 16, "gap"))
    close(core.margin_from_stats(stats), reference_stats.topk_margin(zs, zt, 16, "gap"))
    loss = core.token_loss(jzs, jzt, jtok)
    close(loss, reference_losses.token_loss(zs, zt, tokens, "sampled_reverse_kl"))
    w = jnp.asarray(mask.astype(np.float32))
    close(
        core.reduce_loss(loss, w),
        reference_losses.reduce_loss(np.asarray(loss), mask, "token_mean"),
    )
    batch = ref_batch(p)
    margin = reference_stats.topk_margin(zs, zt, 16, "gap").astype(np.float32)
    want = reference_release.release(margin, seg, mask)
    got = core.find_release(jnp.asarray(margin), jnp.asarray(seg), jnp.asarray(mask))
    for b in range(B):
        if not want["ambiguous"][b]:
            assert (
                int(got.tau[b]) == want["tau"][b] and bool(got.released[b]) == want["released"][b]
            )
    rb = rule_batch(p, 16)
    key = jax.random.key(0)
    for name, expected in [
        ("full", reference_rules.rule_full(batch)),
        ("prefix_fraction", reference_rules.rule_prefix_fraction(batch)),
        ("prefix_tokens", reference_rules.rule_prefix_tokens(batch)),
        ("iw_opd", reference_rules.rule_iw_opd(batch)["w"]),
    ]:
        close(core.RULES[name](rb, key), expected, msg=name)
    want = reference_rules.rule_release(batch)
    got = np.asarray(core.RULES["release"](rb, key))
    for b in range(B):
        if not want["ambiguous"][b]:
            np.testing.assert_array_equal(got[b], want["w"][b])
    for name in ("ta_opd", "entropy", "tip"):
        want = reference_rules.rule_scored(batch, name)
        got = np.asarray(core.RULES[name](rb, key), np.float64)
        check_selection_structure(got, mask, 0.05)
        if not want["fragile"]:
            np.testing.assert_array_equal(got, want["w"], err_msg=name)
    check_selection_structure(np.asarray(core.RULES["random"](rb, key), np.float64), mask, 0.05)
