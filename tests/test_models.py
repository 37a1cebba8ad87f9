"""Decoder parity with `transformers`, HF checkpoint round trips, tokenizers, clear errors."""

import copy
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from opd_jax import models
from opd_jax.models import testing
from opd_jax.models.decoder import KVCache
from tests.close import assert_trees_close

PARITY_CONFIGS = {
    "qwen3_tied": testing.tiny_hf_config("qwen3", tie_word_embeddings=True),
    "qwen2_bias_yarn": testing.tiny_hf_config(
        "qwen2",
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama_llama3_rope_bias": testing.tiny_hf_config(
        "llama",
        num_key_value_heads=1,
        attention_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "smollm2_linear_rope": testing.tiny_hf_config(
        "llama", tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return testing.train_tiny_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        name: testing.write_tiny_checkpoint(root / name, cfg, tokenizer=tokenizer)
        for name, cfg in PARITY_CONFIGS.items()
    }


def _tokens(batch=2, length=48, seed=0):
    return np.random.RandomState(seed).randint(0, 320, (batch, length)).astype(np.int32)


def _torch_logits(path, tokens, attention_mask=None):
    pt = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return pt(torch.tensor(tokens, dtype=torch.long), attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    model, _ = models.load(checkpoints[name], jnp.float32)
    tokens = _tokens()
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _torch_logits(checkpoints[name], tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    print(f"parity {name}: max abs diff {err:.2e}")
    assert err < 1e-4


def test_hidden_times_unembed_is_logits(checkpoints):
    for name in ("qwen3_tied", "llama_llama3_rope_bias"):
        model, _ = models.load(checkpoints[name])
        tokens = jnp.asarray(_tokens(length=12))
        logits = model(tokens)
        np.testing.assert_allclose(model.hidden(tokens) @ model.unembed_matrix(), logits, atol=1e-5)
        assert model.unembed_matrix().shape == (32, 320)


def test_padding_left_or_right_gives_unpadded_logits(checkpoints):
    model, _ = models.load(checkpoints["qwen2_bias_yarn"])
    tokens = _tokens(batch=1, length=10)
    unpadded = np.asarray(model(jnp.asarray(tokens)))[0]
    left = np.concatenate([np.full((1, 4), 7, np.int32), tokens], 1)
    right = np.concatenate([tokens, np.full((1, 4), 7, np.int32)], 1)
    mask = np.concatenate([np.zeros((1, 4)), np.ones((1, 10))], 1).astype(np.int32)
    out_left = np.asarray(model(jnp.asarray(left), attention_mask=jnp.asarray(mask)))[0, 4:]
    out_right = np.asarray(model(jnp.asarray(right), attention_mask=jnp.asarray(mask[:, ::-1])))
    np.testing.assert_allclose(out_left, unpadded, atol=1e-5)
    np.testing.assert_allclose(out_right[0, :10], unpadded, atol=1e-5)


def test_future_tokens_do_not_change_past_logits_with_or_without_jit(checkpoints):
    model, _ = models.load(checkpoints["qwen3_tied"])
    tokens = _tokens(batch=1, length=12)
    changed = tokens.copy()
    changed[0, 8:] = (changed[0, 8:] + 1) % 320
    eager = model(jnp.asarray(tokens))
    jitted = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(changed))
    np.testing.assert_allclose(jitted[0, :8], eager[0, :8], atol=1e-5)
    assert np.abs(jitted[0, 8:] - eager[0, 8:]).max() > 1e-3


def test_left_padded_batch_matches_transformers(checkpoints):
    path = checkpoints["qwen3_tied"]
    model, _ = models.load(path)
    tokens = _tokens(batch=2, length=12)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    ref = _torch_logits(path, tokens, mask)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4)


@pytest.mark.parametrize("in_loop, fused", [(False, False), (True, False), (True, True)])
def test_kv_cache_prefill_then_steps_match_full_forward(checkpoints, in_loop, fused):
    """Cached chunks and steps give the full forward's logits, whether attention reads the
    updated cache or the cache as it was beside the call's own keys (`in_loop`), and with the
    projections side by side (`fused`: q/k/v with biases and one kv head, gate/up)."""
    model, _ = models.load(checkpoints["llama_llama3_rope_bias"])
    fused = model.fused_projections() if fused else None
    tokens = jnp.asarray(_tokens(batch=2, length=12))
    mask = jnp.ones((2, 12), jnp.int32).at[0, :3].set(0)
    full = model(tokens, attention_mask=mask)
    cache = KVCache.init(model.config, 2, 16)
    h, cache = model.hidden_cached(tokens[:, :6], cache, attention_mask=mask[:, :6])
    steps = [model.logits(h)]
    h, cache = model.hidden_cached(  # a chunk of two after the first
        tokens[:, 6:8], cache, attention_mask=mask[:, 6:8], in_loop=in_loop, fused=fused
    )
    steps.append(model.logits(h))
    for t in range(8, 12):
        h, cache = model.hidden_cached(tokens[:, t : t + 1], cache, in_loop=in_loop, fused=fused)
        steps.append(model.logits(h))
    np.testing.assert_allclose(jnp.concatenate(steps, 1)[mask == 1], full[mask == 1], atol=1e-5)
    assert int(cache.index) == 12


def test_bfloat16_params_and_compute(checkpoints):
    model, _ = models.load(checkpoints["qwen3_tied"], jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16
    assert model.hidden(jnp.asarray(_tokens(length=8))).dtype == jnp.bfloat16
    logits = model(jnp.asarray(_tokens(length=8)))
    ref, _ = models.load(checkpoints["qwen3_tied"], jnp.float32)
    assert logits.dtype == jnp.float32
    assert np.abs(logits - ref(jnp.asarray(_tokens(length=8)))).max() < 0.1


def _state_leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("max_shard_bytes", [2**30, 40_000])
def test_save_then_load_is_bit_exact(checkpoints, tmp_path, dtype, max_shard_bytes):
    model, tokenizer = models.load(checkpoints["qwen2_bias_yarn"], dtype)
    models.save_hf(model, tokenizer, tmp_path, max_shard_bytes=2**30 + 40_000 - max_shard_bytes)
    models.save_hf(model, tokenizer, tmp_path, max_shard_bytes=max_shard_bytes)  # overwrites
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 2**30)
    again, tokenizer2 = models.load(tmp_path, dtype)
    for a, b in zip(_state_leaves(model), _state_leaves(again), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert tokenizer2.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("name", ["qwen3_tied", "llama_llama3_rope_bias"])
def test_transformers_loads_saved_directory(checkpoints, tmp_path, name):
    model, tokenizer = models.load(checkpoints[name])
    models.save_hf(model, tokenizer, tmp_path)
    tokens = _tokens(length=16)
    np.testing.assert_allclose(
        _torch_logits(tmp_path, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4
    )
    assert (
        transformers.AutoTokenizer.from_pretrained(str(tmp_path)).get_vocab()
        == tokenizer.get_vocab()
    )


def test_config_round_trips_through_to_hf():
    for cfg in PARITY_CONFIGS.values():
        config = models.ModelConfig.from_hf(cfg)
        assert models.ModelConfig.from_hf(config.to_hf()) == config
        hash(config)


# --- clear errors -------------------------------------------------------------------------


def test_missing_path_and_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        models.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(testing.tiny_hf_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.load(tmp_path)
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match="not .gguf"):
        models.load(tmp_path / "weights.bin")


def test_unknown_architecture_raises():
    with pytest.raises(ValueError, match="Unknown model_type 'gpt2'"):
        models.ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="Unknown architecture"):
        models.ModelConfig.from_hf(
            testing.tiny_hf_config(architectures=["Qwen3ForSequenceClassification"])
        )
    with pytest.raises(ValueError, match="Unsupported rope scaling 'longrope'"):
        models.ModelConfig.from_hf(testing.tiny_hf_config(rope_scaling={"rope_type": "longrope"}))


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_shape_mismatch_names_tensor_and_shapes(checkpoints, tmp_path):
    path = _edit_config(checkpoints["qwen3_tied"], tmp_path / "c", intermediate_size=96)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
        r"\((64, 32|32, 64)\) but the config expects",
    ):
        models.load(path)


def test_missing_and_unexpected_tensors_raise(checkpoints, tmp_path):
    path = _edit_config(checkpoints["qwen3_tied"], tmp_path / "a", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"tensors missing .*model\.layers\.2\."):
        models.load(path)
    path = _edit_config(checkpoints["qwen3_tied"], tmp_path / "b", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensors .*model\.layers\.1\."):
        models.load(path)


def test_model_from_tensors_takes_hf_names_and_layouts(checkpoints):
    from safetensors.numpy import load_file

    tensors = load_file(str(checkpoints["qwen3_tied"] / "model.safetensors"))
    config = models.ModelConfig.from_hf(testing.tiny_hf_config("qwen3", tie_word_embeddings=True))
    model = models.model_from_tensors(config, tensors.__getitem__, tensors, dtype=jnp.float32)
    ref, _ = models.load(checkpoints["qwen3_tied"])
    tokens = jnp.asarray(_tokens(length=8))
    np.testing.assert_array_equal(model(tokens), ref(tokens))


# --- tokenizers ---------------------------------------------------------------------------


def test_check_same_tokenizer(tokenizer):
    models.check_same_tokenizer(tokenizer, testing.train_tiny_tokenizer())
    with pytest.raises(ValueError, match="tokenizers differ"):
        models.check_same_tokenizer(tokenizer, testing.train_tiny_tokenizer(vocab_size=300))


def test_load_tokenizer_and_chat_template(checkpoints, tmp_path):
    tok = models.load_tokenizer(checkpoints["qwen3_tied"])
    [text] = models.apply_chat_template(tok, ["What is 12 + 30?"])
    assert text == "<|user|>What is 12 + 30?\n<|assistant|>"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_tokenizer(tmp_path / "missing")


def test_encode_with_offsets_maps_tokens_to_characters(tokenizer):
    texts = list(testing.SENTENCES)
    ids, offsets = models.encode_with_offsets(tokenizer, texts)
    for text, row_ids, row_offsets in zip(texts, ids, offsets, strict=True):
        assert tokenizer.decode(row_ids) == text
        assert row_offsets[0][0] == 0 and row_offsets[-1][1] == len(text)
        for (s, e), (s2, e2) in itertools.pairwise(row_offsets):
            assert s < e and s <= s2 <= e <= e2  # tiles; a split character is shared
        if text.isascii():
            assert [text[s:e] for s, e in row_offsets] == [tokenizer.decode([i]) for i in row_ids]


@pytest.mark.parametrize(
    "text", [*testing.SENTENCES, "unseen: \u00fc\u4e2d\U0001f389 \u00e9\u65e5"]
)
def test_decode_with_offsets_tiles_text_on_multibyte_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    decoded, offsets = models.decode_with_offsets(tokenizer, ids)
    assert decoded == tokenizer.decode(ids) == text + "<eos>"
    assert len(offsets) == len(ids)
    assert "".join(decoded[s:e] for s, e in offsets) == decoded
    assert all(e0 == s1 for (_, e0), (s1, _) in itertools.pairwise(offsets))
    if text.startswith("unseen"):  # bytes never merged: the character's last byte gets it
        assert any(s == e for s, e in offsets)
    text_skip, offsets_skip = models.decode_with_offsets(tokenizer, ids, skip_special_tokens=True)
    assert text_skip == text and offsets_skip[-1][0] == offsets_skip[-1][1] == len(text)


def test_decode_with_offsets_keeps_trailing_partial_character(tokenizer):
    ids = tokenizer.encode("ok \U0001f600", add_special_tokens=False)
    decoded, offsets = models.decode_with_offsets(tokenizer, ids[:-1])
    assert decoded == tokenizer.decode(ids[:-1])
    assert "".join(decoded[s:e] for s, e in offsets) == decoded


@pytest.mark.parametrize(
    "text", ["We began with 12. The peak was 84.", "ok \u00fc\u4e2d\U0001f600 fin"]
)
def test_an_offset_decoder_fed_piece_by_piece_equals_decoding_at_once(tokenizer, text):
    """Sampling feeds a response a few tokens at a time; at every point the text and spans
    are those of decoding the tokens so far at once (a split character included)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = models.OffsetDecoder(tokenizer)
    for start in range(0, len(ids), 3):
        decoder.feed(ids[start : start + 3])
        assert decoder.result() == models.decode_with_offsets(tokenizer, ids[: start + 3])


@pytest.mark.parametrize("skip", [False, True])
def test_raw_decoder_decodes_as_the_tokenizer_does(tokenizer, skip):
    """The fast path (the Rust tokenizer's own `decode`) and the fallback (a tokenizer whose
    `_decode` is its own) give `tokenizer.decode` without clean-up, special tokens and split
    multi-byte characters included."""

    class OwnDecode(type(tokenizer)):
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs)

    own = copy.copy(tokenizer)
    own.__class__ = OwnDecode
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(tokenizer), rng.integers(0, 12)).tolist()
        want = tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert models.tokenizer.raw_decoder(tokenizer, skip)(ids) == want
        assert models.tokenizer.raw_decoder(own, skip)(ids) == want


def test_load_gguf_goes_through_read_gguf_and_model_from_tensors(
    checkpoints, tmp_path, monkeypatch
):
    from safetensors.numpy import load_file

    from opd_jax.models import gguf

    src = checkpoints["qwen3_tied"]
    tensors = load_file(str(src / "model.safetensors"))
    hf_config = json.loads((src / "config.json").read_text())
    fake = (hf_config, tensors.__getitem__, list(tensors), models.load_tokenizer(src))
    monkeypatch.setattr(gguf, "read_gguf", lambda path: fake)
    (tmp_path / "m.gguf").write_bytes(b"")
    model, tok = models.load(tmp_path / "m.gguf", jnp.bfloat16)
    ref, _ = models.load(src, jnp.bfloat16)
    tokens = jnp.asarray(_tokens(length=8))
    np.testing.assert_array_equal(model(tokens), ref(tokens))
    assert tok.get_vocab() == fake[3].get_vocab()


def test_rematerialised_blocks_give_the_same_hidden_states_and_gradients():
    from opd_jax.models import Decoder, ModelConfig
    from opd_jax.models.testing import tiny_hf_config

    model = Decoder(ModelConfig.from_hf(tiny_hf_config()), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 320)
    mask = jnp.ones((2, 9), jnp.int32).at[0, :3].set(0)

    def loss(p, remat):
        h = nnx.merge(graphdef, p).hidden(tokens, attention_mask=mask, remat=remat)
        return (h**2).mean()

    plain, remat = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r) for r in (0, 1))
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    assert_trees_close(remat[1], plain[1])


@pytest.mark.parametrize("query_chunk, remat", [(4, False), (3, True), (32, False)])
def test_query_chunked_attention_gives_the_same_hidden_states_and_gradients(query_chunk, remat):
    from opd_jax.models import Decoder, ModelConfig
    from opd_jax.models.testing import tiny_hf_config

    model = Decoder(ModelConfig.from_hf(tiny_hf_config()), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 320)
    mask = jnp.ones((2, 11), jnp.int32).at[0, :3].set(0).at[1, 9:].set(0)

    def loss(p, chunk):
        h = nnx.merge(graphdef, p).hidden(
            tokens, attention_mask=mask, remat=remat, query_chunk=chunk
        )
        return (h**2).mean()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    whole, chunked = grad(params, 0), grad(params, query_chunk)
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)
    assert_trees_close(chunked[1], whole[1])


@pytest.fixture
def packed_on_xla(monkeypatch):
    """The "cudnn" attention path (rows packed, causal + length mask) with XLA's kernel, which
    runs on any backend; the cuDNN kernel itself is checked in tests/test_gpu.py."""
    from opd_jax.models import attention

    monkeypatch.setattr(attention, "_PACKED_IMPLEMENTATION", "xla")


@pytest.mark.parametrize("kind", ["cudnn", "flash"])
@pytest.mark.parametrize("remat", [False, True])
def test_packed_attention_equals_masked_scores_on_real_tokens(packed_on_xla, kind, remat):
    from opd_jax.models import Decoder, ModelConfig
    from opd_jax.models.testing import tiny_hf_config

    model = Decoder(ModelConfig.from_hf(tiny_hf_config()), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (4, 11), 0, 320)
    mask = (
        jnp.ones((4, 11), jnp.int32)
        .at[0, :3].set(0)  # left padding
        .at[1, 9:].set(0)  # right padding
        .at[2, :2].set(0).at[2, 5].set(0).at[2, 10:].set(0)  # both, and a hole
    )  # fmt: skip

    def loss(p, attention):
        h = nnx.merge(graphdef, p).hidden(
            tokens, attention_mask=mask, remat=remat, attention=attention, query_chunk=4
        )
        return (jnp.where(mask[..., None], h, 0) ** 2).mean(), h

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (scores_loss, h_scores), g_scores = grad(params, "xla")
    (packed_loss, h_packed), g_packed = grad(params, kind)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(h_packed[real], h_scores[real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed_loss, scores_loss, rtol=1e-6)
    assert_trees_close(g_packed, g_scores)
