"""docs/method.md §7 diagnostics: profiles by position and by sentence, kept and released
fractions, boundary histogram."""

import jax.numpy as jnp
import numpy as np

from opd_jax import core


def test_position_profile_bins_by_relative_position():
    values = jnp.array([[0.0, 1.0, 2.0, 3.0, 9.0], [5.0, 7.0, 9.0, 9.0, 9.0]])
    response = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    means, counts = core.position_profile(values, response, bins=2)
    np.testing.assert_allclose(counts, [3, 3])
    np.testing.assert_allclose(means, [(0 + 1 + 5) / 3, (2 + 3 + 7) / 3])


def test_segment_profile_averages_sentence_means_over_the_rows_that_reach_them():
    values = jnp.array([[1.0, 3.0, 5.0, 0.0], [2.0, 4.0, 4.0, 8.0]])
    seg = jnp.array([[0, 0, 1, -1], [0, 1, 1, 2]])
    response = (seg >= 0).astype(jnp.int32)
    means, rows = core.segment_profile(values, seg, response, num_segments=4)
    np.testing.assert_allclose(rows, [2, 2, 1, 0])
    np.testing.assert_allclose(means, [(2 + 2) / 2, (5 + 4) / 2, 8, 0])


def test_step_diagnostics_report_the_release_picture():
    response = jnp.ones((2, 8))
    seg = core.token_segments(response)
    margin = jnp.array([[3.0] * 4 + [0.1] * 4, [1.0] * 8])
    result = core.find_release(margin, seg, response)
    diag = core.step_diagnostics(
        margin, jnp.ones((2, 8)), response, seg, result.w, result, bins=4, segment_bins=8
    )
    np.testing.assert_allclose(diag["margin_by_position"], [2.0, 2.0, 0.55, 0.55])
    np.testing.assert_allclose(diag["advantage_by_position"], 1.0)
    np.testing.assert_allclose(diag["margin_by_sentence"], [2.0] * 4 + [0.55] * 4)
    np.testing.assert_allclose(diag["rows_by_sentence"], 2)
    np.testing.assert_allclose(diag["kept_fraction"], 12 / 16)
    np.testing.assert_allclose(diag["released_fraction"], 0.5)
    np.testing.assert_allclose(diag["boundary_histogram"], [0, 0, 1, 0])
    assert float(core.kept_fraction(result.w, response)) == 0.75
