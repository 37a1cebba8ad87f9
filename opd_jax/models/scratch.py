"""Randomly initialised checkpoints, written offline: test pairs and the start of a new model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from opd_jax.models.architecture import ModelConfig
from opd_jax.models.decoder import Decoder
from opd_jax.models.hf import save_hf


def init_checkpoint(
    path: str | os.PathLike,
    hf_config: dict[str, Any],
    tokenizer: Any,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
) -> Path:
    """Initialises a :class:`Decoder` from a HF ``config.json`` dict and saves it (with the
    tokenizer) as a Hugging Face directory at ``path``. No torch, no network."""
    config = ModelConfig.from_hf(hf_config, param_dtype=dtype)
    save_hf(Decoder(config, rngs=nnx.Rngs(seed)), tokenizer, path)
    return Path(path)
