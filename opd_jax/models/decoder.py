"""The decoder (Qwen3 / Qwen2 / Llama / SmolLM2) in Flax NNX, with an optional KV cache.

Shape letters: B batch, T new tokens, S keys (cache slots or T), D model width, N query
heads, K key/value heads, G = N // K query heads per KV head, H head width, F MLP width,
V vocabulary, L layers.

Padding: `attention_mask [B, T]` (1 = real token) may pad on either side. A query attends
key `s` iff `s` holds a real token and `s <= its own index` (causal by index, so left- and
right-padded rows give their real tokens the same outputs as unpadded rows). Positions
default to the running count of real tokens, `cumsum(mask) - 1` (continuing the cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.models import attention as kernels
from opd_jax.models.architecture import ModelConfig
from opd_jax.models.projections import dense, in_dtype, swiglu_down, under_qwix
from opd_jax.sharding import DEFAULT_RULES, ShardingRules, constrain

# A layer's view of the cache: its keys and values `[B, K, S, H]` and the slot at which this
# call's keys/values are written.
CacheSlot = tuple[jax.Array, jax.Array, jax.Array]

# A block's projections side by side, `(qkv [D, (N + 2K) H], gate_up [D, 2F])`:
# `Decoder.fused_projections`.
FusedWeights = tuple[jax.Array, jax.Array]

# `jax.jit(..., compiler_options=CACHE_UPDATE_OPTIONS)` for programs that write a KVCache in
# place: XLA:CPU's copy insertion then sees that attention reads a layer's buffer before the
# write (region analysis), where it otherwise copied every buffer in a decode loop's body
# (SmolLM2-like toy decode step 0.58 -> 0.36 ms on CPU). Other backends ignore the option.
CACHE_UPDATE_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def _param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    dtype: jnp.dtype,
    init: str = "normal",
) -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = nnx.initializers.normal(0.02)(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Pre-allocated keys/values, one buffer per layer: `k`, `v`, `L` arrays `[B, K, S, H]`
    (slots next to the head width, as attention's dots read them: no transposed copy per
    token; attention reads a layer's own buffer, where slicing it out of one `[L, ...]` buffer
    copied it, per layer and token), `mask [B, S]` (slot holds a real token), `index` (int32
    scalar, next slot to write; the same for every row)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, size: int) -> KVCache:
        shape = (batch, config.num_kv_heads, size, config.head_dim)
        layers = range(config.num_layers)
        return cls(
            k=tuple(jnp.zeros(shape, config.dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, config.dtype) for _ in layers),
            mask=jnp.zeros((batch, size), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    def map_rows(self, fn: Callable[[jax.Array], jax.Array]) -> KVCache:
        """The cache with ``fn`` applied to every buffer (their rows are axis 0)."""
        return KVCache(
            k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)), mask=fn(self.mask), index=self.index
        )

    def padded(self, before: int, after: int) -> KVCache:
        """The cache with `before` empty slots ahead of its own and `after` behind (`index`
        as it was)."""
        pad = lambda x, slots: jnp.pad(  # noqa: E731
            x, [(before, after) if axis == slots else (0, 0) for axis in range(x.ndim)]
        )
        return KVCache(
            k=tuple(pad(x, 2) for x in self.k),
            v=tuple(pad(x, 2) for x in self.v),
            mask=pad(self.mask, 1),
            index=self.index,
        )

    def constrained(self, rules: ShardingRules) -> KVCache:
        """Rows over the mesh's batch axes (under an ambient mesh; identity without)."""
        kv = ("batch", "kv_heads", "sequence", "head_dim")
        return KVCache(
            k=tuple(constrain(x, kv, rules) for x in self.k),
            v=tuple(constrain(x, kv, rules) for x in self.v),
            mask=constrain(self.mask, ("batch", None), rules),
            index=self.index,
        )


class RMSNorm(nnx.Module):
    """`y = scale * x / sqrt(mean(x^2) + eps)`, normalised in float32 as in transformers."""

    def __init__(
        self,
        dim: int,
        eps: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        axis: str,
        rngs: nnx.Rngs,
    ):
        self.scale = _param(rngs, (dim,), (axis,), param_dtype, "ones")
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * x.astype(x_BxTxD.dtype)).astype(self.dtype)


def rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Rotary embedding, half-split convention: `x*cos + concat(-x2, x1)*sin`."""
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxTxH[:, :, None].astype(x1.dtype), sin_BxTxH[:, :, None].astype(x1.dtype)
    return x_BxTxNxH * cos + rotated * sin


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v(/o) biases and per-head q/k norm (Qwen3)."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H, pd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.param_dtype
        self.q_proj = _param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), pd)
        if c.qkv_bias:
            self.q_bias = _param(rngs, (N, H), ("q_heads", "head_dim"), pd, "zeros")
            self.k_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), pd, "zeros")
        if c.out_bias:
            self.o_bias = _param(rngs, (D,), ("embed",), pd, "zeros")
        if c.qk_norm:
            self.q_norm = RMSNorm(H, c.rms_norm_eps, c.dtype, pd, "head_dim", rngs)
            self.k_norm = RMSNorm(H, c.rms_norm_eps, c.dtype, pd, "head_dim", rngs)
        self.config = c

    def _project(self, x_BxTxD: jax.Array, name: str) -> jax.Array:
        c = self.config
        heads = c.num_heads if name == "q" else c.num_kv_heads
        w_DxNxH = in_dtype(getattr(self, f"{name}_proj")[...], c.dtype)
        y = dense(x_BxTxD, w_DxNxH, as_stored=under_qwix(self))
        y = y.reshape(*x_BxTxD.shape[:2], heads, c.head_dim)
        if self.config.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(self.config.dtype)
        return y

    def _project_fused(
        self, x_BxTxD: jax.Array, qkv_DxE: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        B, T = x_BxTxD.shape[:2]
        N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
        y_BxTxE = dense(x_BxTxD, qkv_DxE)
        q, k, v = jnp.split(y_BxTxE, [N * H, (N + K) * H], axis=-1)
        out = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        if c.qkv_bias:
            out = tuple(
                y + getattr(self, f"{n}_bias")[...].astype(c.dtype)
                for y, n in zip(out, "qkv", strict=True)
            )
        return out

    def __call__(
        self,
        x_BxTxD: jax.Array,
        cos_BxTxH: jax.Array,
        sin_BxTxH: jax.Array,
        visible: jax.Array,
        kv: CacheSlot | None = None,
        query_chunk: int = 0,
        attention: str = "xla",
        qkv_DxE: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns `y [B, T, D]` and, with a cache, this layer's updated cache keys/values
        `[B, K, S, H]`.

        `qkv_DxE`: the q, k and v weights side by side, `E = (N + 2K) H`
        (:meth:`Decoder.fused_projections`): one product instead of three.

        Without a cache, `attention` picks the kernel and `query_chunk` its chunk or block
        (`models.attention.attend`). `visible`: `[B, T, S]`, key `s` visible to query `t`; for
        "cudnn" and "flash" instead the rows' real-token counts `[B]`, their real tokens first
        (see `Decoder.hidden`). With a
        cache the masked scores attend.

        `kv`: this layer's cache keys and values and the slot at which this call's `T`
        keys/values are written (in place) before attending over all `S` slots; without it
        the keys are this call's `T`.
        """
        c = self.config
        if qkv_DxE is None:
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (self._project(x_BxTxD, n) for n in "qkv")
        else:
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self._project_fused(x_BxTxD, qkv_DxE)
        if c.qk_norm:
            q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
        q_BxTxNxH = rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
        k_BxTxKxH = rope(k_BxTxKxH, cos_BxTxH, sin_BxTxH)
        if kv is None:
            new_kv = None
            out_BxTxNxH = kernels.attend(
                attention, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, visible, query_chunk, c.dtype
            )
        else:
            # The T new slots are written in place into this layer's own buffers. (Writing into
            # one [L, B, K, S, H] buffer and slicing the layer back out copied it per layer per
            # token; writing a layer's slice back with `.at[layer].set` copied it twice.)
            k_BxKxSxH, v_BxKxSxH, index = kv
            own_BxKxTxH = tuple(
                new.transpose(0, 2, 1, 3).astype(cache.dtype)
                for cache, new in ((k_BxKxSxH, k_BxTxKxH), (v_BxKxSxH, v_BxTxKxH))
            )
            new_kv = tuple(
                jax.lax.dynamic_update_slice(cache, own, (0, 0, index, 0))
                for cache, own in zip((k_BxKxSxH, v_BxKxSxH), own_BxKxTxH, strict=True)
            )
            if isinstance(visible, tuple):
                # the cache as it was (read before the write, which then happens in place in
                # a loop's carried buffers) and this call's own keys, in one softmax
                visible_BxTxS, own_BxTxT = visible
                out_BxTxNxH = kernels.cached_attention(
                    q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, visible_BxTxS, c.dtype,
                    own=(*own_BxKxTxH, own_BxTxT),
                )  # fmt: skip
            elif k_BxTxKxH.shape[1] == k_BxKxSxH.shape[2]:
                # this call fills every slot: the keys are its own (read from the update, they
                # were copied once per layer in prefills of >= 32 tokens on CPU)
                out_BxTxNxH = kernels.cached_attention(q_BxTxNxH, *own_BxKxTxH, visible, c.dtype)
            else:  # the updated cache, every filled slot
                out_BxTxNxH = kernels.cached_attention(q_BxTxNxH, *new_kv, visible, c.dtype)
        o_NxHxD = in_dtype(self.o_proj[...], c.dtype)
        stored = under_qwix(self)
        y_BxTxD = dense(out_BxTxNxH, o_NxHxD, contract=o_NxHxD.ndim - 1, as_stored=stored)
        if c.out_bias:
            y_BxTxD = y_BxTxD + self.o_bias[...].astype(c.dtype)
        return y_BxTxD, new_kv


