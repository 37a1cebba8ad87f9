"""Attention kind `"splash"`: the maintained Pallas splash attention kernel (TPU) over packed rows.

`jax.experimental.pallas.ops.tpu.splash_attention`, as MaxText calls it: one multi-head kernel
per sequence length (static causal mask, block-sparse: blocks above the diagonal are skipped),
`jax.vmap`-ed over the batch, with its own backward kernels. Grouped-query attention is native:
the MHA kernel reads kv head `n // G` for query head `n`, so keys and values are not repeated.
Each row's length enters as segment ids (real tokens 0, padding 1): causal within a segment
means every query sees at least itself, so padding queries give finite outputs nothing reads.

Off TPU the kernel runs in the Pallas interpreter (`interpret=True`): the same code path,
correct but slow; tests use it on CPU. The kernel does not scale the scores: `q` is scaled here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SPLASH_BLOCK = 512  # MaxText's default block; the largest of 512/256/128 dividing the length
_LANES = 128  # the kernel's key blocks are multiples of the TPU's 128 lanes


def splash_blocks(T: int) -> tuple[int, int]:
    """`(padded length, block)`: `T` rounded up to a multiple of 128, and the largest block of
    `SPLASH_BLOCK`, 256, 128 dividing it (little padding; every kernel block the same)."""
    padded = -(-T // _LANES) * _LANES
    block = next(b for b in (SPLASH_BLOCK, 256, _LANES) if padded % b == 0)
    return padded, block


def _kernel(T: int, N: int, block: int, interpret: bool):
    """The MHA splash kernel for `N` heads over `T` positions: causal, all blocks `block`.
    Built per trace, as MaxText does (it holds arrays; the mask's processing is cached)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((T, T))] * N)
    return sa.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(
    q_BxTxNxH: jax.Array, keys_BxTxKxH: jax.Array, values_BxTxKxH: jax.Array, lengths_B: jax.Array
) -> jax.Array:
    """Causal attention over packed rows (key `s` visible to query `t` iff `s <= t` and
    `s < length`), `[B, T, N, H]` in `q`'s dtype. The sequence is zero-padded inside to
    :func:`splash_blocks`. Interpreted (slow) unless the backend is TPU."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, N, H = q_BxTxNxH.shape
    padded, block = splash_blocks(T)
    kernel = _kernel(padded, N, block, jax.default_backend() != "tpu")

    def heads_first(x_BxTxMxH):  # -> [B, M, padded, H]
        x = jnp.pad(x_BxTxMxH, [(0, 0), (0, padded - T), (0, 0), (0, 0)])
        return jnp.transpose(x, (0, 2, 1, 3))

    q_BxNxTxH = heads_first(q_BxTxNxH * jnp.asarray(H**-0.5, q_BxTxNxH.dtype))
    segments_BxT = (jnp.arange(padded)[None, :] >= lengths_B[:, None]).astype(jnp.int32)
    out_BxNxTxH = jax.vmap(kernel)(
        q_BxNxTxH,
        heads_first(keys_BxTxKxH),
        heads_first(values_BxTxKxH),
        segment_ids=SegmentIds(q=segments_BxT, kv=segments_BxT),
    )
    return jnp.transpose(out_BxNxTxH, (0, 2, 1, 3))[:, :T]
