"""Tolerances derived from float32 arithmetic, for comparing two ways of computing one thing.

Two float32 computations of the same quantity in a different order (remat, chunked or packed
attention, a fused kernel) differ by rounding that grows with the reduction behind each
element: at most about ``n * eps`` of the magnitude of the summed terms for ``n`` terms
(``eps = 2**-23 ≈ 1.2e-7``). A gradient element can be a sum whose terms cancel, so the error
is relative to the scale of its leaf, not to the element itself: the tests' reductions have
``n <= 10**3`` terms, a bound of ``1.2e-4`` of the leaf's largest element. A wrong term (a
missing mask, a shifted position, a stale parameter) moves a leaf by O(1) of its scale, so a
tolerance of ``1e-3`` of the scale separates the two by an order of magnitude either way.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
LEAF_SCALE_RTOL = 1e-3  # > 1e3 terms * EPS32, << an O(1) error


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = LEAF_SCALE_RTOL) -> None:
    """Every leaf of ``actual`` equals ``expected``'s to ``rtol`` of that leaf's largest
    magnitude (see the module doc); structures must match."""
    leaves_a, leaves_e = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(leaves_a) == len(leaves_e), f"{len(leaves_a)} leaves != {len(leaves_e)}"
    for i, (a, e) in enumerate(zip(leaves_a, leaves_e, strict=True)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(float(np.abs(e).max(initial=0.0)), np.finfo(np.float32).tiny)
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale, err_msg=f"leaf {i}")