class MLP(nnx.Module):
    """`down(silu(x @ gate) * (x @ up))`."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        D, F, pd = c.hidden_size, c.intermediate_size, c.param_dtype
        self.gate_proj = _param(rngs, (D, F), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (D, F), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (F, D), ("mlp", "embed"), pd)
        self.dtype = c.dtype

    def __call__(self, x_BxTxD: jax.Array, gate_up_Dx2F: jax.Array | None = None) -> jax.Array:
        """`gate_up_Dx2F`: the gate and up weights side by side (one product instead of two)."""
        stored = under_qwix(self)
        if gate_up_Dx2F is None:
            gate_BxTxF = dense(x_BxTxD, in_dtype(self.gate_proj[...], self.dtype), as_stored=stored)
            up_BxTxF = dense(x_BxTxD, in_dtype(self.up_proj[...], self.dtype), as_stored=stored)
        else:
            gate_BxTxF, up_BxTxF = jnp.split(dense(x_BxTxD, gate_up_Dx2F), 2, axis=-1)
        down_FxD = in_dtype(self.down_proj[...], self.dtype)
        if stored:  # qwix intercepts the product: JAX's own differentiation
            return dense(jax.nn.silu(gate_BxTxF) * up_BxTxF, down_FxD, as_stored=True)
        return swiglu_down(gate_BxTxF, up_BxTxF, down_FxD)


class Block(nnx.Module):
    """Pre-norm residual block: `x += attn(norm(x)); x += mlp(norm(x))`."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(
            c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype, "norm", rngs
        )
        self.attn = Attention(c, rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype, "norm", rngs)
        self.mlp = MLP(c, rngs)


