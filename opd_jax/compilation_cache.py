"""JAX's persistent compilation cache, as ``run.compilation_cache`` names it."""

from __future__ import annotations

import os


def use_compilation_cache(path: str) -> None:
    """Points JAX's persistent compilation cache at ``path`` (``""``: off), so that running a
    command again loads what it compiled before."""
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
