"""`ModelConfig`: a decoder of one family (`families.FAMILIES`) from a HF `config.json`.

The config is a frozen, hashable dataclass (it is static data of the NNX graph, so it keys
`jit` caches). `ModelConfig.from_hf(dict)` reads a Hugging Face `config.json` in either the
transformers 4 layout (`rope_theta` + `rope_scaling`) or the transformers 5 layout
(`rope_parameters`); `to_hf()` writes it back so that `transformers` can load it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from opd_jax.errors import InputError
from opd_jax.models import families

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _dtype(name: Any) -> jnp.dtype:
    dtype = jnp.dtype(name)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise InputError(f"dtype must be float32 or bfloat16, got {dtype}.")
    return dtype


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (Qwen3 / Qwen2 / Llama / SmolLM2).

    `param_dtype` is the storage dtype of the parameters, `dtype` the compute dtype of
    activations; logits are always float32. `rope_params` holds the HF rope-scaling keys
    (e.g. `factor`) as sorted `(key, value)` pairs so the config stays hashable.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    attention_bias: bool = False  # HF meaning: q/k/v/o biases (llama, qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: jnp.dtype = jnp.dtype(jnp.float32)
    dtype: jnp.dtype = jnp.dtype(jnp.float32)
    # The tokenizer's vocabulary when the embedding is padded past it (Qwen2.5's 152,064 rows
    # for 151,665 tokens): logits, sampling and scoring use only these ids. Not in config.json.
    token_vocab: int | None = None

    def __post_init__(self):
        families.family(self.model_type)
        if self.rope_type not in ROPE_TYPES:
            raise InputError(
                f"Unsupported rope scaling {self.rope_type!r}; supported: {ROPE_TYPES}."
            )
        if self.num_heads % self.num_kv_heads:
            raise InputError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}."
            )
        if self.token_vocab is not None and not 0 < self.token_vocab <= self.vocab_size:
            raise InputError(
                f"token_vocab={self.token_vocab} must be in [1, vocab_size={self.vocab_size}]: "
                "the tokenizer has more tokens than the model's embedding has rows."
            )
        object.__setattr__(self, "param_dtype", _dtype(self.param_dtype))
        object.__setattr__(self, "dtype", _dtype(self.dtype))

    @classmethod
    def from_hf(
        cls, hf: Mapping[str, Any], *, param_dtype: Any = jnp.float32, dtype: Any = None
    ) -> ModelConfig:
        """Builds the config from a HF `config.json` dict; `dtype` defaults to `param_dtype`."""
        fam = families.family(hf.get("model_type"), architectures=hf.get("architectures"))
        archs = hf.get("architectures") or [fam.hf_architecture]
        if fam.hf_architecture not in archs:
            raise InputError(
                f"Unknown architecture {archs} for model_type {fam.model_type!r}; expected "
                f"{fam.hf_architecture}."
            )
        if hf.get("use_sliding_window"):
            raise InputError(
                "Sliding-window attention is not supported; set use_sliding_window=false."
            )
        if hf.get("mlp_bias"):
            raise InputError("mlp_bias=true is not supported.")
        if hf.get("hidden_act", "silu") != "silu":
            raise InputError(f"Only hidden_act='silu' is supported, got {hf['hidden_act']!r}.")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise InputError("partial_rotary_factor != 1 is not supported.")
        rope.pop("partial_rotary_factor", None)
        eos = hf.get("eos_token_id")
        num_heads = hf["num_attention_heads"]
        return cls(
            model_type=fam.model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=tuple(sorted(rope.items())),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=fam.qk_norm,
            attention_bias=bool(hf.get("attention_bias", False)) and not fam.qkv_bias,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            param_dtype=param_dtype,
            dtype=param_dtype if dtype is None else dtype,
        )

    @property
    def family(self) -> families.Family:
        """The registered family of `model_type`."""
        return families.family(self.model_type)

    def fitted_to(self, vocab: int) -> ModelConfig:
        """This config scoring over the first ``vocab`` ids when its embedding is padded past
        them (``token_vocab``); itself otherwise (an embedding smaller than ``vocab`` never
        produces the ids past it)."""
        if self.vocab_size > vocab:
            return dataclasses.replace(self, token_vocab=vocab)
        return self

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections have biases: `attention_bias`, or always in the family (Qwen2)."""
        return self.attention_bias or self.family.qkv_bias

    @property
    def out_bias(self) -> bool:
        """The o projection has a bias: `attention_bias`, unless the family's are q/k/v only."""
        return self.attention_bias and not self.family.qkv_bias

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers 5 layout) for this config."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        hf: dict[str, Any] = {
            "architectures": [self.family.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {
                "rope_type": self.rope_type,
                "rope_theta": self.rope_theta,
                **dict(self.rope_params),
            },
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": str(self.param_dtype),
        }
        return hf | dict(self.family.hf_defaults)

    def rope_inv_freq(self) -> tuple[np.ndarray, float]:
        """RoPE inverse frequencies `[head_dim // 2]` (float32) and the cos/sin scale.

        Follows `transformers.modeling_rope_utils` for `default`, `linear`, `llama3`, `yarn`.
        """
        dim, base, p = self.head_dim, self.rope_theta, dict(self.rope_params)
        inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        if self.rope_type == "linear":
            return (inv_freq / p["factor"]).astype(np.float32), 1.0
        if self.rope_type == "llama3":
            factor, old_len = p["factor"], p["original_max_position_embeddings"]
            low, high = p["low_freq_factor"], p["high_freq_factor"]
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
        if self.rope_type == "yarn":
            return _yarn(inv_freq, dim, base, p, self.max_position_embeddings)
        return inv_freq.astype(np.float32), 1.0


def _yarn(
    inv_freq: np.ndarray, dim: int, base: float, p: dict[str, Any], max_pos: int
) -> tuple[np.ndarray, float]:
    """YaRN frequencies (NTK-by-parts ramp) and attention factor, as in transformers."""
    old_len = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(p.get("beta_fast") or 32)
    high = correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv.astype(np.float32), float(attention)
