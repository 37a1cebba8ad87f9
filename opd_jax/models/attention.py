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
    H = q_BxTxKxGxH.shape[-1]
    scores_BxKxGxTxS = (
        jnp.einsum(f"btkgh,{layout}->bkgts", q_BxTxKxGxH, keys, preferred_element_type=jnp.float32)
        * H**-0.5
    )
    scores_BxKxGxTxS = jnp.where(visible_BxTxS[:, None, None], scores_BxKxGxTxS, NEG_INF)
    return jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(dtype)


def cached_attention(
    q_BxTxNxH: jax.Array,
    keys_BxKxSxH: jax.Array,
    values_BxKxSxH: jax.Array,
    visible_BxTxS: jax.Array,
    dtype: jnp.dtype,
) -> jax.Array:
    """:func:`masked_attention` over a KV cache's slots, `[B, T, N, H]`; the keys and values
    are laid out `[B, K, S, H]` as the dots read them (see `models.decoder.KVCache`)."""
    B, T, N, H = q_BxTxNxH.shape
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, keys_BxKxSxH.shape[1], -1, H)
    probs_BxKxGxTxS = _masked_probs(q_BxTxKxGxH, keys_BxKxSxH, "bksh", visible_BxTxS, dtype)
    # [G T, S] @ [S, H] per (b, k): the cache read as it lies
    out_BxKxGxTxH = jnp.einsum("bkgts,bksh->bkgth", probs_BxKxGxTxS, values_BxKxSxH)
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
    each block's probabilities once from the saved log-sum-exp. Memory: `O(B N T H)` plus one
    `[B, N, block, block]` block of scores at a time. Scores and accumulators are float32;
    the matmul operands keep the inputs' dtype. Reverse-mode only (a `custom_vjp`: no `jvp`).
    """
    B, T, N, H = q_BxTxNxH.shape
    K = keys_BxTxKxH.shape[2]
    n = -(-T // block)
    C = -(-T // n // 8) * 8 if T > 8 else T  # n near-equal blocks: little padding
    n = -(-T // C)

    def blocks(x_BxTxMxH):  # -> [n, B, M, C, H], zero-padded
        x = jnp.pad(x_BxTxMxH, [(0, 0), (0, n * C - T), (0, 0), (0, 0)])
        return jnp.transpose(x.reshape(B, n, C, x.shape[2], H), (1, 0, 3, 2, 4))

    q_nxBxKxGxCxH = blocks(q_BxTxNxH).reshape(n, B, K, N // K, C, H)
    k_nxBxKxCxH, v_nxBxKxCxH = blocks(keys_BxTxKxH), blocks(values_BxTxKxH)
    out = _flash(q_nxBxKxGxCxH, k_nxBxKxCxH, v_nxBxKxCxH, lengths_B.astype(jnp.int32), C)
    out_BxTxNxH = jnp.transpose(out.reshape(n, B, N, C, H), (1, 0, 3, 2, 4))
    return out_BxTxNxH.reshape(B, n * C, N, H)[:, :T]


def _visible(i: jax.Array, j: jax.Array, C: int, lengths_B: jax.Array) -> jax.Array:
    """`[B, 1, 1, C, C]`: query block `i` may see key block `j` (causal, within length)."""
    q_pos, k_pos = i * C + jnp.arange(C), j * C + jnp.arange(C)
    causal_CxC = k_pos[None, :] <= q_pos[:, None]
    return causal_CxC[None, None, None] & (k_pos < lengths_B[:, None])[:, None, None, None, :]


def _scores(q_i, k_j, i, j, C, lengths_B):
    """Scaled float32 scores `[B, K, G, C, C]` of query block `i` against key block `j`
    (`NEG_INF` where invisible) and the visibility."""
    scale = q_i.shape[-1] ** -0.5
    s = jnp.einsum("bkgch,bkdh->bkgcd", q_i, k_j, preferred_element_type=jnp.float32) * scale
    visible = _visible(i, j, C, lengths_B)
    return jnp.where(visible, s, NEG_INF), visible


def _key_blocks(lengths_B: jax.Array, C: int) -> jax.Array:
    """The number of key blocks holding a real token of some row (packed rows: the first)."""
    return (lengths_B.max() + C - 1) // C


def _flash_forward(q, k, v, lengths_B, C):
    """`(out [n, B, K, G, C, H], lse [n, B, K, G, C])`."""
    n = q.shape[0]
    last = _key_blocks(lengths_B, C)

    def query_block(i):
        q_i = q[i]
        shape = q_i.shape[:-1]

        def key_block(j, carry):
            m, total, acc = carry
            s, visible = _scores(q_i, k[j], i, j, C, lengths_B)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            total = total * correction + p.sum(-1)
            pv = jnp.einsum(
                "bkgcd,bkdh->bkgch", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32
            )
            return m_new, total, acc * correction[..., None] + pv

        init = (
            jnp.full(shape, NEG_INF, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_i.shape, jnp.float32),
        )
        m, total, acc = jax.lax.fori_loop(0, jnp.minimum(i + 1, last), key_block, init)
        total = jnp.where(total > 0, total, 1.0)  # a row with no visible key: output 0
        return (acc / total[..., None]).astype(q.dtype), m + jnp.log(total)

    return jax.lax.map(query_block, jnp.arange(n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, lengths_B, C):
    return _flash_forward(q, k, v, lengths_B, C)[0]


def _flash_fwd(q, k, v, lengths_B, C):
    out, lse = _flash_forward(q, k, v, lengths_B, C)
    return out, (q, k, v, lengths_B, out, lse)


def _flash_bwd(C, residuals, d_out):
    """One pass over key blocks `j` (a scan carrying the float32 `dq`), each visiting query
    blocks `i >= j`: every block's scores and `dO V^T` are recomputed once."""
    q, k, v, lengths_B, out, lse = residuals
    n = q.shape[0]
    last = _key_blocks(lengths_B, C)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [n, B, K, G, C]
    scale = q.shape[-1] ** -0.5

    def key_block(dq, j):
        def query_block(i, carry):
            dq, dk, dv = carry
            s, visible = _scores(q[i], k[j], i, j, C, lengths_B)
            p = jnp.where(visible, jnp.exp(s - lse[i][..., None]), 0.0)
            dp = jnp.einsum("bkgch,bkdh->bkgcd", d_out[i], v[j], preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None])
            dv = dv + jnp.einsum(
                "bkgcd,bkgch->bkdh", p.astype(v.dtype), d_out[i], preferred_element_type=jnp.float32
            )
            dk = dk + jnp.einsum(
                "bkgcd,bkgch->bkdh", ds.astype(q.dtype), q[i], preferred_element_type=jnp.float32
            )
            dq_i = jnp.einsum(
                "bkgcd,bkdh->bkgch", ds.astype(k.dtype), k[j], preferred_element_type=jnp.float32
            )
            return dq.at[i].add(dq_i), dk, dv

        zeros = jnp.zeros(k.shape[1:], jnp.float32)
        end = jnp.where(j < last, n, j)  # key blocks past every row's length: nothing to do
        dq, dk, dv = jax.lax.fori_loop(j, end, query_block, (dq, zeros, zeros))
        return dq, ((dk * scale).astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(n))
    return (dq * scale).astype(q.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
