"""Registries of named functions whose options are their keyword-only parameters.

Rules (:data:`~opd_jax.core.rules.RULES`) and losses (:data:`~opd_jax.core.losses.LOSSES`) are
both ``{name: function}`` tables: a function's options, with their defaults, are read from its
signature, so adding one is adding a function and a table entry. :func:`check_options` gives the
same error for an unknown name or option in both, naming the nearest valid one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from opd_jax.core import checks


def keyword_options(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{name: default}`` of ``fn``'s keyword-only parameters."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(
    options: Mapping[str, Any] | None, valid: Mapping[str, Any], owner: str
) -> dict[str, Any]:
    """``options`` as a dict, each name one of ``valid``: else a ``ValueError`` naming the
    nearest valid option of ``owner`` (e.g. ``"loss 'jsd'"``)."""
    for option in options or {}:
        if not valid:
            raise ValueError(f"{owner} takes no options, got {option!r}.")
        checks.require_choice(option, valid, f"option of {owner}")
    return dict(options or {})
