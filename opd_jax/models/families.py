"""The decoder families opd_jax reads and writes, one named `Family` entry each.

A family is everything that tells Qwen3, Qwen2 and Llama (SmolLM2 is a Llama) apart; the rest
of a model comes from its `config.json`. `ModelConfig`, the HF and GGUF readers and writers
read the entry, so a family that differs only in these fields is added by one `FAMILIES` entry.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from typing import Any

from opd_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Family:
    """What sets one decoder family apart; every other hyper-parameter is the config's."""

    # HF `config.json` "model_type"; the key in `FAMILIES`.
    model_type: str
    # HF "architectures" entry, the `transformers` class: e.g. "LlamaForCausalLM".
    hf_architecture: str
    # llama.cpp's "general.architecture"; None: not read from GGUF.
    gguf_architecture: str | None = None
    # An RMSNorm over each head of q and k before RoPE (Qwen3).
    qk_norm: bool = False
    # q/k/v biases always and no o bias (Qwen2); elsewhere `attention_bias` sets q/k/v/o biases.
    qkv_bias: bool = False
    # llama.cpp's converter interleaves the rotary halves of q/k rows (llama); read undoes it.
    gguf_rotary_permuted: bool = False
    # The keys `ModelConfig.to_hf` writes for this family only, e.g. `{"mlp_bias": False}`.
    hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "hf_defaults", types.MappingProxyType(dict(self.hf_defaults)))


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            gguf_architecture="qwen3",
            qk_norm=True,
            hf_defaults={"use_sliding_window": False},
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            gguf_architecture="qwen2",
            qkv_bias=True,
            hf_defaults={"use_sliding_window": False},
        ),
        Family(
            "llama",
            "LlamaForCausalLM",
            gguf_architecture="llama",
            gguf_rotary_permuted=True,
            hf_defaults={"mlp_bias": False},
        ),
    )
}


def family(model_type: Any, *, architectures: Iterable[str] | None = None) -> Family:
    """The registered family of `model_type`; `InputError` naming the supported ones otherwise.

    `architectures` (a `config.json`'s, if any) is named in the error to help tell the model.
    """
    if model_type not in FAMILIES:
        seen = "" if architectures is None else f" (architectures={list(architectures)})"
        raise InputError(
            f"Unknown model_type {model_type!r}{seen}; supported: {sorted(FAMILIES)} "
            "(SmolLM2 checkpoints use model_type 'llama')."
        )
    return FAMILIES[model_type]


def gguf_family(architecture: str) -> Family | None:
    """The family llama.cpp names `architecture` (GGUF "general.architecture"), or None."""
    return next((f for f in FAMILIES.values() if f.gguf_architecture == architecture), None)


def gguf_architectures() -> list[str]:
    """The GGUF architecture names of the registered families, sorted."""
    return sorted(f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture)
