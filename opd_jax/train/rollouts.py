"""Host side of a rollout: prompts -> fixed-width token arrays, responses -> segment ids."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from opd_jax import segments
from opd_jax.models import Tokenizer, apply_chat_template, decode_with_offsets


def encode_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    length: int,
    *,
    chat_template: bool = True,
    system_prompt: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises prompts, left-padded (or truncated from the left) to ``length``.

    Returns ``tokens [B, P]`` int32 and ``mask [B, P]`` int32 (1 on real tokens).
    """
    texts = list(prompts)
    if chat_template:
        texts = apply_chat_template(tokenizer, texts, system=system_prompt or None)
    ids = tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]
    pad = pad_id(tokenizer)
    tokens = np.full((len(ids), length), pad, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    longest = max((len(row) for row in ids), default=0)
    if longest > length:
        warnings.warn(
            f"a prompt of {longest} tokens is cut to data.max_prompt_tokens={length} "
            "(its start is dropped): raise data.max_prompt_tokens to keep it whole.",
            stacklevel=2,
        )
    for b, row in enumerate(ids):
        row = row[-length:]
        tokens[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    return tokens, mask


def pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's padding id, else its EOS id, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def eos_ids(tokenizer: Tokenizer, model_eos: int | Sequence[int] | None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and the model config's."""
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    if model_eos is not None:
        ids |= {int(model_eos)} if isinstance(model_eos, int) else {int(i) for i in model_eos}
    return tuple(sorted(ids))


def response_segments(
    tokenizer: Tokenizer,
    response_tokens: np.ndarray,
    response_mask: np.ndarray,
    kind: str,
    block: int,
) -> tuple[np.ndarray, list[str]]:
    """Segment ids ``[B, N]`` of sampled responses and their decoded texts.

    Args:
      response_tokens: ``[B, N]`` the response columns of the rollouts.
      response_mask: ``[B, N]`` 1 on real response tokens (EOS included).
      kind: ``sentence``, ``fixed`` or ``token`` (see :mod:`opd_jax.segments`).
      block: tokens per segment of kind ``fixed``.
    """
    mask = np.asarray(response_mask).astype(bool)
    texts, offsets = [], []
    for row, keep in zip(np.asarray(response_tokens), mask, strict=True):
        text, spans = decode_with_offsets(tokenizer, row[keep].tolist())
        texts.append(text)
        offsets.append(spans)
    return segments.segment_ids(kind, mask, texts, offsets, tokens=block), texts
