"""Input validation shared by the functional core.

Shape, rank and option errors are raised at trace time as ``ValueError`` with a message
that names the argument, what was expected and what was given. Value checks (NaN or
infinite logits) run when the inputs are concrete (eager calls); compiled code is not
synchronised for them: under ``jax.jit`` use JAX's own ``jax_debug_nans`` flag.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import jax
import jax.numpy as jnp


def require_rank(x: jax.Array, rank: int, name: str, layout: str) -> None:
    """Raises unless ``x`` has ``rank`` dimensions; ``layout`` reads like ``"[B, T, V]"``."""
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have shape {layout}, got shape {jnp.shape(x)}.")


def require_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
    """Raises unless ``a`` and ``b`` have identical shapes."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and "
            f"{jnp.shape(b)}: pass arrays for the same batch and positions."
        )


def require_integer(x: jax.Array, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {jnp.result_type(x)}.")


def require_floating(x: jax.Array, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(x)}.")


def require_k(k: int, limit: int, what: str = "the vocabulary size") -> None:
    """Raises unless ``1 <= k <= limit``; ``what`` names the limit in the message."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
        raise ValueError(f"k={k!r} must be an integer in [1, {limit}] ({what}): lower k.")


def require_finite(x: jax.Array, name: str) -> None:
    """Raises if a concrete ``x`` holds NaN or infinity; a traced ``x`` is not inspected."""
    if isinstance(x, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(
            f"{name} contains NaN or infinite values: check the model's outputs (a diverged "
            "run or an uninitialised buffer) before scoring."
        )


def require_choice(value: str, choices: Iterable[str], what: str) -> None:
    """Raises unless ``value`` is one of ``choices``, suggesting the nearest one."""
    choices = list(choices)
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"Unknown {what} {value!r}; choose one of {sorted(choices)}.{hint}")
