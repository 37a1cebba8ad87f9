"""Tiny local checkpoints and tokenizers for tests and offline smoke runs (no downloads).

`write_tiny_checkpoint` needs `torch` (a test dependency); it is imported on use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import transformers

from opd_jax.models.families import family
from opd_jax.models.tokenizer import train_bpe_tokenizer

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. It was not amused!",
    "Distillation moves knowledge from a teacher to a student model.",
    "What is 12 + 30? The answer is 42. Let me check: 12 + 30 = 42.",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, "
    "\u65e5\u672c\u8a9e\u306e\u6587, and emoji \U0001f600\U0001f680.",
)


def train_tiny_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `SENTENCES`, with a chat template.

    Ids: `<pad>` 0, `<eos>` 1, then the chat-role tokens, the 256 bytes and the merges.
    """
    return train_bpe_tokenizer(SENTENCES, vocab_size)


def tiny_hf_config(model_type: str = "qwen3", **overrides: Any) -> dict[str, Any]:
    """A HF `config.json` dict of a 2-layer model (D=32, N=4, K=2, H=16, V=320) of a family
    in `families.FAMILIES`."""
    config = {
        "architectures": [family(model_type).hf_architecture],
        "model_type": model_type,
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    return config | overrides


def write_tiny_checkpoint(
    path: str | os.PathLike,
    hf_config: dict[str, Any],
    *,
    seed: int = 0,
    scale: float = 1.0,
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
) -> Path:
    """Saves a random `transformers` model (and tokenizer) to `path` with `save_pretrained`.

    Weights are HF's init plus N(0, 0.05) noise (so norms and biases are not trivial), then
    multiplied by `scale` (> 1 gives peakier next-token distributions).
    """
    import torch

    path = Path(path)
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p)).mul_(scale)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
