"""`opd_jax.core` token statistics, margins, per-token statistics and position profiles against
the NumPy reference (tests/reference_stats.py, docs/method.md §1).

Every test draws small random problems (tests/core_strategies.py) and compares the float32
implementation with the float64 reference at rtol = atol = 1e-5; discrete outputs must match
exactly, except where the reference itself reports a float32 near-tie.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import opd_jax.core as core
from tests import reference_basics, reference_stats
from tests.core_strategies import FAST, as_mask_dtype, close, k_choices, make_stats, problems


# --------------------------------------------------------------------------- token stats
@FAST
@given(p=problems(), data=st.data())
def test_token_stats_student_side_matches_reference_with_lowest_id_tie_break(p, data):
    k = data.draw(st.sampled_from(k_choices(p["V"])))
    got = core.token_stats(
        jnp.asarray(p["zs"]), jnp.asarray(p["zt"]), jnp.asarray(p["tokens"]), k=k
    )
    want = reference_stats.token_stats(p["zs"], p["zt"], p["tokens"], k)
    np.testing.assert_array_equal(np.asarray(got.tokens), p["tokens"])
    np.testing.assert_array_equal(np.asarray(got.student_topk_ids), want["student_topk_ids"])
    for name in ("student_logp", "teacher_logp", "student_topk_logp", "teacher_at_student_topk"):
        close(getattr(got, name), want[name], msg=name)
    assert np.asarray(got.student_topk_logp).shape == (p["B"], p["T"], k)


@FAST
@given(p=problems(), data=st.data())
def test_token_stats_teacher_side_is_the_teachers_own_top_k(p, data):
    k = data.draw(st.sampled_from(k_choices(p["V"])))
    got = core.token_stats(
        jnp.asarray(p["zs"]), jnp.asarray(p["zt"]), jnp.asarray(p["tokens"]), k=k
    )
    want = reference_stats.token_stats(p["zs"], p["zt"], p["tokens"], k)
    s, q = reference_basics.log_softmax(p["zs"]), reference_basics.log_softmax(p["zt"])
    ids = np.asarray(got.teacher_topk_ids)
    # tie-robust: the values are the k largest teacher log-probs, descending, and the ids
    # are k distinct tokens carrying exactly those values.
    close(got.teacher_topk_logp, want["teacher_topk_logp"])
    close(np.take_along_axis(q, ids, -1), want["teacher_topk_logp"])
    close(got.student_at_teacher_topk, np.take_along_axis(s, ids, -1))
    for b in range(p["B"]):
        for t in range(p["T"]):
            assert len(set(ids[b, t].tolist())) == k


@FAST
@given(p=problems(), data=st.data())
def test_teacher_top_k_also_breaks_exact_ties_by_lowest_id(p, data):
    """Convention (same as the student's): the teacher's top-K is argsort(-q, stable)[:K]."""
    k = data.draw(st.sampled_from(k_choices(p["V"])))
    got = core.token_stats(
        jnp.asarray(p["zs"]), jnp.asarray(p["zt"]), jnp.asarray(p["tokens"]), k=k
    )
    want = reference_stats.token_stats(p["zs"], p["zt"], p["tokens"], k)
    np.testing.assert_array_equal(np.asarray(got.teacher_topk_ids), want["teacher_topk_ids"])


def test_top_k_treats_negative_zero_logits_as_an_exact_tie_with_zero():
    """-0.0 == 0.0, and log_softmax maps both to the same value: lowest id first. Matmuls
    (hidden @ unembed) produce -0.0 routinely, so this is not only a curiosity."""
    zs = jnp.asarray([[[-0.0, 0.0, 1.0, -1.0]]])
    zt = jnp.asarray([[[-0.0, 0.0, 0.0, 0.0]]])
    stats = core.token_stats(zs, zt, jnp.zeros((1, 1), jnp.int32), k=2)
    np.testing.assert_array_equal(np.asarray(stats.student_topk_ids), [[[2, 0]]])
    np.testing.assert_array_equal(np.asarray(stats.teacher_topk_ids), [[[0, 1]]])


# --------------------------------------------------------------------------- margins
@FAST
@given(p=problems(), data=st.data())
def test_topk_margin_matches_reference_for_every_kind(p, data):
    k = data.draw(st.sampled_from(k_choices(p["V"])))
    kind = data.draw(st.sampled_from(reference_stats.MARGIN_KINDS))
    renorm = data.draw(st.booleans())
    tokens = jnp.asarray(p["tokens"]) if kind == "sampled_gap" else None
    got = core.topk_margin(
        jnp.asarray(p["zs"]), jnp.asarray(p["zt"]), k, kind, tokens=tokens, renormalize=renorm
    )
    want = reference_stats.topk_margin(
        p["zs"], p["zt"], k, kind, tokens=p["tokens"], renormalize=renorm
    )
    assert np.asarray(got).shape == (p["B"], p["T"])
    assert np.asarray(got).dtype == np.float32
    close(got, want, msg=f"{kind} k={k} renormalize={renorm}")


@FAST
@given(p=problems(), data=st.data())
def test_margin_from_stats_uses_the_first_k_student_candidates(p, data):
    K = data.draw(st.sampled_from(k_choices(p["V"])))
    k = data.draw(st.sampled_from([None] + [j for j in k_choices(p["V"]) if j <= K]))
    kind = data.draw(st.sampled_from(reference_stats.MARGIN_KINDS))
    renorm = data.draw(st.booleans())
    got = core.margin_from_stats(make_stats(p, K), kind, k=k, renormalize=renorm)
    want = reference_stats.topk_margin(
        p["zs"], p["zt"], K if k is None else k, kind, tokens=p["tokens"], renormalize=renorm
    )
    close(got, want, msg=f"{kind} K={K} k={k} renormalize={renorm}")


def test_gap_is_zero_with_a_single_candidate():
    zs = jnp.asarray([[[2.0, 1.0, 0.0]]])
    zt = jnp.asarray([[[0.0, 3.0, 1.0]]])
    close(core.topk_margin(zs, zt, 1, "gap"), [[0.0]])


def test_sampled_gap_excludes_the_sampled_token_and_is_zero_when_nothing_is_left():
    zs = jnp.asarray([[[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]])
    zt = jnp.asarray([[[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]]])
    tokens = jnp.asarray([[0, 1]], jnp.int32)
    q = reference_basics.log_softmax(np.asarray(zt))[0]
    got = core.topk_margin(zs, zt, 2, "sampled_gap", tokens=tokens)
    # y = 0 is in S = {0, 1}: q[0] - q[1]; y = 1 is in S: q[1] - q[0]
    close(got, [[q[0, 0] - q[0, 1], q[1, 1] - q[1, 0]]])
    got1 = core.topk_margin(zs, zt, 1, "sampled_gap", tokens=tokens)
    # K = 1: S = {0}. y = 0 leaves nothing -> 0; y = 1 is outside S -> q[1] - q[0]
    close(got1, [[0.0, q[1, 1] - q[1, 0]]])


def test_renormalized_teacher_mass_is_one_and_other_kinds_are_shift_invariant():
    zs = jnp.asarray([[[2.0, 1.0, 0.5, -1.0]]])
    zt = jnp.asarray([[[0.0, 3.0, 1.0, 2.0]]])
    tokens = jnp.asarray([[3]], jnp.int32)
    close(core.topk_margin(zs, zt, 3, "teacher_mass", renormalize=True), [[1.0]])
    for kind in ("gap", "mean_gap", "sampled_gap", "advantage_spread"):
        a = core.topk_margin(zs, zt, 3, kind, tokens=tokens, renormalize=True)
        b = core.topk_margin(zs, zt, 3, kind, tokens=tokens, renormalize=False)
        close(a, np.asarray(b, np.float64), msg=kind)


# --------------------------------------------------------------------------- statistics
@FAST
@given(p=problems(), data=st.data())
def test_per_token_statistics_match_reference(p, data):
    K = data.draw(st.sampled_from(k_choices(p["V"])))
    k = data.draw(st.sampled_from([None] + [j for j in k_choices(p["V"]) if j <= K]))
    kk = K if k is None else k
    stats = make_stats(p, K)
    close(
        core.sampled_advantage(stats),
        reference_stats.sampled_advantage(p["zs"], p["zt"], p["tokens"]),
        msg="sampled_advantage",
    )
    close(
        core.topk_entropy(stats, k=k), reference_stats.topk_entropy(p["zs"], kk), msg="topk_entropy"
    )
    close(
        core.teacher_mass(stats, k=k),
        reference_stats.teacher_mass(p["zs"], p["zt"], kk),
        msg="teacher_mass",
    )
    close(
        core.union_forward_kl(stats),
        reference_stats.union_forward_kl(p["zs"], p["zt"], K),
        msg="union_forward_kl",
    )


@FAST
@given(p=problems(), data=st.data())
def test_statistics_from_core_token_stats_match_reference(p, data):
    K = data.draw(st.sampled_from(k_choices(p["V"])))
    stats = core.token_stats(
        jnp.asarray(p["zs"]), jnp.asarray(p["zt"]), jnp.asarray(p["tokens"]), k=K
    )
    close(core.topk_entropy(stats), reference_stats.topk_entropy(p["zs"], K))
    close(core.union_forward_kl(stats), reference_stats.union_forward_kl(p["zs"], p["zt"], K))


def test_union_forward_kl_counts_shared_ids_once():
    # identical distributions -> D = 0; with duplicated ids counted twice it would not be
    # (renormalisation over a multiset differs between teacher and student).
    zs = jnp.asarray([[[3.0, 2.0, 1.0, 0.0]]])
    zt = jnp.asarray([[[3.0, 1.0, 2.0, 0.0]]])
    stats = core.token_stats(zs, zt, jnp.asarray([[0]], jnp.int32), k=2)
    close(core.union_forward_kl(stats), reference_stats.union_forward_kl(zs, zt, 2))
    same = core.token_stats(zs, zs, jnp.asarray([[0]], jnp.int32), k=2)
    close(core.union_forward_kl(same), [[0.0]])


def test_topk_entropy_is_one_for_uniform_candidates_and_zero_for_k_one():
    zs = jnp.zeros((1, 2, 4))
    stats = core.token_stats(zs, zs, jnp.zeros((1, 2), jnp.int32), k=4)
    close(core.topk_entropy(stats), np.ones((1, 2)))
    close(core.topk_entropy(stats, k=1), np.zeros((1, 2)))


# --------------------------------------------------------------------------- diagnostics
@FAST
@given(p=problems(), bins=st.sampled_from([1, 3, 20]), data=st.data())
def test_position_profile_bins_by_relative_response_position(p, bins, data):
    values = data.draw(
        hnp.arrays(np.float32, (p["B"], p["T"]), elements=st.floats(-5, 5, width=32))
    )
    mdtype = data.draw(st.sampled_from(["bool", "float"]))
    mask = jnp.asarray(as_mask_dtype(p["mask"], mdtype))
    means, counts = core.position_profile(jnp.asarray(values), mask, bins=bins)
    wm, wc = reference_stats.position_profile(values, p["mask"], bins)
    np.testing.assert_array_equal(np.asarray(counts), wc)
    close(means, wm)


def test_position_profile_puts_token_i_of_L_in_bin_floor_bins_i_over_L():
    mask = np.zeros((1, 20), bool)
    mask[0, :20] = True
    values = np.arange(20, dtype=np.float32)[None]
    means, counts = core.position_profile(jnp.asarray(values), jnp.asarray(mask), bins=20)
    np.testing.assert_array_equal(np.asarray(counts), np.ones(20))
    close(means, np.arange(20.0))
