"""Jitted KV-cache generation: one prefill, then `lax.while_loop`s of one-token decodes.

Prompts are left-aligned (any padding pattern is accepted and moved to the left), so every
row's next token goes to the same cache slot and all shapes are static: the cache holds
`P + N` slots for prompts of width `P` and `N` new tokens. A prompt's `n` samples share its
prefill. Decoding stops when every row has produced an EOS id or `N` tokens; on the way,
rows that have finished are dropped from the loop (see :func:`sample`). Sampling methods are
small frozen dataclasses (pytrees: a new temperature or nucleus mass does not recompile; a
new `k` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from opd_jax.core.stats import canonical_zeros
from opd_jax.models.decoder import CACHE_UPDATE_OPTIONS, Decoder, KVCache
from opd_jax.sampling.methods import GREEDY, SamplingMethod
from opd_jax.sharding import ShardingRules, constrain


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
    """The decode loop's carry over its `R` live rows (`rows_R`: each row's index in the
    result; `lengths_R`: its prompt length)."""

    tokens_RxS: jax.Array
    logprobs_RxS: jax.Array
    response_RxS: jax.Array
    done_R: jax.Array
    lengths_R: jax.Array
    rows_R: jax.Array
    step: jax.Array  # tokens generated so far
    key: jax.Array
    cache: KVCache
    # the student's top-K ids and raw log-probabilities at each sampled column (K = 0 unless
    # a watcher reads them: opd_jax.sampling.release_watch)
    topk_ids_RxSxK: jax.Array
    topk_logp_RxSxK: jax.Array


def _constrain(s: _State, rules: ShardingRules) -> _State:
    """The rows over the mesh's batch axes (under an ambient mesh; identity without)."""
    rows = ("batch", None)
    return dataclasses.replace(
        s,
        tokens_RxS=constrain(s.tokens_RxS, rows, rules),
        logprobs_RxS=constrain(s.logprobs_RxS, rows, rules),
        response_RxS=constrain(s.response_RxS, rows, rules),
        done_R=constrain(s.done_R, ("batch",), rules),
        lengths_R=constrain(s.lengths_R, ("batch",), rules),
        rows_R=constrain(s.rows_R, ("batch",), rules),
        topk_ids_RxSxK=constrain(s.topk_ids_RxSxK, rows + (None,), rules),
        topk_logp_RxSxK=constrain(s.topk_logp_RxSxK, rows + (None,), rules),
        cache=s.cache.constrained(rules),
    )


