"""Logged per-step profiles (``metrics.jsonl`` arrays) aggregated over steps and seeds."""

from __future__ import annotations

from typing import Any

import numpy as np

Records = list[dict[str, Any]]


def mean_profile(records: Records, name: str, total: bool = False) -> np.ndarray | None:
    """The mean (or, with ``total``, the sum) of array ``name`` over the records having it."""
    rows = [r[name] for r in records if name in r]
    if not rows:
        return None
    rows = np.asarray(rows, np.float64)
    return rows.sum(0) if total else rows.mean(0)


def by_sentence(records: Records, name: str, min_share: float = 0.0) -> np.ndarray | None:
    """A per-sentence profile (``margin_by_sentence``, ...) over records, each step's value at
    an index weighted by the rows reaching it (``rows_by_sentence``); NaN where none did, or
    where fewer than ``min_share`` of the rows that have a first sentence reach the index."""
    rows = [(r[name], r["rows_by_sentence"]) for r in records if name in r]
    if not rows:
        return None
    values, counts = (np.asarray(x, np.float64) for x in zip(*rows, strict=True))
    reached = counts.sum(0)
    with np.errstate(all="ignore"):
        profile = (values * counts).sum(0) / reached
    return np.where(reached >= min_share * reached[0], profile, np.nan)
