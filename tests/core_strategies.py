"""Hypothesis strategies and shared helpers for the `opd_jax.core` reference tests.

The tests (tests/test_core_*_reference.py) draw small random problems, shapes from small fixed
sets so the jitted functions compile a bounded number of times, and compare the float32
implementation with the float64 NumPy reference (tests/reference_*.py) at rtol = atol = 1e-5.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import opd_jax.core as core
from tests import reference_basics, reference_stats

RTOL = ATOL = 1e-5
FAST = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SLOW = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# (B, T, V): a small fixed set, so each jitted function compiles only a few times.
SHAPES = [(1, 1, 1), (3, 1, 4), (2, 5, 9), (3, 12, 4)]


# --------------------------------------------------------------------------- strategies
def k_choices(V):
    return sorted({1, min(3, V), V})


def no_near_ties(z, gap=1e-4):
    """Every two distinct values in a logit row differ by more than `gap`."""
    z = np.sort(np.asarray(z, np.float64).reshape(-1, z.shape[-1]), axis=-1)
    d = np.diff(z, axis=-1)
    return bool(np.all((d == 0) | (d > gap)))


@st.composite
def logits(draw, shape):
    """Integer-valued (many exact ties), quarter-grid, or continuous float32 logits."""
    mode = draw(st.sampled_from(["int", "quarter", "normal"]))
    if mode == "int":
        ints = draw(hnp.arrays(np.int32, shape, elements=st.integers(-3, 3)))
        return ints.astype(np.float32)
    if mode == "quarter":
        ints = draw(hnp.arrays(np.int32, shape, elements=st.integers(-20, 20)))
        return (ints / 4).astype(np.float32)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    z = np.clip(rng.normal(0.0, 2.0, shape), -8, 8).astype(np.float32)
    assume(no_near_ties(z))
    return z


@st.composite
def response_masks(draw, B, T):
    """Contiguous responses at random offsets (prompt before, padding after), maybe empty."""
    m = np.zeros((B, T), bool)
    for b in range(B):
        o = draw(st.integers(0, T))
        L = draw(st.integers(0, T - o))
        m[b, o : o + L] = True
    return m


@st.composite
def segments_for(draw, mask):
    """seg = -1 off the response, non-decreasing 0..n_b-1 on it (random segment lengths)."""
    B, T = mask.shape
    seg = -np.ones((B, T), np.int32)
    for b in range(B):
        pos = np.flatnonzero(mask[b])
        j = 0
        for i, t in enumerate(pos):
            if i > 0 and draw(st.booleans()):
                j += 1
            seg[b, t] = j
    return seg


def as_mask_dtype(m, kind):
    return m.astype(np.float32) if kind == "float" else m


@st.composite
def problems(draw, shapes=SHAPES):
    B, T, V = draw(st.sampled_from(shapes))
    zs = draw(logits((B, T, V)))
    zt = draw(logits((B, T, V)))
    tokens = draw(hnp.arrays(np.int32, (B, T), elements=st.integers(0, V - 1)))
    # sometimes the sampled token is the student's top-1 (sampled_gap must exclude it)
    top1 = np.argsort(-reference_basics.log_softmax(zs), axis=-1, kind="stable")[..., 0].astype(
        np.int32
    )
    use_top = draw(hnp.arrays(bool, (B, T)))
    tokens = np.where(use_top, top1, tokens).astype(np.int32)
    mask = draw(response_masks(B, T))
    seg = draw(segments_for(mask))
    return {"B": B, "T": T, "V": V, "zs": zs, "zt": zt, "tokens": tokens, "mask": mask, "seg": seg}


def ref_batch(p):
    return {
        "student_logits": p["zs"],
        "teacher_logits": p["zt"],
        "tokens": p["tokens"],
        "response_mask": p["mask"],
        "seg": p["seg"],
    }


def make_stats(p, k):
    """A core.TokenStats holding the reference statistics (float32), independent of
    core.token_stats, so rule and statistic tests do not inherit its bugs."""
    rs = reference_stats.token_stats(p["zs"], p["zt"], p["tokens"], k)
    fields = {}
    for name in reference_stats.TOKEN_STATS_FIELDS:
        a = rs[name]
        fields[name] = jnp.asarray(
            a.astype(np.int32) if a.dtype.kind == "i" else a.astype(np.float32)
        )
    return core.TokenStats(**fields)


def close(actual, expected, rtol=RTOL, atol=ATOL, msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, err_msg=msg
    )


# --------------------------------------------------------------------------- change point options
CHANGEPOINT_OPTIONS = st.fixed_dictionaries(
    {
        "min_segments": st.sampled_from([1, 2, 3]),
        "k0": st.sampled_from([0, 1, 2]),
        "k1": st.sampled_from([1, 3, 5]),
        "penalty": st.sampled_from([0.0, 0.5, 1.0, 2.0]),
        "min_drop_std": st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.5, 2.0]),
        "eps": st.sampled_from([1e-8, 1e-3]),
    }
)
