"""Jitted KV-cache generation: one prefill, then a `lax.while_loop` of one-token decodes.

Prompts are left-aligned (any padding pattern is accepted and moved to the left), so every
row's next token goes to the same cache slot and all shapes are static: the cache holds
`P + N` slots for prompts of width `P` and `N` new tokens. The loop stops when every row
has produced an EOS id or `N` tokens. Sampling methods are small frozen dataclasses
(pytrees: a new temperature or nucleus mass does not recompile; a new `k` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from opd_jax.models.decoder import Decoder, KVCache
from opd_jax.sharding import ShardingRules


class _Categorical:
    """Samples from `log_probs(logits)`; subclasses define the distribution."""

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        raise NotImplementedError

    def sample(self, key: jax.Array, logits_BxV: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns sampled tokens `[B]` and their log-probabilities `[B]`."""
        logprobs_BxV = self.log_probs(logits_BxV)
        tokens_B = jax.random.categorical(key, logprobs_BxV, axis=-1)
        return tokens_B, jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], -1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Greedy(_Categorical):
    """`argmax(logits)`; reports the model's log-probabilities `log_softmax(logits)`."""

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)

    def sample(self, key: jax.Array, logits_BxV: jax.Array) -> tuple[jax.Array, jax.Array]:
        del key
        tokens_B = jnp.argmax(logits_BxV, axis=-1)
        logprobs_BxV = self.log_probs(logits_BxV)
        return tokens_B, jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], -1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Temperature(_Categorical):
    """`p ∝ exp(logits / temperature)`."""

    temperature: float = 1.0

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(logits_BxV.astype(jnp.float32) / self.temperature, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopK(_Categorical):
    """Temperature sampling restricted to the `k` most likely tokens (ties at the k-th kept)."""

    k: int = dataclasses.field(metadata=dict(static=True))
    temperature: float = 1.0

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        scaled_BxV = logits_BxV.astype(jnp.float32) / self.temperature
        kth_Bx1 = jax.lax.top_k(scaled_BxV, self.k)[0][:, -1:]
        return jax.nn.log_softmax(jnp.where(scaled_BxV < kth_Bx1, -jnp.inf, scaled_BxV), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopP(_Categorical):
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches
    `p` (after temperature), renormalised."""

    p: float
    temperature: float = 1.0

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        scaled_BxV = logits_BxV.astype(jnp.float32) / self.temperature
        sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of strictly likelier
        kept_BxV = jnp.where(before_BxV < self.p, sorted_BxV, jnp.inf)
        threshold_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
        return jax.nn.log_softmax(
            jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV), axis=-1
        )


SamplingMethod = Greedy | Temperature | TopK | TopP


def method_from(temperature: float, top_k: int = 0, top_p: float = 1.0) -> SamplingMethod:
    """Greedy at temperature 0, else top-k (``top_k > 0``), nucleus (``top_p < 1``) or plain
    temperature sampling: the ``sampling`` section of a config."""
    if temperature == 0:
        return Greedy()
    if top_k > 0:
        return TopK(top_k, temperature)
    if top_p < 1.0:
        return TopP(top_p, temperature)
    return Temperature(temperature)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleResult:
    """`tokens [B, P+N]`: left-aligned prompt then response (pad after EOS);
    `prompt_mask`, `response_mask [B, P+N]`: 1 on real prompt / response tokens (the
    response includes its EOS); `logprobs [B, P+N]`: log-probability of each response
    token under the sampling distribution (0 elsewhere); `lengths [B]`: response lengths."""

    tokens: jax.Array
    prompt_mask: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    tokens_BxS: jax.Array
    logprobs_BxS: jax.Array
    response_BxS: jax.Array
    done_B: jax.Array
    step: jax.Array  # tokens generated so far
    key: jax.Array
    cache: KVCache


def left_align(tokens_BxP: jax.Array, mask_BxP: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens to the right end (padding first), keeping their order."""
    order_BxP = jnp.argsort(mask_BxP.astype(jnp.int32), axis=-1, stable=True)
    return (
        jnp.take_along_axis(tokens_BxP, order_BxP, -1),
        jnp.take_along_axis(mask_BxP, order_BxP, -1),
    )


def _put_column(x_BxS: jax.Array, column_B: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(x_BxS, column_B[:, None].astype(x_BxS.dtype), (0, index))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens"), donate_argnames=("cache",)
)
def _prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BxP: jax.Array,
    mask_BxP: jax.Array,
    key: jax.Array,
    cache: KVCache,
    method: SamplingMethod,
    eos_E: jax.Array,
    pad_id: jax.Array,
    *,
    max_new_tokens: int,
) -> _State:
    """Runs the left-aligned prompts through the model and samples the first token."""
    model: Decoder = nnx.merge(graphdef, state)
    B, P = tokens_BxP.shape
    h_BxPxD, cache = model.hidden_cached(tokens_BxP, cache, attention_mask=mask_BxP)
    logits_BxV = jnp.einsum(
        "bd,dv->bv",
        h_BxPxD[:, -1],
        model.unembed_matrix().astype(h_BxPxD.dtype),
        preferred_element_type=jnp.float32,
    )
    key, sub = jax.random.split(key)
    token_B, logprob_B = method.sample(sub, logits_BxV)
    S = P + max_new_tokens
    tokens_BxS = jnp.full((B, S), pad_id, jnp.int32).at[:, :P].set(tokens_BxP)
    return _State(
        tokens_BxS=_put_column(tokens_BxS, token_B, P),
        logprobs_BxS=_put_column(jnp.zeros((B, S), jnp.float32), logprob_B, P),
        response_BxS=_put_column(jnp.zeros((B, S), jnp.int32), jnp.ones((B,), jnp.int32), P),
        done_B=jnp.isin(token_B, eos_E),
        step=jnp.ones((), jnp.int32),
        key=key,
        cache=cache,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"), donate_argnames=("s",))
def _decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    lengths_B: jax.Array,
    s: _State,
    method: SamplingMethod,
    eos_E: jax.Array,
    pad_id: jax.Array,
    *,
    max_new_tokens: int,
) -> _State:
    """Decodes one token per row per iteration until all rows are done or `N` are made."""
    model: Decoder = nnx.merge(graphdef, state)
    P = s.tokens_BxS.shape[1] - max_new_tokens

    def cond(s: _State) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

    def body(s: _State) -> _State:
        column = P + s.step
        last_Bx1 = jax.lax.dynamic_slice_in_dim(s.tokens_BxS, column - 1, 1, axis=1)
        positions_Bx1 = (lengths_B + s.step - 1)[:, None]
        h_Bx1xD, cache = model.hidden_cached(last_Bx1, s.cache, positions=positions_Bx1)
        logits_Bx1xV = model.logits(h_Bx1xD)
        key, sub = jax.random.split(s.key)
        token_B, logprob_B = method.sample(sub, logits_Bx1xV[:, 0])
        live_B = ~s.done_B
        token_B = jnp.where(live_B, token_B, pad_id)
        return _State(
            tokens_BxS=_put_column(s.tokens_BxS, token_B, column),
            logprobs_BxS=_put_column(s.logprobs_BxS, jnp.where(live_B, logprob_B, 0.0), column),
            response_BxS=_put_column(s.response_BxS, live_B, column),
            done_B=s.done_B | jnp.isin(token_B, eos_E),
            step=s.step + 1,
            key=key,
            cache=cache,
        )

    return jax.lax.while_loop(cond, body, s)


def sample(
    model: Decoder,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array | None = None,
    *,
    key: jax.Array,
    max_new_tokens: int,
    method: SamplingMethod = Greedy(),
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
) -> SampleResult:
    """Generates up to `max_new_tokens` tokens after each prompt.

    Args:
      model: the decoder (sharded or not; see `opd_jax.sharding.shard_model`).
      prompt_tokens: `[B, P]` int token ids.
      prompt_mask: `[B, P]`, 1 on real prompt tokens; left or right padding. Default all 1.
      key: PRNG key; the same key gives the same samples.
      max_new_tokens: `N`, the response budget (and cache size `P + N`).
      method: `Greedy()`, `Temperature(t)`, `TopK(k, t)` or `TopP(p, t)`.
      eos_ids: a row stops after sampling any of these ids.
      pad_id: written after a row's EOS.
      mesh: if given, the batch and the cache are sharded over `rules.batch` (default rules:
        the model's) and the model's activation constraints apply.
    """
    rules = model.rules if rules is None else rules
    tokens_BxP = jnp.asarray(prompt_tokens, jnp.int32)
    B, P = tokens_BxP.shape
    mask_BxP = (
        jnp.ones((B, P), jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    )
    graphdef, state = nnx.split(model)
    config = model.config
    cache_init = functools.partial(KVCache.init, config, B, P + max_new_tokens)
    if mesh is not None:
        batch = NamedSharding(mesh, rules.spec(("batch", None)))
        tokens_BxP, mask_BxP = jax.device_put((tokens_BxP, mask_BxP), batch)
        kv = rules.sharding(mesh, ("layers", "batch", "kv_heads", "sequence", "head_dim"))
        cache_init = jax.jit(
            cache_init,
            out_shardings=KVCache(
                k=kv, v=kv, mask=batch, index=NamedSharding(mesh, rules.spec(()))
            ),
        )
    tokens_BxP, mask_BxP = left_align(tokens_BxP, mask_BxP)
    eos_E = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)
    pad = jnp.asarray(pad_id, jnp.int32)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        state0 = _prefill(
            graphdef,
            state,
            tokens_BxP,
            mask_BxP,
            key,
            cache_init(),
            method,
            eos_E,
            pad,
            max_new_tokens=max_new_tokens,
        )
        final = _decode(
            graphdef,
            state,
            mask_BxP.sum(-1),
            state0,
            method,
            eos_E,
            pad,
            max_new_tokens=max_new_tokens,
        )
    prompt_mask_BxS = jnp.zeros_like(final.response_BxS).at[:, :P].set(mask_BxP)
    return SampleResult(
        tokens=final.tokens_BxS,
        prompt_mask=prompt_mask_BxS,
        response_mask=final.response_BxS,
        logprobs=final.logprobs_BxS,
        lengths=final.response_BxS.sum(-1),
    )