def left_align(tokens_BxP: jax.Array, mask_BxP: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens to the right end (padding first), keeping their order."""
    order_BxP = jnp.argsort(mask_BxP.astype(jnp.int32), axis=-1, stable=True)
    return (
        jnp.take_along_axis(tokens_BxP, order_BxP, -1),
        jnp.take_along_axis(mask_BxP, order_BxP, -1),
    )


def _put_column(x_RxS: jax.Array, column_R: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(x_RxS, column_R[:, None].astype(x_RxS.dtype), (0, index))


def _put_topk(s: _State, logits_RxV: jax.Array, column: jax.Array) -> _State:
    """Records the student's top-K candidates at `column` (nothing when K = 0)."""
    k = s.topk_ids_RxSxK.shape[-1]
    if not k:
        return s
    z_RxV = logits_RxV.astype(jnp.float32)
    ids_RxK = jax.lax.top_k(canonical_zeros(z_RxV), k)[1]
    logp_RxK = jnp.take_along_axis(z_RxV, ids_RxK, -1) - jax.nn.logsumexp(z_RxV, -1, keepdims=True)
    put = lambda x, v: jax.lax.dynamic_update_slice(x, v[:, None].astype(x.dtype), (0, column, 0))  # noqa: E731
    return dataclasses.replace(
        s,
        topk_ids_RxSxK=put(s.topk_ids_RxSxK, ids_RxK),
        topk_logp_RxSxK=put(s.topk_logp_RxSxK, logp_RxK),
    )


def _row_keys(key: jax.Array, step: jax.Array, rows_R: jax.Array) -> jax.Array:
    """Row `r`'s key for token `step`: a function of the result row alone, so compaction and
    batch composition leave every row's samples unchanged."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows_R)


def prompt_window(mask_BxP: np.ndarray) -> int:
    """The prompt columns a prefill reads: the longest prompt's, rounded up to a multiple of
    `ceil(P / 8)` (at most 8 widths compile), at most `P`. Prompts are left-aligned (padding
    first), so the columns before those hold no token of any row."""
    P = mask_BxP.shape[1]
    quantum = -(-P // 8)
    longest = int(np.asarray(mask_BxP).sum(-1).max(initial=0))
    return min(P, max(1, -(-longest // quantum)) * quantum)


def prefill_cache(
    model: Decoder,
    tokens_BxP: jax.Array,
    mask_BxP: jax.Array,
    size: int,
    n: int,
    window: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """`(hidden [B, W, D], cache)`: the left-aligned prompts' last `W = window` columns
    (default all `P`; :func:`prompt_window`) run forward with a cache of those slots alone
    (attention over the prompt, as without a cache), then the cache grown to `size` slots
    (empty: the `P - W` before, the `size - P` after) and its rows repeated `n` times (rows
    `b n .. b n + n - 1`: prompt `b`). Its real slots equal a `size`-slot cache's filled by
    the same forward (up to float rounding; the masked padding slots may differ). Filling a
    `size`-slot cache instead attended over its empty slots and copied it once per layer: a
    48-token prefill took ~1.7x an uncached forward on CPU; and the padding columns every
    row has cost as much as its tokens."""
    B, P = tokens_BxP.shape
    W = P if window is None else window
    tokens_BxW, mask_BxW = tokens_BxP[:, P - W :], mask_BxP[:, P - W :]
    h_BxWxD, cache = model.hidden_cached(
        tokens_BxW, KVCache.init(model.config, B, W), attention_mask=mask_BxW
    )
    cache = cache.map_rows(lambda x: jnp.repeat(x, n, axis=0)).padded(P - W, size - P)
    return h_BxWxD, dataclasses.replace(cache, index=jnp.asarray(P, jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "n", "rules", "record_k", "window")
)
def _prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BxP: jax.Array,
    mask_BxP: jax.Array,
    key: jax.Array,
    method: SamplingMethod,
    eos_E: jax.Array,
    pad_id: jax.Array,
    *,
    max_new_tokens: int,
    n: int,
    rules: ShardingRules,
    record_k: int = 0,
    window: int | None = None,
) -> _State:
    """Runs the left-aligned prompts (their last `window` columns) through the model once,
    repeats each row's cache `n` times (rows `b n .. b n + n - 1` are prompt `b`'s samples)
    and samples the first tokens."""
    model: Decoder = nnx.merge(graphdef, state)
    B, P = tokens_BxP.shape
    S = P + max_new_tokens
    h_BxWxD, cache = prefill_cache(model, tokens_BxP, mask_BxP, S, n, window)
    logits_BxV = model.logits(h_BxWxD[:, -1:])[:, 0]
    if n > 1:
        logits_BxV, tokens_BxP, mask_BxP = (
            jnp.repeat(x, n, axis=0) for x in (logits_BxV, tokens_BxP, mask_BxP)
        )
    R = B * n
    rows_R = jnp.arange(R, dtype=jnp.int32)
    token_R, logprob_R = method.sample(_row_keys(key, jnp.int32(0), rows_R), logits_BxV)
    tokens_RxS = jnp.full((R, S), pad_id, jnp.int32).at[:, :P].set(tokens_BxP)
    s = _State(
        tokens_RxS=_put_column(tokens_RxS, token_R, P),
        logprobs_RxS=_put_column(jnp.zeros((R, S), jnp.float32), logprob_R, P),
        response_RxS=_put_column(jnp.zeros((R, S), jnp.int32), jnp.ones((R,), jnp.int32), P),
        done_R=jnp.isin(token_R, eos_E),
        lengths_R=mask_BxP.sum(-1, dtype=jnp.int32),
        rows_R=rows_R,
        step=jnp.ones((), jnp.int32),
        key=key,
        cache=cache,
        topk_ids_RxSxK=jnp.zeros((R, S, record_k), jnp.int32),
        topk_logp_RxSxK=jnp.zeros((R, S, record_k), jnp.float32),
    )
    return _constrain(_put_topk(s, logits_BxV, P), rules)


def fuses_projections() -> bool:
    """Whether the decode loop multiplies by each block's projections side by side
    (:meth:`Decoder.fused_projections`): on CPU, where a decode step's small products are
    bound by their count. Elsewhere the copy of the weights it makes costs accelerator memory,
    and the projections, sharded over heads, would be gathered."""
    return jax.default_backend() == "cpu"


def _decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    s: _State,
    method: SamplingMethod,
    eos_E: jax.Array,
    pad_id: jax.Array,
    until: jax.Array,
    *,
    max_new_tokens: int,
) -> _State:
    """Decodes one token per row per iteration until all rows are done or `until` tokens
    are made."""
    model: Decoder = nnx.merge(graphdef, state)
    P = s.tokens_RxS.shape[1] - max_new_tokens
    fused = model.fused_projections() if fuses_projections() else None

    def cond(s: _State) -> jax.Array:
        return (s.step < until) & ~jnp.all(s.done_R)

    def body(s: _State) -> _State:
        column = P + s.step
        last_Rx1 = jax.lax.dynamic_slice_in_dim(s.tokens_RxS, column - 1, 1, axis=1)
        positions_Rx1 = (s.lengths_R + s.step - 1)[:, None]
        h_Rx1xD, cache = model.hidden_cached(
            last_Rx1, s.cache, positions=positions_Rx1, in_loop=True, fused=fused
        )
        logits_Rx1xV = model.logits(h_Rx1xD)
        keys_R = _row_keys(s.key, s.step, s.rows_R)
        token_R, logprob_R = method.sample(keys_R, logits_Rx1xV[:, 0])
        live_R = ~s.done_R
        token_R = jnp.where(live_R, token_R, pad_id)
        s = _put_topk(s, logits_Rx1xV[:, 0], column)
        return dataclasses.replace(
            s,
            tokens_RxS=_put_column(s.tokens_RxS, token_R, column),
            logprobs_RxS=_put_column(s.logprobs_RxS, jnp.where(live_R, logprob_R, 0.0), column),
            response_RxS=_put_column(s.response_RxS, live_R, column),
            done_R=s.done_R | jnp.isin(token_R, eos_E),
            step=s.step + 1,
            cache=cache,
        )

    return jax.lax.while_loop(cond, body, s)


@functools.cache
def decode_loop(graphdef: nnx.GraphDef) -> Callable[..., _State]:
    """The jitted decode loop of one model, ``(state, s, method, eos_E, pad_id, until, *,
    max_new_tokens)`` (:func:`_decode`): its graph definition closed over, so a call hashes
    no graph (about 0.1-0.2 ms of host time at every look), and ``s`` donated (the cache is
    updated in place)."""
    return jax.jit(
        functools.partial(_decode, graphdef),
        static_argnames=("max_new_tokens",),
        donate_argnames=("s",),
        compiler_options=CACHE_UPDATE_OPTIONS,
    )


@functools.partial(jax.jit, static_argnames=("rules",))
def _take_rows(s: _State, index_R: jax.Array, *, rules: ShardingRules) -> _State:
    """The rows `index_R` of `s` (the cache's too): the live rows, gathered."""
    take = functools.partial(jnp.take, indices=index_R, axis=0)
    cache = s.cache
    return _constrain(
        dataclasses.replace(
            s,
            tokens_RxS=take(s.tokens_RxS),
            logprobs_RxS=take(s.logprobs_RxS),
            response_RxS=take(s.response_RxS),
            done_R=take(s.done_R),
            lengths_R=take(s.lengths_R),
            rows_R=take(s.rows_R),
            topk_ids_RxSxK=take(s.topk_ids_RxSxK),
            topk_logp_RxSxK=take(s.topk_logp_RxSxK),
            cache=cache.map_rows(lambda x: jnp.take(x, index_R, axis=0)),
        ),
        rules,
    )


@functools.partial(jax.jit, donate_argnames=("s",))
def _stop_rows(s: _State, stop_R: jax.Array) -> _State:
    """Ends the rows `stop_R`: they sample no further token, as after an EOS."""
    return dataclasses.replace(s, done_R=s.done_R | stop_R)


@functools.partial(jax.jit, donate_argnames=("s",))
def _end_rows(s: _State, stop_R: jax.Array, pad_id: jax.Array, column: jax.Array) -> _State:
    """Ends the rows `stop_R` at `column` although the loop decoded on: their columns from
    `column` on become what a row stopped there writes (padding, off the response). Rows are
    sampled independently, so the result's tokens, log-probabilities and response are then
    those of stopping them there (the student's top-K recorded there is not: off the response,
    nothing reads it)."""
    after_RxS = stop_R[:, None] & (jnp.arange(s.tokens_RxS.shape[1])[None, :] >= column)
    return dataclasses.replace(
        s,
        tokens_RxS=jnp.where(after_RxS, pad_id, s.tokens_RxS),
        logprobs_RxS=jnp.where(after_RxS, 0.0, s.logprobs_RxS),
        response_RxS=jnp.where(after_RxS, 0, s.response_RxS),
        done_R=s.done_R | stop_R,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """What a :class:`Watcher` reads of the loop's rows at a look (`[R, P+N]`, `[R]` with
    `rows_R` their result rows, and the student's top-K `[R, P+N, K]`): copies, so the loop
    decodes on while it looks."""

    tokens_RxS: jax.Array
    response_RxS: jax.Array
    done_R: jax.Array
    rows_R: jax.Array
    topk_ids_RxSxK: jax.Array
    topk_logp_RxSxK: jax.Array


@jax.jit
def _rows_seen(s: _State) -> Rows:
    copy = functools.partial(jnp.array, copy=True)
    fields = (s.tokens_RxS, s.response_RxS, s.done_R, s.rows_R, s.topk_ids_RxSxK, s.topk_logp_RxSxK)
    return Rows(*map(copy, fields))


class Watcher(Protocol):
    """What :func:`sample` tells an observer of its rows (host side; one process)."""

    k: int  # the student's top-K to record at each sampled column (0: none)

    def start(self, tokens_BxP: jax.Array, mask_BxP: jax.Array, n: int) -> None:
        """The left-aligned prompts, before their rows are repeated `n` times."""

    def look(self, rows: Rows, prompt_len: int, made: int) -> np.ndarray:
        """The rows after `made` new tokens (rows finished on the way stay in `rows`); returns
        bool `[R]`, the rows to stop now (nothing from column `P + made` on is theirs)."""

    def take(self, index_R: np.ndarray, rows: Rows) -> None:
        """The loop goes on with rows `index_R` of `rows` (the last look's), in that order."""


@functools.partial(jax.jit, donate_argnames=("out",))
def _put_rows(out: tuple[jax.Array, ...], s: _State) -> tuple[jax.Array, ...]:
    """Writes `s`'s rows into the result's `(tokens, logprobs, response) [R0, S]` at their
    result rows (a row listed twice carries the same values both times)."""
    return tuple(
        x.at[s.rows_R].set(y)
        for x, y in zip(out, (s.tokens_RxS, s.logprobs_RxS, s.response_RxS), strict=True)
    )


def _global_host(x: jax.Array) -> np.ndarray:
    """The whole of `x` on the host, also where its rows are spread over processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compacted_width(live: int, width: int, multiple: int) -> int:
    """The row count to decode `live` unfinished rows with, given `width` rows now: the
    smallest power of two times `multiple` (the batch's shard count) that holds them, if
    that halves the rows at least (each width compiles once), else `width`."""
    target = multiple
    while target < live:
        target *= 2
    return target if 2 * target <= width else width


def sample(
    model: Decoder,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array | None = None,
    *,
    key: jax.Array,
    max_new_tokens: int,
    method: SamplingMethod = GREEDY,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    n: int = 1,
    compact_every: int = 16,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    watcher: Watcher | None = None,
) -> SampleResult:
    """Generates up to `max_new_tokens` tokens after each prompt, `n` samples per prompt.

    Each prompt is run through the model once and its cache shared by its `n` samples
    (result rows `b n .. b n + n - 1`). Every `compact_every` tokens the host looks at which
    rows have finished; once the unfinished ones fit in half the rows (rounded up to a power
    of two), decoding goes on with those alone, so finished rows stop costing compute. Row
    `r`'s draws depend only on `key`, `r` and the token index: compaction never changes a
    sample.

    Args:
      model: the decoder (sharded or not; see `opd_jax.sharding.shard_model`).
      prompt_tokens: `[B, P]` int token ids.
      prompt_mask: `[B, P]`, 1 on real prompt tokens; left or right padding. Default all 1.
      key: PRNG key; the same key gives the same samples.
      max_new_tokens: `N`, the response budget (and cache size `P + N`).
      method: `Greedy()`, `Temperature(t)`, `TopK(k, t)` or `TopP(p, t)`.
      eos_ids: a row stops after sampling any of these ids.
      pad_id: written after a row's EOS.
      n: samples per prompt; the result has `B n` rows.
      compact_every: tokens between looks at the finished rows (0: decode all rows to the
        end in one loop, the host never waits).
      mesh: if given, the batch and the cache are sharded over `rules.batch` (default rules:
        the model's) and the model's activation constraints apply.
      watcher: a :class:`Watcher` that sees the rows at every look (`compact_every >= 1`)
        and may stop some of them there (they end like rows that sampled an EOS). It reads a
        copy of the rows while the next `compact_every` tokens are decoded; the rows it stops
        are then ended at its look (:func:`_end_rows`), and leave the loop one look later.

    Returns:
      A :class:`SampleResult` of `B n` rows and `P + N` columns.
    """
    if watcher is not None and compact_every < 1:
        raise ValueError("a watcher looks at the rows every compact_every >= 1 tokens.")
    if n < 1 or max_new_tokens < 1 or compact_every < 0:
        raise ValueError(
            f"need n >= 1, max_new_tokens >= 1 and compact_every >= 0, got n={n}, "
            f"max_new_tokens={max_new_tokens}, compact_every={compact_every}"
        )
    rules = model.rules if rules is None else rules
    tokens_BxP = jnp.asarray(prompt_tokens, jnp.int32)
    B, P = tokens_BxP.shape
    mask_BxP = (
        jnp.ones((B, P), jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    )
    graphdef, state = nnx.split(model)
    shards = 1
    if mesh is not None:
        batch = NamedSharding(mesh, rules.spec(("batch", None)))
        tokens_BxP, mask_BxP = jax.device_put((tokens_BxP, mask_BxP), batch)
        key = jax.device_put(key, NamedSharding(mesh, PartitionSpec()))  # made on another mesh?
        shards = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(rules.batch)]))
    N = max_new_tokens
    # everything made under this mesh: a caller's ambient mesh may be another one
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        eos_E = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)
        pad = jnp.asarray(pad_id, jnp.int32)
        tokens_BxP, mask_BxP = left_align(tokens_BxP, mask_BxP)
        s = _prefill(
            graphdef, state, tokens_BxP, mask_BxP, key, method, eos_E, pad,
            max_new_tokens=N, n=n, rules=rules, record_k=watcher.k if watcher else 0,
            window=prompt_window(_global_host(mask_BxP)),
        )  # fmt: skip
        if watcher is not None:
            watcher.start(tokens_BxP, mask_BxP, n)
        out = None  # the result's rows, once rows have been dropped from the loop

        loop = decode_loop(graphdef)

        def decode(s: _State, until: int) -> _State:
            return loop(state, s, method, eos_E, pad, np.int32(until), max_new_tokens=N)

        made = N if compact_every == 0 else min(1 + compact_every, N)
        s = decode(s, made)
        while True:
            done_R = _global_host(s.done_R)  # every process decides alike
            last = made >= N or done_R.all()
            ahead = N if compact_every == 0 else min(made + compact_every, N)
            if watcher is not None:
                # the watcher looks at a copy of the rows while the next tokens are decoded;
                # the rows it stops are then ended where it looked, as if stopped there
                seen = _rows_seen(s)
                if not last:
                    s = decode(s, ahead)
                stop_R = watcher.look(seen, P, made)
                if stop_R.any():
                    stop = jnp.asarray(stop_R)
                    s = _stop_rows(s, stop) if last else _end_rows(s, stop, pad, np.int32(P + made))
                done_R = done_R | stop_R
            if last or done_R.all():
                break
            live_L = np.flatnonzero(~done_R)
            width = compacted_width(len(live_L), len(done_R), shards)
            if width < len(done_R):
                rows = (s.tokens_RxS, s.logprobs_RxS, s.response_RxS)
                out = tuple(map(jnp.copy, rows)) if out is None else _put_rows(out, s)
                # padded with a finished row: it stays finished and writes back its own values
                index = np.concatenate([live_L, np.full(width - len(live_L), np.argmax(done_R))])
                if watcher is not None:
                    watcher.take(index, seen)
                s = _take_rows(s, index.astype(np.int32), rules=rules)
            seen = None  # the next look's copy replaces this one, not beside it
            if watcher is None:
                s = decode(s, ahead)
            made = ahead
        tokens, logprobs, response = (
            (s.tokens_RxS, s.logprobs_RxS, s.response_RxS) if out is None else _put_rows(out, s)
        )
        prompt_mask_RxS = jnp.zeros_like(response).at[:, :P].set(jnp.repeat(mask_BxP, n, 0))
        lengths_R = response.sum(-1)
    return SampleResult(
        tokens=tokens,
        prompt_mask=prompt_mask_RxS,
        response_mask=response,
        logprobs=logprobs,
        lengths=lengths_R,
    )
