"""`opd_jax.core` BIC split with gain, online cut and online replay against the NumPy reference
(tests/reference_online.py, docs/method.md §3 and the online release).

Discrete outputs (tau, released, certain, stopped, seen) must match exactly except where the
reference reports a float32 near-tie; a gain must land in the reference's float32 interval
(derived in tests/reference_online.py), or be -inf exactly where no split is admissible.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from opd_jax.core import bic_downward_changepoint
from opd_jax.core.changepoint import bic_split
from opd_jax.core.online_release import online_cut, online_options, replay_online
from tests import reference_online
from tests.core_strategies import CHANGEPOINT_OPTIONS, FAST

ONLINE_OPTIONS = st.fixed_dictionaries(
    {
        "confirm": st.sampled_from([0, 1, 2]),
        "min_gain": st.sampled_from([0.0, 2.0]),
        "min_segments": st.sampled_from([1, 2]),
    }
)
DERANDOMIZED = settings(FAST, derandomize=True)  # the same examples on every run
REPLAY = settings(DERANDOMIZED, max_examples=12)


# --------------------------------------------------------------------------- strategies
def downward_steps(rng, B: int, N: int, noise: float = 0.3) -> np.ndarray:
    """Rows at a high level up to a random cut, a lower one after it, plus noise."""
    cut = rng.integers(0, N + 1, (B, 1))
    high = rng.normal(2.0, 1.0, (B, 1))
    return np.where(np.arange(N)[None] < cut, high, high - 2.0) + rng.normal(0, noise, (B, N))


@st.composite
def series_batches(draw):
    """(series [B, N] float32, lengths [B] int32): garbage past each row's length."""
    B = draw(st.sampled_from([1, 3]))
    N = draw(st.sampled_from([5, 12]))
    mode = draw(st.sampled_from(["down", "down", "steps", "grid", "normal", "constant"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "down":
        x = downward_steps(rng, B, N)
    elif mode == "steps":  # noisy piecewise constant, up or down
        levels = rng.normal(0, 2, (B, 3))
        cut = np.sort(rng.integers(0, N + 1, (B, 2)), axis=1)
        idx = (np.arange(N)[None] >= cut[:, :1]).astype(int) + (np.arange(N)[None] >= cut[:, 1:])
        x = np.take_along_axis(levels, idx, 1) + rng.normal(0, 0.3, (B, N))
    elif mode == "grid":
        x = draw(hnp.arrays(np.int32, (B, N), elements=st.integers(-3, 3))) / 2
    elif mode == "normal":
        x = rng.normal(0, 1, (B, N))
    else:
        x = np.repeat(rng.normal(0, 2, (B, 1)), N, axis=1)
    lengths = np.array([draw(st.one_of(st.just(N), st.integers(0, N))) for _ in range(B)], np.int32)
    valid = np.arange(N)[None] < lengths[:, None]
    return np.where(valid, x, rng.normal(0, 100, (B, N))).astype(np.float32), lengths


def np_all(*arrays):
    return [np.asarray(a) for a in arrays]


def opts_cp(opts):
    """The change point options among online options (all but confirm and min_gain)."""
    return {k: v for k, v in opts.items() if k not in ("confirm", "min_gain")}


def assert_gain_in_interval(got, want, rows):
    """got[b] in [gain_lo, gain_hi] (-inf exactly where no split is admissible)."""
    for b in rows:
        if want["gain_ambiguous"][b]:
            event("gain with doubtful admissibility skipped")
            continue
        g = float(got[b])
        if want["gain"][b] == -np.inf:
            assert g == -np.inf, f"row {b}: gain {g}, want -inf"
        else:
            lo, hi = want["gain_lo"][b], want["gain_hi"][b]
            assert lo <= g <= hi, f"row {b}: gain {g} not in [{lo}, {hi}]"


# --------------------------------------------------------------------------- bic_split
@settings(DERANDOMIZED, max_examples=30)
@given(sl=series_batches(), opts=CHANGEPOINT_OPTIONS)
def test_bic_split_matches_reference_and_bic_downward_changepoint(sl, opts):
    series, lengths = sl
    args = jnp.asarray(series), jnp.asarray(lengths)
    tau, released, gain = np_all(*bic_split(*args, **opts))
    want = reference_online.bic_split(series, lengths, **opts)
    note(f"got tau={tau} released={released} gain={gain}; want {want}")
    assert (tau.dtype, released.dtype, gain.dtype) == (np.int32, np.bool_, np.float32)
    old_tau, old_released = np_all(*bic_downward_changepoint(*args, **opts))
    np.testing.assert_array_equal(tau, old_tau)
    np.testing.assert_array_equal(released, old_released)
    np.testing.assert_array_equal(released, gain > 0)  # released iff gain > 0
    for b in range(len(lengths)):
        if want["ambiguous"][b]:
            event("near-tie row skipped")
            continue
        assert (int(tau[b]), bool(released[b])) == (want["tau"][b], want["released"][b]), b
    assert_gain_in_interval(gain, want, range(len(lengths)))


def test_bic_split_gain_is_minus_inf_without_an_admissible_split():
    series = jnp.asarray([[0.0, 1.0, 2.0, 3.0], [3.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    tau, released, gain = bic_split(series, jnp.asarray([4, 3, 4], jnp.int32))
    # increasing: no downward split; n = 3 < 2 l; constant: no drop
    np.testing.assert_array_equal(np.asarray(gain), [-np.inf] * 3)
    np.testing.assert_array_equal(np.asarray(tau), [4, 3, 4])
    assert not np.asarray(released).any()


# --------------------------------------------------------------------------- online_cut
@settings(DERANDOMIZED, max_examples=25)
@given(sl=series_batches(), opts=ONLINE_OPTIONS)
def test_online_cut_matches_reference_except_near_ties(sl, opts):
    series, lengths = sl
    got = online_cut(jnp.asarray(series), jnp.asarray(lengths), **opts)
    want = reference_online.online_cut(series, lengths, **opts)
    certain, tau, gain = np_all(got.certain, got.tau, got.gain)
    note(f"got {got}; want {want}")
    assert (certain.dtype, tau.dtype, gain.dtype) == (np.bool_, np.int32, np.float32)
    for b in range(len(lengths)):
        if want["ambiguous"][b]:
            event("near-tie row skipped")
            continue
        event("certain row" if want["certain"][b] else "uncertain row")
        assert bool(certain[b]) == want["certain"][b], f"row {b}"
        assert int(tau[b]) == want["tau"][b], f"row {b}"
    assert_gain_in_interval(gain, want, range(len(lengths)))


@settings(DERANDOMIZED, max_examples=15)
@given(sl=series_batches(), opts=ONLINE_OPTIONS, data=st.data())
def test_online_cut_at_n_reads_only_the_first_n_entries(sl, opts, data):
    series, lengths = sl
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    past = np.arange(series.shape[1])[None] >= lengths[:, None]
    other = np.where(past, rng.normal(0, 1e3, series.shape), series).astype(np.float32)
    a = online_cut(jnp.asarray(series), jnp.asarray(lengths), **opts)
    b = online_cut(jnp.asarray(other), jnp.asarray(lengths), **opts)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    a = replay_online(jnp.asarray(series), jnp.asarray(lengths), **opts)
    b = replay_online(jnp.asarray(other), jnp.asarray(lengths), **opts)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- replay_online
@REPLAY
@given(sl=series_batches(), opts=ONLINE_OPTIONS)
def test_replay_online_matches_reference_except_near_ties(sl, opts):
    series, lengths = sl
    got = replay_online(jnp.asarray(series), jnp.asarray(lengths), **opts)
    want = reference_online.replay_online(series, lengths, **opts)
    stopped, seen, tau = np_all(got.stopped, got.seen, got.tau)
    note(f"got {got}; want {want}")
    assert (stopped.dtype, seen.dtype, tau.dtype) == (np.bool_, np.int32, np.int32)
    for b in range(len(lengths)):
        if want["ambiguous"][b]:
            event("near-tie row skipped")
            continue
        event("stopped row" if want["stopped"][b] else "unstopped row")
        assert bool(stopped[b]) == want["stopped"][b], f"row {b}"
        assert int(seen[b]) == want["seen"][b], f"row {b}"
        assert int(tau[b]) == want["tau"][b], f"row {b}"


@REPLAY
@given(sl=series_batches(), opts=ONLINE_OPTIONS)
def test_a_stopped_row_has_seen_the_cut_plus_confirm_and_min_segments(sl, opts):
    series, lengths = sl
    got = replay_online(jnp.asarray(series), jnp.asarray(lengths), **opts)
    stopped, seen, tau = np_all(got.stopped, got.seen, got.tau)
    offline_tau, _, _ = np_all(
        *bic_split(jnp.asarray(series), jnp.asarray(lengths), **opts_cp(opts))
    )
    for b in range(len(lengths)):
        if stopped[b]:
            assert tau[b] + opts["confirm"] + opts["min_segments"] <= seen[b] <= lengths[b], b
        else:
            assert (seen[b], tau[b]) == (lengths[b], offline_tau[b]), f"row {b}"


@REPLAY
@given(
    data=st.data(),
    opts=ONLINE_OPTIONS.filter(lambda o: o["confirm"] > 0 or o["min_segments"] == 1),
)
def test_a_clear_downward_step_stops_at_the_offline_cut(data, opts):
    # confirm = 0 with min_segments = 2 may cut one segment early (see the explicit test below)
    N, lmin, m = 12, opts["min_segments"], opts["confirm"]
    p = data.draw(st.integers(lmin, N - lmin - m))  # room for the cut plus confirm + suffix
    n = data.draw(st.integers(p + lmin + m, N))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # the level-2 prefix rises (no downward split inside it); the suffix is 0 plus noise
    pre = 2.0 + np.sort(rng.normal(0, 0.05, p))
    row = np.concatenate([pre, rng.normal(0, 0.05, N - p)]).astype(np.float32)[None]
    lengths = jnp.asarray([n], jnp.int32)
    got = replay_online(jnp.asarray(row), lengths, **opts)
    offline_tau, released, _ = bic_split(jnp.asarray(row), lengths, **opts_cp(opts))
    assert bool(released[0]) and int(offline_tau[0]) == p
    assert bool(got.stopped[0]) and int(got.tau[0]) == p
    assert int(got.seen[0]) == p + lmin + m  # as soon as the confirmed suffix is long enough


def test_confirm_zero_with_two_min_segments_can_cut_one_segment_early():
    # seen up to n = 9, one suffix entry: the split before the last two entries already
    # drops (means 2 vs 1) and wins BIC; confirm = 1 waits for the real cut at 8, and so does
    # the default least gain (8) with confirm = 0, one sentence sooner
    row = jnp.asarray([[2.0] * 8 + [0.0] * 4])
    lengths = jnp.asarray([12], jnp.int32)
    early = replay_online(row, lengths, confirm=0, min_gain=0.0, min_segments=2)
    assert bool(early.stopped[0]) and (int(early.seen[0]), int(early.tau[0])) == (9, 7)
    late = replay_online(row, lengths, confirm=1, min_gain=0.0, min_segments=2)
    assert bool(late.stopped[0]) and (int(late.seen[0]), int(late.tau[0])) == (11, 8)
    gained = replay_online(row, lengths, min_segments=2)  # confirm 0, min_gain 8
    assert bool(gained.stopped[0]) and (int(gained.seen[0]), int(gained.tau[0])) == (10, 8)


def max_drop_in_std(N: int, lmin: int) -> float:
    """sup of (mu_pre - mu_post) / std over series of length n <= N and splits tau in
    [lmin, n - lmin]: n var >= tau (n - tau) / n * drop^2, so drop <= std n / sqrt(tau (n - tau)),
    largest at tau = lmin."""
    return max(n / np.sqrt(lmin * (n - lmin)) for n in range(2 * lmin, N + 1))


@REPLAY
@given(
    data=st.data(),
    kind=st.sampled_from(["constant", "upward", "noise"]),
    N=st.sampled_from([5, 12]),
    opts=ONLINE_OPTIONS,
)
def test_rows_without_a_downward_step_never_stop(data, kind, N, opts):
    B = 3
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    cp = opts_cp(opts)
    if kind == "constant":  # also values with no exact float32 sum (0.1, -1.7, ...)
        level = data.draw(st.sampled_from([0.0, 0.1, -1.7, 2.0, 3.3, 25.0]))
        rows = np.full((B, N), level)
    elif kind == "upward":  # non-decreasing and not constant: every split rises
        rows = np.sort(rng.normal(0, 1, (B, N)), axis=1)
    else:  # any series: a drop that needs more std than any split can give
        rows = rng.normal(0, 1, (B, N))
        cp["min_drop_std"] = 1.01 * max_drop_in_std(N, opts["min_segments"])
    rows = rows.astype(np.float32)
    lengths = np.array([data.draw(st.integers(0, N)) for _ in range(B)], np.int32)
    opts = opts | cp
    got = replay_online(jnp.asarray(rows), jnp.asarray(lengths), **opts)
    offline_tau, released, _ = bic_split(jnp.asarray(rows), jnp.asarray(lengths), **cp)
    assert not np.asarray(got.stopped).any() and not np.asarray(released).any()
    np.testing.assert_array_equal(np.asarray(got.seen), lengths)
    np.testing.assert_array_equal(np.asarray(got.tau), np.asarray(offline_tau))
    np.testing.assert_array_equal(np.asarray(got.tau), lengths)


# --------------------------------------------------------------------------- jit and options
def test_online_functions_give_the_same_result_under_jit():
    rng = np.random.default_rng(0)
    series = np.concatenate([downward_steps(rng, 3, 12, 0.1), rng.normal(0, 1, (1, 12))])
    series = jnp.asarray(series.astype(np.float32))
    lengths = jnp.asarray([12, 9, 4, 12], jnp.int32)
    for opts in ({}, {"confirm": 2, "min_gain": 2.0, "min_segments": 1}):
        for fn in (online_cut, replay_online):
            eager = fn(series, lengths, **opts)
            jitted = jax.jit(functools.partial(fn, **opts))(series, lengths)
            assert type(jitted) is type(eager)
            for name, x, y in zip(eager._fields, eager, jitted, strict=True):
                x, y = np.asarray(x), np.asarray(y)
                assert x.dtype == y.dtype, name
                if x.dtype == np.float32:
                    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5, err_msg=name)
                else:
                    np.testing.assert_array_equal(y, x, err_msg=name)


def test_online_options_are_the_defaults():
    assert online_options() == {"confirm": 0, "min_gain": 8.0}
    series = jnp.asarray(downward_steps(np.random.default_rng(1), 3, 12).astype(np.float32))
    lengths = jnp.asarray([12, 7, 12], jnp.int32)
    for fn in (online_cut, replay_online):
        for x, y in zip(fn(series, lengths), fn(series, lengths, **online_options()), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("fn", [online_cut, replay_online])
@pytest.mark.parametrize(
    "bad", [{"confirm": -1}, {"confirm": 1.5}, {"confirm": "1"}, {"min_gain": -0.5}]
)
def test_bad_online_options_raise_naming_the_option(fn, bad):
    series, lengths = jnp.zeros((1, 5)), jnp.asarray([5], jnp.int32)
    with pytest.raises(ValueError, match=next(iter(bad))):
        fn(series, lengths, **bad)
