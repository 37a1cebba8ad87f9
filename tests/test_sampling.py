"""The KV-cache sampler against full forwards, padding invariance, EOS, sampling methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import sampling
from opd_jax.models import Decoder, ModelConfig, testing
from opd_jax.sharding import DEFAULT_RULES

P, N = 7, 9


@pytest.fixture(scope="module")
def model():
    config = ModelConfig.from_hf(testing.tiny_hf_config("qwen3", vocab_size=64))
    model = Decoder(config, rngs=nnx.Rngs(0))
    # larger weights than the 0.02 init, so next-token distributions are far from uniform
    nnx.update(model, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, nnx.state(model)))
    return model


def _prompts(seed=0, batch=3):
    tokens = np.random.RandomState(seed).randint(2, 64, (batch, P)).astype(np.int32)
    mask = np.ones((batch, P), np.int32)
    mask[1, :3] = 0  # left padded
    mask[2, :1] = 0
    return tokens, mask


@nnx.jit
def _forward(model, tokens, mask):
    return model(tokens, attention_mask=mask)


def test_greedy_equals_argmax_of_repeated_full_forwards(model):
    tokens, mask = _prompts()
    result = sampling.sample(model, tokens, mask, key=jax.random.key(0), max_new_tokens=N)
    # full forwards at a fixed width: future slots are masked, so causality makes them inert
    seq = jnp.zeros((3, P + N), jnp.int32).at[:, :P].set(tokens)
    seq_mask = jnp.zeros((3, P + N), jnp.int32).at[:, :P].set(mask)
    for t in range(P, P + N):
        next_token = jnp.argmax(_forward(model, seq, seq_mask)[:, t - 1], -1)
        seq, seq_mask = seq.at[:, t].set(next_token), seq_mask.at[:, t].set(1)
    np.testing.assert_array_equal(result.tokens, seq)
    assert result.tokens.shape == result.response_mask.shape == (3, P + N)
    np.testing.assert_array_equal(result.response_mask[:, P:], 1)
    np.testing.assert_array_equal(result.response_mask[:, :P], 0)
    np.testing.assert_array_equal(result.lengths, N)


@pytest.mark.parametrize(
    "method",
    [sampling.Greedy(), sampling.Temperature(0.7), sampling.TopK(5, 0.9), sampling.TopP(0.8)],
)
def test_cached_logprobs_equal_full_forward_logprobs(model, method):
    tokens, mask = _prompts(seed=1)
    result = sampling.sample(
        model, tokens, mask, key=jax.random.key(3), max_new_tokens=N, method=method
    )
    logits = _forward(model, result.tokens, result.prompt_mask + result.response_mask)
    expected = jnp.take_along_axis(
        jax.vmap(method.log_probs, in_axes=1, out_axes=1)(logits[:, :-1]),
        result.tokens[:, 1:, None],
        -1,
    )[..., 0]
    response = result.response_mask[:, 1:] == 1
    np.testing.assert_allclose(result.logprobs[:, 1:][response], expected[response], atol=1e-5)
    assert np.all(np.asarray(result.logprobs)[np.asarray(result.response_mask) == 0] == 0)
    assert np.all(np.isfinite(np.asarray(result.logprobs)))


def test_left_padded_rows_match_unpadded_rows(model):
    tokens, mask = _prompts(seed=2)
    padded = sampling.sample(
        model,
        tokens,
        mask,
        key=jax.random.key(5),
        max_new_tokens=N,
        method=sampling.Temperature(1.0),
    )
    row = 1  # three pads; rows are sampled with the same noise at the same batch index
    real = tokens[row][mask[row] == 1]
    alone = sampling.sample(
        model,
        np.stack([real] * 3),
        key=jax.random.key(5),
        max_new_tokens=N,
        method=sampling.Temperature(1.0),
    )
    np.testing.assert_array_equal(padded.tokens[row, P:], alone.tokens[row, len(real) :])
    np.testing.assert_allclose(
        padded.logprobs[row, P:], alone.logprobs[row, len(real) :], atol=1e-5
    )


def test_right_padded_prompts_are_left_aligned(model):
    tokens, mask = _prompts(seed=4)
    order = np.argsort(-mask, axis=1, kind="stable")
    right_tokens = np.take_along_axis(tokens, order, 1)
    right_mask = np.take_along_axis(mask, order, 1)
    assert right_mask[1, -1] == 0
    key = jax.random.key(9)
    a = sampling.sample(model, tokens, mask, key=key, max_new_tokens=N)
    b = sampling.sample(model, right_tokens, right_mask, key=key, max_new_tokens=N)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.prompt_mask, b.prompt_mask)


def test_rows_stop_at_eos_and_mask_after_it(model):
    tokens, mask = _prompts(seed=1)
    free = sampling.sample(model, tokens, mask, key=jax.random.key(0), max_new_tokens=N)
    eos = int(free.tokens[0, P + 2])  # row 0 emits it as its third token
    result = sampling.sample(
        model,
        tokens,
        mask,
        key=jax.random.key(0),
        max_new_tokens=N,
        eos_ids=(eos, 63),
        pad_id=0,
    )
    lengths = np.asarray(result.lengths)
    assert lengths[0] <= 3
    for row in range(3):
        n = lengths[row]
        response = np.asarray(result.tokens[row, P:])
        np.testing.assert_array_equal(result.response_mask[row, P:], np.arange(N) < n)
        np.testing.assert_array_equal(response[:n], np.asarray(free.tokens[row, P : P + n]))
        np.testing.assert_array_equal(response[n:], 0)
        if n < N:
            assert response[n - 1] in (eos, 63)
        assert not np.isin(response[: n - 1], [eos, 63]).any()


def test_same_key_same_samples_other_key_other_samples(model):
    tokens, mask = _prompts()
    method = sampling.TopP(0.95, 1.5)
    a = sampling.sample(model, tokens, mask, key=jax.random.key(1), max_new_tokens=N, method=method)
    b = sampling.sample(model, tokens, mask, key=jax.random.key(1), max_new_tokens=N, method=method)
    c = sampling.sample(model, tokens, mask, key=jax.random.key(2), max_new_tokens=N, method=method)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_top_k_and_top_p_match_numpy_reference():
    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3
    t = 0.8
    scaled = logits / t
    kth = np.sort(scaled, -1)[:, -6:-5]
    ref_k = _np_log_softmax(np.where(scaled >= kth, scaled, -np.inf))
    np.testing.assert_allclose(sampling.TopK(6, t).log_probs(jnp.asarray(logits)), ref_k, atol=1e-5)
    probs = np.exp(_np_log_softmax(scaled))
    ref_p = np.full_like(scaled, -np.inf)
    for b in range(4):
        order = np.argsort(-probs[b])
        n = int(np.searchsorted(np.cumsum(probs[b, order]), 0.7)) + 1  # smallest set >= p
        keep = order[:n]
        ref_p[b, keep] = _np_log_softmax(scaled[b, keep])
    np.testing.assert_allclose(
        sampling.TopP(0.7, t).log_probs(jnp.asarray(logits)), ref_p, atol=1e-5
    )


def test_new_temperature_or_mass_does_not_recompile(model):
    tokens, mask = _prompts()
    kwargs = dict(key=jax.random.key(0), max_new_tokens=N)
    sampling.sample(model, tokens, mask, method=sampling.TopP(0.9, 1.0), **kwargs)
    loop = sampling.generate.decode_loop(nnx.split(model)[0])
    compiled = loop._cache_size()
    sampling.sample(model, tokens, mask, method=sampling.TopP(0.5, 0.7), **kwargs)
    assert loop._cache_size() == compiled


def test_n_samples_share_a_prefill_and_equal_the_repeated_prompts(model):
    tokens, mask = _prompts(seed=2)
    method = sampling.Temperature(1.3)
    kwargs = dict(key=jax.random.key(5), max_new_tokens=N, method=method, eos_ids=(7,))
    shared = sampling.sample(model, tokens, mask, n=4, **kwargs)
    repeated = sampling.sample(model, np.repeat(tokens, 4, 0), np.repeat(mask, 4, 0), **kwargs)
    assert shared.tokens.shape == (12, P + N)
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_array_equal(shared.response_mask, repeated.response_mask)
    np.testing.assert_array_equal(shared.prompt_mask, repeated.prompt_mask)
    # float32 log-probs from matmuls over another row count (other blocking): a few ulps
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, rtol=1e-5, atol=1e-6)
    # the 4 samples of a prompt are 4 draws, not one
    assert len({tuple(np.asarray(r)) for r in shared.tokens[:4]}) > 1


@pytest.mark.parametrize("method", [sampling.Greedy(), sampling.TopP(0.9, 1.2)])
def test_dropping_finished_rows_changes_no_sample(model, method, monkeypatch):
    rng = np.random.RandomState(3)
    tokens, mask = rng.randint(2, 64, (16, P)).astype(np.int32), np.ones((16, P), np.int32)
    widths = []
    take = sampling.generate._take_rows
    monkeypatch.setattr(
        sampling.generate, "_take_rows", lambda s, i, **k: widths.append(len(i)) or take(s, i, **k)
    )
    kwargs = dict(key=jax.random.key(1), max_new_tokens=N, method=method, eos_ids=range(2, 40))
    every = sampling.sample(model, tokens, mask, compact_every=0, **kwargs)
    assert widths == [] and len(set(np.asarray(every.lengths))) > 2  # rows end at many lengths
    compacted = sampling.sample(model, tokens, mask, compact_every=1, **kwargs)
    assert widths and all(w < 16 for w in widths)  # the loop went on with fewer rows
    for field in ("tokens", "response_mask", "prompt_mask", "lengths"):
        np.testing.assert_array_equal(getattr(compacted, field), getattr(every, field))
    np.testing.assert_allclose(compacted.logprobs, every.logprobs, rtol=1e-5, atol=1e-6)


def test_compacted_width_halves_in_powers_of_two_of_the_shard_count():
    assert sampling.compacted_width(live=3, width=16, multiple=1) == 4
    assert sampling.compacted_width(live=5, width=16, multiple=1) == 8
    assert sampling.compacted_width(live=9, width=16, multiple=1) == 16  # would not halve
    assert sampling.compacted_width(live=1, width=16, multiple=4) == 4
    assert sampling.compacted_width(live=5, width=16, multiple=4) == 8
    assert sampling.compacted_width(live=5, width=8, multiple=4) == 8
    assert sampling.compacted_width(live=0, width=8, multiple=2) == 2


def test_bad_counts_are_refused(model):
    tokens, mask = _prompts()
    with pytest.raises(ValueError, match="n >= 1"):
        sampling.sample(model, tokens, mask, key=jax.random.key(0), max_new_tokens=N, n=0)


def test_prefill_writes_its_cache_without_copying_it():
    """A 48-token prefill of 16 rows into a 304-slot cache, SmolLM2's widths on two layers
    (compiled, not run): XLA once fused the layer's read of the cache with its in-place write
    and copied the whole cache per layer (1.7x an uncached forward)."""
    import re

    hf = testing.tiny_hf_config("llama", num_hidden_layers=2, hidden_size=576,
                                intermediate_size=1536, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64)  # fmt: skip
    config = ModelConfig.from_hf(hf)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    B, P, S = 16, 48, 304
    tokens = jax.ShapeDtypeStruct((B, P), jnp.int32)
    mask = jax.ShapeDtypeStruct((B, P), jnp.bool_)

    def prefill(state, tokens, mask):
        return sampling.generate.prefill_cache(nnx.merge(graphdef, state), tokens, mask, S, 1)

    text = jax.jit(prefill).lower(state, tokens, mask).compile().as_text()
    cache = re.escape(f"f32[{B},3,{S},64]")  # a layer's buffer
    assert not re.findall(cache + r"\{[^}]*\} copy\(", text[text.index("ENTRY") :])


def test_the_decode_loop_writes_its_cache_in_place():
    """The decode loop's body (compiled, not run) copies no layer's cache buffer: attention
    reads the cache before the token's keys are written into it. Reading the updated cache,
    or slicing a layer out of one [L, ...] buffer, copied each layer's buffer every token."""
    import re

    hf = testing.tiny_hf_config("llama", num_hidden_layers=2, hidden_size=64,
                                intermediate_size=192, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=32)  # fmt: skip
    config = ModelConfig.from_hf(hf)  # the quickstart student's widths (one KV head)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    B, P, N = 8, 16, 40
    tokens, mask = jnp.zeros((B, P), jnp.int32), jnp.ones((B, P), jnp.int32)
    key, eos, pad = jax.random.key(0), jnp.asarray([1]), jnp.asarray(0)
    method = sampling.Temperature(1.0)
    s = jax.eval_shape(
        lambda state: sampling.generate._prefill(
            graphdef, state, tokens, mask, key, method, eos, pad,
            max_new_tokens=N, n=1, rules=DEFAULT_RULES, record_k=4,
        ),
        state,
    )  # fmt: skip
    lowered = sampling.generate.decode_loop(graphdef).lower(
        state, s, method, eos, pad, jnp.int32(N), max_new_tokens=N
    )
    text = lowered.compile().as_text()
    assert "while" in text
    cache = re.escape(f"f32[{B},1,{P + N},32]")
    assert not re.findall(cache + r"\{[^}]*\} copy\(", text)


