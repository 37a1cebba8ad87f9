"""Synthetic GGUF checkpoints for the tests: a TINY-shaped llama, qwen2 or qwen3 model.

`write_tiny_gguf` writes one with `gguf.GGUFWriter` + `gguf.quants.quantize` from the Hugging Face
tensors `tiny_hf_tensors` draws, storing llama's q/k as llama.cpp permutes them.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

GGML = gguf.GGMLQuantizationType

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


def tiny_hf_tensors(arch: str, head_dim: int) -> dict[str, tuple[np.ndarray, str]]:
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


def write_tiny_gguf(
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
