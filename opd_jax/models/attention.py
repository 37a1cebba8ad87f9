"""Attention kernels of the decoder's training path (no cache), and the choice among them.

Shape letters: B batch, T queries, S keys, N query heads, K key/value heads, G = N // K,
H head width, C a block of positions, n blocks.

- `"xla"`, :func:`masked_attention`: the masked `[T, S]` scores in float32, any mask, every
  backend; :func:`chunked_attention` forms them `chunk` queries at a time.
- `"cudnn"`, :func:`packed_attention`: cuDNN's fused flash attention
  (`jax.nn.dot_product_attention`; CUDA GPUs, bfloat16/float16).
- `"flash"`, :func:`flash_attention`: FlashAttention-2's algorithm in `jax.numpy` with its own
  VJP: causal blocks only, online softmax, `O(T)` memory; any backend and dtype (TPU, CPU).
- `"splash"`, :func:`opd_jax.models.splash.splash_attention`: the maintained Pallas splash
  attention kernel with its own backward (TPU; elsewhere the Pallas interpreter: slow, tests).

The packed kernels (`cudnn`, `flash`, `splash`) take rows whose real tokens come first: key `s` is
visible to query `t` iff `s <= t` and `s < length` (`Decoder.hidden` packs the rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from opd_jax.errors import InputError
from opd_jax.models.splash import splash_attention

NEG_INF = -1e30  # finite, so rows with no visible key give a uniform, not NaN, softmax
ATTENTION_KINDS = ("xla", "cudnn", "flash", "splash")
PACKED_KINDS = ("cudnn", "flash", "splash")
FLASH_BLOCK = 512  # flash's default block (train.attention_chunk: 0); fastest on CPU of 128-512
# The kernel behind "cudnn" (tests run the same path on CPU with XLA's kernel).
_PACKED_IMPLEMENTATION = "cudnn"
_PACKED_MULTIPLE = 64


def resolve_attention(kind: str, dtypes: tuple[jnp.dtype, ...], query_chunk: int = 0) -> str:
    """`"auto"` -> `"cudnn"` on a CUDA GPU when every compute dtype is 16-bit and no query
    chunking is asked for; `"xla"` on other GPUs; `"splash"` on TPU when no query chunking is
    asked for; `"flash"` elsewhere (CPU; TPU with chunking). The named kinds are checked and
    returned; `"splash"` runs anywhere (off TPU in the Pallas interpreter: slow)."""
    half = all(jnp.dtype(d) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) for d in dtypes)
    gpu = jax.default_backend() == "gpu"
    cuda = gpu and "rocm" not in jax.devices()[0].client.platform_version
    if kind == "auto":
        if cuda and half and not query_chunk:
            return "cudnn"
        if jax.default_backend() == "tpu" and not query_chunk:
            return "splash"
        return "xla" if gpu else "flash"
    if kind not in ATTENTION_KINDS:
        raise InputError(f"attention must be 'auto' or one of {ATTENTION_KINDS}, got {kind!r}.")
    if kind == "cudnn" and not (cuda and half):
        raise InputError(
            "attention 'cudnn' needs a CUDA GPU and bfloat16/float16 compute (this run: "
            f"backend {jax.default_backend()!r}, dtypes {[str(jnp.dtype(d)) for d in dtypes]}); "
            "use 'auto', 'flash' or 'xla'."
        )
    if kind in ("cudnn", "splash") and query_chunk:
        raise InputError(
            f"query chunking applies to attention 'xla' and 'flash', not {kind!r} (its kernel "
            "has its own blocks)."
        )
    return kind


def attend(
    kind: str,
    q_BxTxNxH: jax.Array,
    keys_BxSxKxH: jax.Array,
    values_BxSxKxH: jax.Array,
    visible: jax.Array,
    chunk: int,
    dtype: jnp.dtype,
) -> jax.Array:
    """`[B, T, N, H]` by kernel `kind`. `visible`: `[B, T, S]` for `"xla"` (attending `chunk`
    queries at a time if `0 < chunk < T`); the rows' lengths `[B]` for the packed kinds
    (`"flash"` in blocks of `chunk`, 0: `FLASH_BLOCK`)."""
    if kind == "cudnn":
        return packed_attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, visible)
    if kind == "splash":
        return splash_attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, visible)
    if kind == "flash":
        return flash_attention(
            q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, visible, chunk or FLASH_BLOCK
        )
    B, T, N, H = q_BxTxNxH.shape
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, keys_BxSxKxH.shape[2], -1, H)
    if 0 < chunk < T:
        out = chunked_attention(q_BxTxKxGxH, keys_BxSxKxH, values_BxSxKxH, visible, chunk, dtype)
    else:
        out = masked_attention(q_BxTxKxGxH, keys_BxSxKxH, values_BxSxKxH, visible, dtype)
    return out.reshape(B, T, N, H)


def masked_attention(
    q_BxTxKxGxH: jax.Array,
    keys_BxSxKxH: jax.Array,
    values_BxSxKxH: jax.Array,
    visible_BxTxS: jax.Array,
    dtype: jnp.dtype,
) -> jax.Array:
    """Masked softmax attention of grouped queries over all `S` keys, `[B, T, K, G, H]`."""
    probs_BxKxGxTxS = _masked_probs(q_BxTxKxGxH, keys_BxSxKxH, "bskh", visible_BxTxS, dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, values_BxSxKxH)


def _masked_probs(
    q_BxTxKxGxH: jax.Array,
    keys: jax.Array,
    layout: str,
    visible_BxTxS: jax.Array,
    dtype: jnp.dtype,
) -> jax.Array:
    """`softmax(q k / sqrt(H))` over the visible keys, `[B, K, G, T, S]` in `dtype`; `keys`
    are laid out as `layout` says (`"bskh"` or `"bksh"`)."""
    scores_BxKxGxTxS = _masked_scores(q_BxTxKxGxH, keys, layout, visible_BxTxS)
    return jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(dtype)


def _masked_scores(
    q_BxTxKxGxH: jax.Array, keys: jax.Array, layout: str, visible_BxTxS: jax.Array
) -> jax.Array:
    """`q k / sqrt(H)` in float32, `NEG_INF` where a key is not visible, `[B, K, G, T, S]`."""
    H = q_BxTxKxGxH.shape[-1]
    scores_BxKxGxTxS = (
        jnp.einsum(f"btkgh,{layout}->bkgts", q_BxTxKxGxH, keys, preferred_element_type=jnp.float32)
        * H**-0.5
    )
    return jnp.where(visible_BxTxS[:, None, None], scores_BxKxGxTxS, NEG_INF)


def cached_attention(
    q_BxTxNxH: jax.Array,
    keys_BxKxSxH: jax.Array,
    values_BxKxSxH: jax.Array,
    visible_BxTxS: jax.Array,
    dtype: jnp.dtype,
    own: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """:func:`masked_attention` over a KV cache's slots, `[B, T, N, H]`; the keys and values
    are laid out `[B, K, S, H]` as the dots read them (see `models.decoder.KVCache`). With
    `own = (keys, values [B, K, T, H], visible [B, T, T])` the queries attend over those
    too, in the same softmax: a call's own keys beside the cache as it was before it (so the
    cache is read before the call writes its slots, and that write happens in place)."""
    B, T, N, H = q_BxTxNxH.shape
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, keys_BxKxSxH.shape[1], -1, H)
    scores = _masked_scores(q_BxTxKxGxH, keys_BxKxSxH, "bksh", visible_BxTxS)
    S = scores.shape[-1]
    if own is not None:
        own_scores = _masked_scores(q_BxTxKxGxH, own[0], "bksh", own[2])
        scores = jnp.concatenate([scores, own_scores], axis=-1)
    probs_BxKxGxTxS = jax.nn.softmax(scores, axis=-1).astype(dtype)
    # [G T, S] @ [S, H] per (b, k): the cache read as it lies
    out_BxKxGxTxH = jnp.einsum("bkgts,bksh->bkgth", probs_BxKxGxTxS[..., :S], values_BxKxSxH)
    if own is not None:
        out_BxKxGxTxH += jnp.einsum("bkgts,bksh->bkgth", probs_BxKxGxTxS[..., S:], own[1])
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def chunked_attention(
    q_BxTxKxGxH: jax.Array,
    keys_BxSxKxH: jax.Array,
    values_BxSxKxH: jax.Array,
    visible_BxTxS: jax.Array,
    chunk: int,
    dtype: jnp.dtype,
) -> jax.Array:
    """:func:`masked_attention`, `chunk` queries at a time (`lax.map`, each rematerialised)."""
    B, T = q_BxTxKxGxH.shape[:2]
    n = -(-T // chunk)
    pad = n * chunk - T

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(xs):
        q_BxCxKxGxH, visible_BxCxS = xs
        return masked_attention(q_BxCxKxGxH, keys_BxSxKxH, values_BxSxKxH, visible_BxCxS, dtype)

    out_nxBxCxKxGxH = jax.lax.map(one, (split(q_BxTxKxGxH), split(visible_BxTxS)))
    out = jnp.moveaxis(out_nxBxCxKxGxH, 0, 1).reshape((B, n * chunk) + out_nxBxCxKxGxH.shape[3:])
    return out[:, :T]


def packed_attention(
    q_BxTxNxH: jax.Array, keys_BxSxKxH: jax.Array, values_BxSxKxH: jax.Array, lengths_B: jax.Array
) -> jax.Array:
    """cuDNN's fused attention over packed rows, `[B, T, N, H]` (never forms the scores).
    Queries past a row's length see all its real keys (finite outputs nothing reads); a row
    with no real token attends its first position. The
    sequence is zero-padded inside to a multiple of 64 (cuDNN's training kernels refuse some
    lengths, e.g. odd ones)."""
    T = q_BxTxNxH.shape[1]
    pad = [(0, 0), (0, -T % _PACKED_MULTIPLE), (0, 0), (0, 0)]
    lengths_B = jnp.maximum(lengths_B, 1)  # an all-padding row: finite outputs, never NaN
    out_BxTxNxH = jax.nn.dot_product_attention(
        jnp.pad(q_BxTxNxH, pad),
        jnp.pad(keys_BxSxKxH, pad),
        jnp.pad(values_BxSxKxH, pad),
        is_causal=True,
        key_value_seq_lengths=lengths_B,
        implementation=_PACKED_IMPLEMENTATION,
    )
    return out_BxTxNxH[:, :T]


def flash_attention(
    q_BxTxNxH: jax.Array,
    keys_BxTxKxH: jax.Array,
    values_BxTxKxH: jax.Array,
    lengths_B: jax.Array,
    block: int = FLASH_BLOCK,
) -> jax.Array:
    """Causal attention over packed rows in query and key blocks of about `block` positions
    (`ceil(T / block)` near-equal blocks, multiples of 8, so padding stays small), `[B, T, N, H]`.

    Query block `i` visits key blocks `0..i` only (about half the work of the full scores),
    and none past the longest row, with a running max and sum; the backward pass recomputes
    each block's probabilities once from the saved log-sum-exp. Only the diagonal block is
    masked (causally): a real query sees no key past its row's length by causality alone, and
    a query past it (padding) attends over earlier padding too, a finite output nothing reads.
    The `G` query heads sharing a key/value head are one `[G C, H]` block, so every block
    product is one matmul per kv head, and each operand is laid out once, before the loops, as
    its products read it (the backward forms the transposed scores `[C, G C]`): no transpose
    per block. Memory: `O(B N T H)` plus one `[B, N, block, block]` block of scores at a time.
    Scores and accumulators are float32; the matmul operands keep the inputs' dtype.
    Reverse-mode only (a `custom_vjp`: no `jvp`).
    """
    B, T, N, H = q_BxTxNxH.shape
    K = keys_BxTxKxH.shape[2]
    n = -(-T // block)
    C = -(-T // n // 8) * 8 if T > 8 else T  # n near-equal blocks: little padding
    n = -(-T // C)

    def blocks(x_BxTxMxH):  # -> [n, B, M, C, H], zero-padded
        x = jnp.pad(x_BxTxMxH, [(0, 0), (0, n * C - T), (0, 0), (0, 0)])
        return jnp.transpose(x.reshape(B, n, C, x.shape[2], H), (1, 0, 3, 2, 4))

    q_nxBxKxGCxH = blocks(q_BxTxNxH).reshape(n, B, K, N // K * C, H)
    kT_nxBxKxHxC = jnp.swapaxes(blocks(keys_BxTxKxH), -1, -2)
    last = _key_blocks(lengths_B.astype(jnp.int32), C)
    out = _flash(q_nxBxKxGCxH, kT_nxBxKxHxC, blocks(values_BxTxKxH), last, C)
    out_BxTxNxH = jnp.transpose(out.reshape(n, B, N, C, H), (1, 0, 3, 2, 4))
    return out_BxTxNxH.reshape(B, n * C, N, H)[:, :T]


def _key_blocks(lengths_B: jax.Array, C: int) -> jax.Array:
    """The number of key blocks holding a real token of some row (packed rows: the first)."""
    return (lengths_B.max() + C - 1) // C


def _causal(C: int, G: int) -> jax.Array:
    """`[G C, C]`: query `c` of each of the `G` heads may see key `d <= c` (the diagonal block)."""
    return jnp.tile(jnp.arange(C)[None, :] <= jnp.arange(C)[:, None], (G, 1))


def _flash_forward(q, kT, v, last, C):
    """`(out [n, B, K, G C, H], lse [n, B, K, G C])`, one row at a time (`lax.map`): a block's
    scores stay in cache at any batch size (at B=16, T=304: 37 -> 21 ms on 2 CPU cores)."""

    def rows(x):  # [n, B, ...] -> [B, n, 1, ...]
        return jnp.moveaxis(x, 1, 0)[:, :, None]

    out, lse = jax.lax.map(lambda row: _row_forward(*row, last, C), (rows(q), rows(kT), rows(v)))
    return jnp.moveaxis(out[:, :, 0], 0, 1), jnp.moveaxis(lse[:, :, 0], 0, 1)


def _row_forward(q, kT, v, last, C):
    """:func:`_flash_forward` of one row (`B = 1`); the log-sum-exp is of the scaled scores.
    Query block `i` visits key blocks `j < min(i, last)` unmasked, then its diagonal (if
    `i < last`): every real query sees itself, so only an empty batch has no visible key."""
    n, G = q.shape[0], q.shape[3] // C
    scale = q.shape[-1] ** -0.5
    causal = _causal(C, G)

    def query_block(i):
        q_i = q[i]
        shape = q_i.shape[:-1]

        def key_block(j, carry, mask=None):
            m, total, acc = carry
            s = jnp.einsum("bkch,bkhd->bkcd", q_i, kT[j], preferred_element_type=jnp.float32)
            if mask is not None:
                s = jnp.where(mask, s, NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp((s - m_new[..., None]) * scale)
            correction = jnp.exp((m - m_new) * scale)
            pv = jnp.einsum(
                "bkcd,bkdh->bkch", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32
            )
            return m_new, total * correction + p.sum(-1), acc * correction[..., None] + pv

        init = (
            jnp.full(shape, NEG_INF, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_i.shape, jnp.float32),
        )
        carry = jax.lax.fori_loop(0, jnp.minimum(i, last), key_block, init)
        diagonal = functools.partial(key_block, i, mask=causal)
        m, total, acc = jax.lax.cond(i < last, diagonal, lambda c: c, carry)
        total = jnp.where(total > 0, total, 1.0)  # no visible key (an empty batch): output 0
        return (acc / total[..., None]).astype(q.dtype), m * scale + jnp.log(total)

    return jax.lax.map(query_block, jnp.arange(n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, kT, v, last, C):
    return _flash_forward(q, kT, v, last, C)[0]


def _flash_fwd(q, kT, v, last, C):
    out, lse = _flash_forward(q, kT, v, last, C)
    return out, (q, kT, v, last, out, lse)


def _flash_bwd(C, residuals, d_out):
    """One pass over key blocks `j < last` (a scan carrying the float32 `dq^T`), each visiting
    query blocks `i >= j`, the blocks the forward visited. Each block's transposed scores
    `[C, G C]` and `V dO^T` are recomputed once; all five products read their operands as laid
    out (`q`, `q^T`, `dO`, `dO^T`, `k`, `k^T`, formed once here)."""
    q, kT, v, last, out, lse = residuals
    n, G = q.shape[0], q.shape[3] // C
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [n, B, K, G C]
    qT, d_outT, k = (jnp.swapaxes(x, -1, -2) for x in (q, d_out, kT))
    causal_T = _causal(C, G).T  # [C, G C]

    def key_block(dqT, j):
        def query_block(i, carry, mask=None):
            dqT, dk, dv = carry
            sT = jnp.einsum("bkdh,bkhc->bkdc", k[j], qT[i], preferred_element_type=jnp.float32)
            pT = jnp.exp(sT * scale - lse[i][..., None, :])
            if mask is not None:
                pT = jnp.where(mask, pT, 0.0)
            dpT = jnp.einsum("bkdh,bkhc->bkdc", v[j], d_outT[i], preferred_element_type=jnp.float32)
            dsT = pT * (dpT - delta[i][..., None, :])
            dv = dv + jnp.einsum(
                "bkdc,bkch->bkdh", pT.astype(v.dtype), d_out[i], preferred_element_type=jnp.float32
            )
            dk = dk + jnp.einsum(
                "bkdc,bkch->bkdh", dsT.astype(q.dtype), q[i], preferred_element_type=jnp.float32
            )
            dqT_i = jnp.einsum(
                "bkhd,bkdc->bkhc", kT[j], dsT.astype(kT.dtype), preferred_element_type=jnp.float32
            )
            return dqT.at[i].add(dqT_i), dk, dv

        zeros = jnp.zeros(k.shape[1:], jnp.float32)

        def visit(dqT):
            carry = query_block(j, (dqT, zeros, zeros), mask=causal_T)
            return jax.lax.fori_loop(j + 1, n, query_block, carry)

        dqT, dk, dv = jax.lax.cond(j < last, visit, lambda d: (d, zeros, zeros), dqT)
        return dqT, ((dk * scale).astype(kT.dtype), dv.astype(v.dtype))

    dqT, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qT.shape, jnp.float32), jnp.arange(n))
    dq = jnp.swapaxes(dqT, -1, -2) * scale
    return dq.astype(q.dtype), jnp.swapaxes(dk, -1, -2), dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
