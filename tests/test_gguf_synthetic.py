"""`opd_jax.models.gguf.read_gguf` on synthetic checkpoints: names, layout, config, errors.

The checkpoints come from tests/gguf_checkpoints.py; `gguf.quants.dequantize` is the reference
for their tensors.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from opd_jax.models.gguf import read_gguf
from tests.gguf_checkpoints import ARCH_HEAD_DIM, TEMPLATE, TOKENS, tiny_hf_tensors, write_tiny_gguf

GGML = gguf.GGMLQuantizationType


# ------------------------------------------------------------------------ synthetic checkpoints


@pytest.mark.parametrize("arch", ARCH_HEAD_DIM)
def test_synthetic_checkpoint_round_trips_names_layout_and_values(tmp_path, arch):
    tensors = tiny_hf_tensors(arch, ARCH_HEAD_DIM[arch])
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, tensors, ARCH_HEAD_DIM[arch])
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
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, tiny_hf_tensors(arch, head_dim), head_dim)
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
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, tiny_hf_tensors(arch, head_dim), head_dim)
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
    write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tiny_hf_tensors("llama", 16), 16)
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
    write_tiny_gguf(
        tmp_path / "m.gguf", "qwen3", tiny_hf_tensors("qwen3", 32), 32, raw_tensors=q4_k
    )
    with pytest.raises(
        ValueError,
        match=r"unsupported GGUF quantisation type.*output\.weight: Q4_K.*llama-quantize",
    ):
        read_gguf(tmp_path / "m.gguf")


def test_unknown_tensor_is_named(tmp_path):
    tensors = tiny_hf_tensors("llama", 16)
    write_tiny_gguf(
        tmp_path / "m.gguf",
        "llama",
        tensors,
        16,
        gguf_names={"model.norm.weight": "rope_freqs.weight"},
    )
    with pytest.raises(ValueError, match="no Hugging Face llama counterpart.*rope_freqs.weight"):
        read_gguf(tmp_path / "m.gguf")


def test_missing_tokenizer_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "qwen2", tiny_hf_tensors("qwen2", 16), 16, tokenizer=False)
    with pytest.raises(ValueError, match="has no tokenizer metadata"):
        read_gguf(tmp_path / "m.gguf")


def test_big_endian_file_is_rejected(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="big-endian GGUF"):
        read_gguf(tmp_path / "m.gguf")


def test_get_tensor_names_an_unknown_name(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "qwen3", tiny_hf_tensors("qwen3", 32), 32)
    _, get_tensor, _, _ = read_gguf(tmp_path / "m.gguf")
    with pytest.raises(KeyError, match="lm_head.weight"):
        get_tensor("lm_head.weight")
