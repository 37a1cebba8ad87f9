"""Model families: one `Family` entry in `FAMILIES` is all a config-level family needs."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.errors import InputError
from opd_jax.models import Decoder, ModelConfig, load_hf_weights, read_config, save_hf
from opd_jax.models.families import FAMILIES, Family, family, gguf_architectures, gguf_family
from opd_jax.models.gguf import hf_config_from_metadata
from opd_jax.models.hf import hf_layout
from opd_jax.models.testing import tiny_hf_config

# A made-up family: Llama with Qwen3's q/k norm, called "toy" by llama.cpp.
TOY = Family(
    "toyllama",
    "ToyLlamaForCausalLM",
    gguf_architecture="toy",
    qk_norm=True,
    gguf_rotary_permuted=True,
    hf_defaults={"mlp_bias": False},
)


@pytest.fixture
def toy_family(monkeypatch):
    """`TOY` registered for the test only."""
    monkeypatch.setitem(FAMILIES, TOY.model_type, TOY)
    return TOY


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("attention_bias", [False, True])
def test_every_family_round_trips_through_its_hf_config(model_type, attention_bias):
    config = ModelConfig.from_hf(tiny_hf_config(model_type, attention_bias=attention_bias))
    hf = config.to_hf()
    assert ModelConfig.from_hf(hf) == config
    assert hf["architectures"] == [family(model_type).hf_architecture]
    assert hf.items() >= family(model_type).hf_defaults.items()


def test_family_fields_set_the_config():
    qwen3, qwen2, llama = (
        ModelConfig.from_hf(tiny_hf_config(t)) for t in ("qwen3", "qwen2", "llama")
    )
    assert (qwen3.qk_norm, qwen2.qk_norm, llama.qk_norm) == (True, False, False)
    assert (qwen2.qkv_bias, qwen2.out_bias) == (True, False)  # Qwen2: q/k/v biases, never o
    llama_bias = ModelConfig.from_hf(tiny_hf_config("llama", attention_bias=True))
    assert (llama_bias.qkv_bias, llama_bias.out_bias) == (True, True)
    assert llama.family is FAMILIES["llama"]


def test_unknown_model_type_names_the_supported_ones():
    supported = r"supported: \['llama', 'qwen2', 'qwen3'\].*SmolLM2.*'llama'"
    with pytest.raises(InputError, match=f"Unknown model_type 'gpt2'; {supported}"):
        family("gpt2")
    mistral = rf"'mistral' \(architectures=\['Mistral'\]\); {supported}"
    with pytest.raises(InputError, match=mistral):
        ModelConfig.from_hf({"model_type": "mistral", "architectures": ["Mistral"]})


def test_gguf_architectures_map_to_families():
    assert gguf_architectures() == ["llama", "qwen2", "qwen3"]
    assert gguf_family("llama").gguf_rotary_permuted
    assert not gguf_family("qwen2").gguf_rotary_permuted
    assert gguf_family("gpt2") is None


def test_a_family_is_added_by_its_registry_entry_alone(toy_family, tmp_path):
    hf = tiny_hf_config("toyllama", num_hidden_layers=1)
    config = ModelConfig.from_hf(hf)
    assert (config.qk_norm, config.qkv_bias) == (True, False)
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert config.to_hf()["mlp_bias"] is False

    model = Decoder(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8))
    logits = model(tokens)
    assert logits.shape == (2, 8, 320) and bool(jnp.isfinite(logits).all())

    assert "model.layers.0.self_attn.q_norm.weight" in hf_layout(config)
    save_hf(model, None, tmp_path)
    loaded = load_hf_weights(tmp_path, ModelConfig.from_hf(read_config(tmp_path)))
    np.testing.assert_array_equal(loaded(tokens), logits)


def test_an_added_family_is_read_from_gguf_under_its_llama_cpp_name(toy_family, tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "toy.gguf"), "toy")
    for add, value in [
        (w.add_block_count, 1),
        (w.add_context_length, 256),
        (w.add_embedding_length, 32),
        (w.add_feed_forward_length, 64),
        (w.add_head_count, 4),
        (w.add_layer_norm_rms_eps, 1e-6),
        (w.add_vocab_size, 320),
    ]:
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((320, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    reader = gguf.GGUFReader(str(tmp_path / "toy.gguf"))
    config = ModelConfig.from_hf(hf_config_from_metadata(reader, {"token_embd.weight"}))
    assert config.to_hf()["architectures"] == ["ToyLlamaForCausalLM"]
    assert (config.qk_norm, config.num_layers, config.hidden_size) == (True, 1, 32)
