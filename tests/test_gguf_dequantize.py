"""`opd_jax.models.gguf.dequantize`: every block decoder against `gguf.quants.dequantize`.

Weights are quantised with `gguf.quants.quantize`.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from opd_jax.models.gguf import SUPPORTED_TYPES, dequantize

GGML = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- block decoders


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, cols] float32, row scales 1e-3..1e2, a zero row and a constant row (edge blocks)."""
    rng = np.random.default_rng(seed)
    w = (
        rng.normal(size=(rows, cols)).astype(np.float32)
        * np.geomspace(1e-3, 1e2, rows, dtype=np.float32)[:, None]
    )
    w[0] = 0.0
    w[1] = 0.5
    return w


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantize_is_bit_identical_to_gguf_reference(type_name):
    w = _weights(16, 256)
    packed = gguf.quants.quantize(w, GGML[type_name])
    ours = dequantize(packed, type_name, w.shape)
    reference = gguf.quants.dequantize(packed, GGML[type_name]).astype(np.float32)
    assert ours.dtype == np.float32 and ours.shape == w.shape
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize(
    ("type_name", "tolerance"),
    [("F32", 0.0), ("F16", 1e-3), ("BF16", 8e-3), ("Q8_0", 1e-2), ("Q4_0", 0.15), ("Q4_1", 0.1)],
)
def test_dequantize_recovers_weights_within_format_precision(type_name, tolerance):
    w = np.random.default_rng(0).normal(size=(16, 256)).astype(np.float32)
    ours = dequantize(gguf.quants.quantize(w, GGML[type_name]), type_name, w.shape)
    assert np.abs(ours - w).max() / np.abs(w).max() <= tolerance


def test_dequantize_rejects_unsupported_type():
    with pytest.raises(ValueError, match="unsupported GGUF tensor type Q4_K"):
        dequantize(np.zeros(144, np.uint8), "Q4_K", (256,))
