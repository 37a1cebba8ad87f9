"""How far a student is from its teacher on the student's own samples: the per-token KL.

``token_reverse_kl(student, teacher, tokens, attention_mask, prompt_len)`` gives, at each
response position of sampled sequences, ``KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) -
log p_T(v))`` over the whole vocabulary, the quantity on-policy distillation lowers. Scored in
chunks (:func:`opd_jax.core.score_chunked`): the ``[B, N, V]`` logits are never formed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import core
from opd_jax.models import Decoder


@functools.partial(jax.jit, static_argnames=("graphs", "prompt_len", "chunk_size"))
def _token_kl(graphs, states, tokens_BxS, mask_BxS, *, prompt_len: int, chunk_size: int):
    student, teacher = (nnx.merge(g, s) for g, s in zip(graphs, states, strict=True))
    h_s = student.response_hidden(tokens_BxS, mask_BxS, prompt_len)
    h_t = teacher.response_hidden(tokens_BxS, mask_BxS, prompt_len)
    scored = core.score_chunked(
        h_s,
        student.unembed_matrix(),
        h_t,
        teacher.unembed_matrix(),
        tokens_BxS[:, prompt_len:],
        k=1,
        loss_kind="reverse_kl",
        chunk_size=chunk_size,
    )
    return scored.token_loss


def token_reverse_kl(
    student: Decoder,
    teacher: Decoder,
    tokens_BxS: jax.Array,
    attention_mask_BxS: jax.Array,
    prompt_len: int,
    *,
    chunk_size: int = 1024,
) -> jax.Array:
    """``[B, N]`` float32: ``KL(p_S || p_T)`` at the response columns ``[P, S)`` of
    ``tokens_BxS`` (prompt in ``[0, P)``); values off the response are meaningless, mask
    them with the response mask. Both models must share the vocabulary."""
    graphs, states = zip(*(nnx.split(m) for m in (student, teacher)), strict=True)
    return _token_kl(
        graphs,
        states,
        jnp.asarray(tokens_BxS),
        jnp.asarray(attention_mask_BxS),
        prompt_len=prompt_len,
        chunk_size=chunk_size,
    )