def test_a_prefill_reads_only_the_columns_the_longest_prompt_fills(model):
    """Left-aligned prompts (padding first) leave the columns before the longest prompt empty:
    a prefill of its window (:func:`prompt_window`) gives the whole prefill's first-token
    hidden state and the same cache on every real slot."""
    P, size = 16, 24
    mask = np.zeros((3, P), np.int32)
    mask[0, -5:], mask[1, -2:], mask[2, -4:] = 1, 1, 1  # the longest prompt: 5 tokens
    assert sampling.generate.prompt_window(mask) == 6  # a multiple of ceil(16 / 8)
    assert sampling.generate.prompt_window(np.ones((2, P))) == P
    assert sampling.generate.prompt_window(np.zeros((2, P))) == 2
    tokens = np.random.RandomState(0).randint(2, 64, (3, P)).astype(np.int32)
    whole_h, whole = sampling.generate.prefill_cache(model, tokens, mask, size, 2)
    part_h, part = sampling.generate.prefill_cache(model, tokens, mask, size, 2, window=6)
    np.testing.assert_allclose(part_h[:, -1], whole_h[:, -1], atol=1e-5)
    np.testing.assert_array_equal(part.mask, whole.mask)
    assert int(part.index) == int(whole.index) == P
    real = np.asarray(whole.mask)[:, None, :, None]  # [rows, 1, slots, 1]
    for a, b in zip((*part.k, *part.v), (*whole.k, *whole.v), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.where(real, a, 0), np.where(real, b, 0), atol=1e-5)