def _block_forward(
    block: Block,
    x_BxTxD: jax.Array,
    cos_BxTxH: jax.Array,
    sin_BxTxH: jax.Array,
    visible: jax.Array,
    kv: CacheSlot | None = None,
    query_chunk: int = 0,
    attention: str = "xla",
    fused: FusedWeights | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One block: ``x += attn(norm(x)); x += mlp(norm(x))``, and the cache's updated
    keys/values when ``kv`` (see :meth:`Attention.__call__`) is given; ``fused``: this
    block's :meth:`Decoder.fused_projections`."""
    qkv, gate_up = (None, None) if fused is None else fused
    y_BxTxD, new_kv = block.attn(
        block.attn_norm(x_BxTxD), cos_BxTxH, sin_BxTxH, visible, kv, query_chunk, attention,
        qkv,
    )  # fmt: skip
    x_BxTxD = x_BxTxD + y_BxTxD
    return x_BxTxD + block.mlp(block.mlp_norm(x_BxTxD), gate_up), new_kv


# Rematerialised: the backward pass recomputes a block's activations from its input, so a
# differentiated forward stores one [B, T, D] per layer instead of every intermediate.
_block_forward_remat = nnx.remat(_block_forward, static_argnums=(6, 7))


class Decoder(nnx.Module):
    """Decoder-only LM. `model(tokens) -> logits [B, T, V]` (float32);
    `model.hidden(tokens) @ model.unembed_matrix() == model(tokens)`.

    `rules` name the activations' shardings; they apply under an ambient mesh
    (`jax.set_mesh`) and are no-ops without one.
    """

    def __init__(
        self, config: ModelConfig, *, rngs: nnx.Rngs, rules: ShardingRules = DEFAULT_RULES
    ):
        c = config
        self.config, self.rules = c, rules
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype, "norm", rngs)
        if not c.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype
            )

    def unembed_matrix(self) -> jax.Array:
        """`[D, V]`: the tied embedding transposed, or the LM head; with
        `config.token_vocab` set, only its first `token_vocab` columns (an embedding padded
        past the tokenizer's vocabulary never forms logits for the padding)."""
        if self.config.tie_word_embeddings:
            w_DxV = self.embed[...].T
        else:
            w_DxV = self.lm_head[...]
        v = self.config.token_vocab
        return w_DxV if v is None or v == w_DxV.shape[1] else w_DxV[:, :v]

    def _rope(self, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        inv_freq, scale = self.config.rope_inv_freq()
        freqs_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
        emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
        return jnp.cos(emb_BxTxH) * scale, jnp.sin(emb_BxTxH) * scale

    def hidden(
        self,
        tokens_BxT: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        remat: bool = False,
        query_chunk: int = 0,
        attention: str = "xla",
    ) -> jax.Array:
        """Final-norm hidden states `[B, T, D]` (compute dtype), without a cache.

        Args:
          tokens_BxT: int32 token ids.
          positions: `[B, T]` RoPE positions; default `cumsum(attention_mask) - 1`.
          attention_mask: `[B, T]`, 1 on real tokens, 0 on padding (either side); default all 1.
          remat: rematerialise each block under differentiation: the activation memory of a
            gradient is one `[B, T, D]` per layer plus one block's.
          query_chunk: attend this many queries at a time (0: all at once); attention's memory
            is then `O(query_chunk * T)` instead of `O(T^2)`.
          attention: the kernel (`models.attention`): `"xla"` (masked scores), `"cudnn"` or
            `"flash"` (each row's real tokens are gathered to its front, attended with a
            causal + length mask and scattered back; the outputs at padding are unspecified,
            those at real tokens equal `"xla"`'s). `"flash"` takes its block size from
            `query_chunk` (0: 512).
        """
        h_BxTxD, _ = self._forward(
            tokens_BxT, positions, attention_mask, None, remat, query_chunk, attention
        )
        return h_BxTxD

    def response_hidden(
        self,
        tokens_BxS: jax.Array,
        attention_mask_BxS: jax.Array,
        prompt_len: int,
        *,
        remat: bool = False,
        query_chunk: int = 0,
        attention: str = "xla",
    ) -> jax.Array:
        """Hidden states `[B, N, D]` that predict the response columns `[P, S)` of
        `tokens_BxS` (prompt in columns `[0, P)`); keywords as in `hidden`."""
        h_BxSxD = self.hidden(
            tokens_BxS,
            attention_mask=attention_mask_BxS,
            remat=remat,
            query_chunk=query_chunk,
            attention=attention,
        )
        return h_BxSxD[:, prompt_len - 1 : -1]

    def hidden_cached(
        self,
        tokens_BxT: jax.Array,
        cache: KVCache,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        in_loop: bool = False,
        fused: tuple[FusedWeights, ...] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """`(hidden [B, T, D], new_cache)`: this call's keys/values are written at slots
        `[cache.index, cache.index + T)` and attend over every filled slot (masked scores).
        Default positions continue from the real tokens already in `cache`.

        `in_loop`: in a loop that carries the cache (a decode loop), attention reads the
        cache as it was and this call's own keys apart, so that XLA writes the carried
        buffers in place (jit the loop with :data:`CACHE_UPDATE_OPTIONS`); reading the
        updated cache there copied every layer's buffer per iteration on CPU. Elsewhere one
        attention over the updated cache costs less.

        `fused`: :meth:`fused_projections`, made once outside the loop."""
        h_BxTxD, new_cache = self._forward(
            tokens_BxT, positions, attention_mask, cache, in_loop=in_loop, fused=fused
        )
        return h_BxTxD, new_cache

    def _forward(
        self,
        tokens_BxT: jax.Array,
        positions: jax.Array | None,
        attention_mask: jax.Array | None,
        cache: KVCache | None,
        remat: bool = False,
        query_chunk: int = 0,
        attention: str = "xla",
        in_loop: bool = False,
        fused: tuple[FusedWeights, ...] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        c = self.config
        B, T = tokens_BxT.shape
        mask_BxT = (
            jnp.ones((B, T), jnp.bool_)
            if attention_mask is None
            else attention_mask.astype(jnp.bool_)
        )
        if positions is None:
            prior_B = jnp.zeros((B,), jnp.int32) if cache is None else cache.mask.sum(-1)
            positions = prior_B[:, None] + jnp.maximum(jnp.cumsum(mask_BxT, -1) - 1, 0)
        cos_BxTxH, sin_BxTxH = self._rope(positions)
        if cache is None:
            slot_mask_BxS, offset, S = mask_BxT, 0, T
        else:
            slot_mask_BxS = jax.lax.dynamic_update_slice(cache.mask, mask_BxT, (0, cache.index))
            offset, S = cache.index, cache.mask.shape[1]
        packed = cache is None and attention in kernels.PACKED_KINDS
        order_BxT = None  # with padding, packed: real tokens first, in order (causality kept)
        if packed and attention_mask is not None:
            order_BxT = jnp.argsort(~mask_BxT, axis=-1, stable=True)
            tokens_BxT = jnp.take_along_axis(tokens_BxT, order_BxT, axis=-1)
            cos_BxTxH, sin_BxTxH = (
                jnp.take_along_axis(a, order_BxT[..., None], axis=1) for a in (cos_BxTxH, sin_BxTxH)
            )
        if packed:
            visible = mask_BxT.sum(-1, dtype=jnp.int32)  # the rows' lengths [B], see Attention
        elif cache is not None and in_loop and T < S:
            # the slots filled before (all earlier), and this call's own keys, causally
            causal_TxT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
            visible = (cache.mask[:, None, :], causal_TxT[None] & mask_BxT[:, None, :])
        else:
            causal_TxS = jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None]
            visible = causal_TxS[None] & slot_mask_BxS[:, None, :]  # [B, T, S]

        act = ("batch", "sequence", None)
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(c.dtype)
        x_BxTxD = constrain(x_BxTxD, act, self.rules)
        forward = _block_forward_remat if remat and cache is None else _block_forward
        k_all, v_all = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], cache.index)
            x_BxTxD, new_kv = forward(
                block, x_BxTxD, cos_BxTxH, sin_BxTxH, visible, kv, query_chunk, attention,
                None if fused is None else fused[i],
            )  # fmt: skip
            x_BxTxD = constrain(x_BxTxD, act, self.rules)
            if cache is not None:
                k_all.append(new_kv[0])
                v_all.append(new_kv[1])
        h_BxTxD = self.norm(x_BxTxD)
        if order_BxT is not None:  # back to the input's order
            rows_Bx1 = jnp.arange(B)[:, None]
            h_BxTxD = jnp.zeros_like(h_BxTxD).at[rows_Bx1, order_BxT].set(h_BxTxD)
        if cache is None:
            return h_BxTxD, None
        return h_BxTxD, KVCache(
            k=tuple(k_all), v=tuple(v_all), mask=slot_mask_BxS, index=cache.index + T
        )

    def fused_projections(self) -> tuple[FusedWeights, ...] | None:
        """Every block's q/k/v and gate/up weights side by side, in the compute dtype, for
        :meth:`hidden_cached` in a decode loop: one product each instead of five, where a
        decode step's small products are bound by their count (30 SmolLM2-shaped layers of
        products on CPU at B=1: 30.2 -> 25.3 ms a token; at B=8 unchanged). A copy of those
        weights, made once before the loop. None where qwix adapts or quantises the
        projections (they reach its matmuls as stored)."""
        c = self.config
        if any(under_qwix(b.attn) or under_qwix(b.mlp) for b in self.layers):
            return None
        flat = lambda w: in_dtype(w[...], c.dtype).reshape(c.hidden_size, -1)  # noqa: E731
        return tuple(
            (
                jnp.concatenate([flat(b.attn.q_proj), flat(b.attn.k_proj), flat(b.attn.v_proj)], 1),
                jnp.concatenate([flat(b.mlp.gate_proj), flat(b.mlp.up_proj)], 1),
            )
            for b in self.layers
        )

    def logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """Float32 logits `[B, T, V]` of final-norm hidden states. A tied embedding is read as
        it is stored, `[V, D]` (its first `token_vocab` rows): the transposed view
        :meth:`unembed_matrix` gives made XLA:CPU form the product in a slower loop (SmolLM2
        decoding at B=1: 21.9 -> 20.6 ms a token)."""
        if self.config.tie_word_embeddings:
            embed_VxD = self.embed[...][: self.config.token_vocab]
            spec, w = "btd,vd->btv", embed_VxD.astype(self.config.dtype)
        else:
            spec, w = "btd,dv->btv", self.unembed_matrix().astype(self.config.dtype)
        logits_BxTxV = jnp.einsum(spec, h_BxTxD, w, preferred_element_type=jnp.float32)
        return constrain(logits_BxTxV, ("batch", "sequence", "vocab"), self.rules)

    def __call__(
        self,
        tokens_BxT: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits `[B, T, V]` in float32; arguments as in `hidden`."""
        return self.logits(
            self.hidden(tokens_BxT, positions=positions, attention_mask=attention_mask)
        )
