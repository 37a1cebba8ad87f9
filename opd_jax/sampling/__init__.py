"""Jitted KV-cache generation (:mod:`.generate`) with the sampling methods of :mod:`.methods`;
:mod:`.release_watch` stops rows where the release rule's cut is certain."""

from opd_jax.sampling.generate import (
    SampleResult,
    compacted_width,
    left_align,
    sample,
)
from opd_jax.sampling.methods import (
    Greedy,
    SamplingMethod,
    Temperature,
    TopK,
    TopP,
    method_from,
)
from opd_jax.sampling.release_watch import ReleaseWatch, final_cuts, split_release_options

__all__ = [
    "Greedy",
    "ReleaseWatch",
    "SampleResult",
    "SamplingMethod",
    "Temperature",
    "TopK",
    "TopP",
    "compacted_width",
    "final_cuts",
    "left_align",
    "method_from",
    "sample",
    "split_release_options",
]
