"""Segment means, the BIC downward change point and the release mask, on hand-made cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core

STEP_DOWN = [3.0, 3.1, 2.9, 3.0, 0.5, 0.4, 0.6, 0.5]


def changepoint(series, lengths=None, **options):
    series = jnp.asarray(series, jnp.float32)
    series = series[None] if series.ndim == 1 else series
    if lengths is None:
        lengths = jnp.full(series.shape[0], series.shape[1])
    return core.bic_downward_changepoint(series, jnp.asarray(lengths), **options)


def test_a_clear_drop_is_released_after_the_last_high_segment():
    tau, released = changepoint(STEP_DOWN)
    assert bool(released[0]) and int(tau[0]) == 4


def test_a_rise_is_never_released():
    tau, released = changepoint(STEP_DOWN[::-1])
    assert not bool(released[0]) and int(tau[0]) == 8


def test_constant_and_too_short_series_are_not_released():
    tau, released = changepoint([[1.0] * 8, STEP_DOWN[:3] + [0.0] * 5], lengths=[8, 3])
    np.testing.assert_array_equal(released, [False, False])
    np.testing.assert_array_equal(tau, [8, 3])


def test_min_segments_bounds_the_split_and_min_drop_std_demands_a_large_drop():
    series = [3.0, 0.5, 0.4, 0.6, 0.5, 0.5, 0.4, 0.6]
    assert int(changepoint(series, min_segments=1)[0][0]) == 1
    assert not bool(changepoint(series, min_segments=2, penalty=5.0)[1][0])
    assert bool(changepoint(STEP_DOWN, min_drop_std=1.5)[1][0])
    assert not bool(changepoint(STEP_DOWN, min_drop_std=2.5)[1][0])


def test_padding_past_the_length_is_ignored():
    padded = STEP_DOWN + [100.0, -100.0]
    assert changepoint(padded, lengths=[8])[0][0] == changepoint(STEP_DOWN)[0][0]


def test_rows_are_independent_without_vmap_and_under_jit():
    rng = np.random.default_rng(0)
    series = rng.normal(size=(16, 12)).astype(np.float32)
    series[::2, 6:] -= 2.0
    lengths = rng.integers(0, 13, size=16)
    tau, released = jax.jit(core.bic_downward_changepoint)(series, lengths)
    for b in range(16):
        tau_b, released_b = changepoint(series[b], [lengths[b]])
        assert (int(tau[b]), bool(released[b])) == (int(tau_b[0]), bool(released_b[0]))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="min_segments"):
        changepoint(STEP_DOWN, min_segments=0)
    with pytest.raises(ValueError, match="penalty"):
        changepoint(STEP_DOWN, penalty=-1.0)
    with pytest.raises(ValueError, match=r"lengths"):
        core.bic_downward_changepoint(jnp.zeros((2, 4)), jnp.zeros(3, jnp.int32))


def test_segment_means_average_response_tokens_of_each_segment():
    values = jnp.array([[9.0, 1.0, 3.0, 5.0, 7.0, 9.0]])
    response = jnp.array([[0, 1, 1, 1, 1, 0]])
    seg = jnp.array([[-1, 0, 0, 1, 2, -1]])
    means, counts, lengths = core.segment_means(values, seg, response, num_segments=4)
    np.testing.assert_allclose(means, [[2.0, 5.0, 7.0, 0.0]])
    np.testing.assert_allclose(counts, [[2, 1, 1, 0]])
    np.testing.assert_array_equal(lengths, [3])


def test_release_keeps_the_prefix_before_the_first_token_of_segment_tau():
    # A prompt of 2 tokens, then 8 sentences of 2 tokens each, then padding.
    response = jnp.zeros((1, 20)).at[0, 2:18].set(1)
    seg = jnp.where(response > 0, (jnp.arange(20) - 2) // 2, -1)
    margin = jnp.where(
        seg >= 0, jnp.asarray(STEP_DOWN).repeat(2)[jnp.clip(jnp.arange(20) - 2, 0, 15)], 0.0
    )
    result = core.find_release(margin, seg, response)
    assert bool(result.released[0]) and int(result.tau[0]) == 4 and int(result.boundary[0]) == 10
    np.testing.assert_array_equal(result.w[0], np.r_[0, 0, [1] * 8, [0] * 10])


def test_rows_without_a_change_point_get_full_opd():
    response = jnp.ones((1, 8))
    seg = core.token_segments(response)
    result = core.find_release(jnp.ones((1, 8)), seg, response)
    assert not bool(result.released[0]) and int(result.boundary[0]) == 8
    np.testing.assert_array_equal(result.w, response)


def test_fixed_segments_count_response_tokens_only():
    response = jnp.array([[0, 0, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(core.fixed_segments(response, 2), [[-1, -1, 0, 0, 1, 1, 2, -1]])
    with pytest.raises(ValueError, match="size"):
        core.fixed_segments(response, 0)
