"""The two frameworks of the OPD step benchmark: model shapes, weights, batches and FLOPs, and
each framework's side (``JaxSide``: opd_jax's jitted step; ``TorchSide``: transformers and
``torch_opd.TorchOPD``) on the same HF checkpoints and batch. Used by ``benchmarks.opd_step``
(and its parts), which sets the environment (``XLA_PYTHON_CLIENT_PREALLOCATE``,
``OMP_WAIT_POLICY``) before these imports start JAX and torch."""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks import torch_opd
from opd_jax import core, models, sampling
from opd_jax.config import OptimConfig
from opd_jax.train import step as train_step
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.state import init_state

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEGMENT_TOKENS = 32
K = 16  # top-K of opd_jax's scored statistics (its default)
# bfloat16 dense peak FLOP/s by device kind (NVIDIA datasheets; SXM unless "PCIe").
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def _shape(family: str, V: int, D: int, F: int, L: int, Nh: int, Kv: int, H: int) -> dict:
    """A HF ``config.json`` dict: Qwen3 or Llama (SmolLM2), tied embeddings."""
    common_keys = dict(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=Nh, num_key_value_heads=Kv, head_dim=H, hidden_act="silu",
        tie_word_embeddings=True, attention_bias=False,
    )  # fmt: skip
    ids = dict(bos_token_id=1, eos_token_id=2)
    if family == "qwen3":
        if V > 151_645:
            ids = dict(bos_token_id=151_643, eos_token_id=151_645)
        return common_keys | ids | dict(
            model_type="qwen3", architectures=["Qwen3ForCausalLM"], rms_norm_eps=1e-6,
            rope_theta=1_000_000.0, max_position_embeddings=40_960,
        )  # fmt: skip
    return common_keys | ids | dict(
        model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
        rope_theta=100_000.0, max_position_embeddings=32_768, mlp_bias=False,
    )  # fmt: skip


SHAPES = {
    "qwen3-0.6b": _shape("qwen3", 151_936, 1024, 3072, 28, 16, 8, 128),
    "qwen3-1.7b": _shape("qwen3", 151_936, 2048, 6144, 28, 16, 8, 128),
    "smollm2-135m": _shape("llama", 49_152, 576, 1536, 30, 9, 3, 64),
    "tiny-llama": _shape("llama", 2048, 64, 128, 2, 4, 2, 16),
    "tiny-qwen3": _shape("qwen3", 1024, 64, 128, 2, 4, 2, 16),
}
# pair -> (student shape, teacher shape)
PAIRS = {
    "smollm2": ("smollm2-135m", "smollm2-135m"),
    "tiny": ("tiny-llama", "tiny-llama"),
    "0.6b": ("qwen3-0.6b", "qwen3-0.6b"),
    "0.6b-1.7b": ("qwen3-0.6b", "qwen3-1.7b"),
    "1.7b": ("qwen3-1.7b", "qwen3-1.7b"),
    "tiny-qwen3": ("tiny-qwen3", "tiny-qwen3"),
}


def build_checkpoints(root: str, pair: str, dtype: str) -> dict[str, str]:
    """Random transformers models of the pair's shapes saved as HF directories (with a tiny
    tokenizer, which ``opd_jax.models.load`` reads); ``{"student": dir, "teacher": dir}``."""
    import transformers

    from opd_jax.models.testing import train_tiny_tokenizer

    tokenizer, dirs = train_tiny_tokenizer(), {}
    for seed, (role, shape) in enumerate(zip(("student", "teacher"), PAIRS[pair], strict=True)):
        torch.manual_seed(seed)
        with torch.device(TORCH_DEVICE):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(**SHAPES[shape]), dtype=getattr(torch, dtype)
            )
        dirs[role] = os.path.join(root, f"{role}-{shape}")
        model.save_pretrained(dirs[role])
        tokenizer.save_pretrained(dirs[role])
        del model
    free_memory()
    return dirs


def make_batch(batch: int, prompt: int, response: int, vocab: int) -> dict[str, np.ndarray]:
    """Host arrays ``tokens, attention_mask, response_mask [B, P+N]`` and ``seg [B, N]``."""
    tokens = np.random.default_rng(0).integers(100, vocab - 100, (batch, prompt + response))
    response_mask = np.zeros_like(tokens, np.int32)
    response_mask[:, prompt:] = 1
    seg = np.broadcast_to(np.arange(response, dtype=np.int32) // SEGMENT_TOKENS, (batch, response))
    return {
        "tokens": tokens.astype(np.int32),
        "attention_mask": np.ones_like(response_mask),
        "response_mask": response_mask,
        "seg": np.ascontiguousarray(seg),
    }


def forward_flops(hf: dict[str, Any], B: int, S: int, N: int) -> float:
    """Matmul FLOPs of one forward over ``[B, S]``, the vocabulary projected on the ``N``
    response positions: ``2 L P_layer B S`` + causal attention ``2 L B Nh H S^2`` (QK^T and
    PV over the visible half) + ``2 D V B N``."""
    D, F, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    Nh, Kv, H = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    layer_params = 2 * D * Nh * H + 2 * D * Kv * H + 3 * D * F
    return (
        2.0 * L * layer_params * B * S
        + 2.0 * L * B * Nh * H * S * S
        + 2.0 * D * hf["vocab_size"] * B * N
    )


def step_flops(pair: str, B: int, P: int, N: int) -> float:
    """Model FLOPs of one update: student forward and backward (3 forwards) + teacher forward."""
    student, teacher = (SHAPES[s] for s in PAIRS[pair])
    return 3 * forward_flops(student, B, P + N, N) + forward_flops(teacher, B, P + N, N)


def peak_flops(dtype: str) -> float | None:
    """The device's bfloat16 dense peak (None on CPU, in float32 or for an unknown card)."""
    if jax.default_backend() != "gpu" or dtype != "bfloat16":
        return None
    kind = jax.devices()[0].device_kind
    return next((p for n, p in PEAK_BF16.items() if all(w in kind for w in n.split())), None)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_whole_vocab(path: str, dtype: Any) -> nnx.Module:
    """``models.load``, scoring over every row of the embedding, as the peer does. The
    checkpoints carry a tiny tokenizer (320 ids), to which ``models.load`` fits the model (a
    user's padded embedding never forms logits past its tokenizer): the SmolLM2 rows of
    2026-12-06/07 compared opd_jax over 320 logits with PyTorch over 49,152."""
    model, _ = models.load(path, dtype)
    model.config = dataclasses.replace(model.config, token_vocab=None)
    return model


class JaxSide:
    """opd_jax's models (loaded from the HF directories, over their whole vocabulary) and its
    jitted, donating step."""

    name = "opd_jax"

    def __init__(self, dirs: dict[str, str], dtype: str, chunk: int, remat: bool, attention: str):
        self.student_dir, self.dtype = dirs["student"], getattr(jnp, dtype)
        teacher = load_whole_vocab(dirs["teacher"], self.dtype)
        # the first case's weights: a copy loaded for its graph alone and dropped would leave
        # a hole in the kept heap that the step's buffer does not fit (0.5 GiB of peak RSS)
        self.graphdef, self._loaded = nnx.split(
            load_whole_vocab(self.student_dir, self.dtype), nnx.Param
        )
        self.teacher_graphdef, self.teacher_params = nnx.split(teacher, nnx.Param)
        hyper = torch_opd.Hyper()  # the peer's hyper-parameters, in opd_jax's optimizer
        optim = OptimConfig(
            learning_rate=hyper.learning_rate, schedule="constant", b1=hyper.b1, b2=hyper.b2,
            weight_decay=hyper.weight_decay, clip_norm=hyper.clip_norm,
        )  # fmt: skip
        self.tx = make_optimizer(optim, steps=1)
        self.chunk, self.remat, self.key = chunk, remat, jax.random.key(0)
        self.attention = models.resolve_attention(attention, (getattr(jnp, dtype),))

    def fresh_params(self) -> nnx.State:
        """The student's weights as loaded: every case starts from them (those loaded with the
        side, then read again from its directory, so that the process holds no second copy
        for the next case)."""
        params, self._loaded = self._loaded, None
        if params is None:
            params = nnx.split(load_whole_vocab(self.student_dir, self.dtype), nnx.Param)[1]
        return params

    def settings(self, prompt: int, rule: str):
        objective = core.ObjectiveSettings(rule=rule, k=K, chunk_size=self.chunk)
        return train_step.StepSettings(
            prompt_len=prompt, objective=objective, accumulate=1, remat=self.remat,
            attention=self.attention,
        )  # fmt: skip

    def compile_step(self, host: dict[str, np.ndarray], prompt: int, rule: str):
        """``(run_step(batch) -> loss, batch, state, info)``: the step compiled ahead of time
        on fresh weights and AdamW state, its compile seconds and XLA's temporary memory."""
        state = list(init_state(self.tx, self.fresh_params()))
        batch = jax.device_put(host)
        fn = train_step.make_train_step(
            self.graphdef, self.teacher_graphdef, self.tx, self.settings(prompt, rule)
        )
        start = time.perf_counter()
        compiled = fn.lower(*state, self.teacher_params, batch, self.key).compile()
        info = {"compile_s": time.perf_counter() - start}
        memory = compiled.memory_analysis()
        if memory is not None:  # XLA's own account; only a failed allocation is an OOM
            info["xla_temp_gib"] = memory.temp_size_in_bytes / 2**30
            info["xla_peak_gib"] = (
                memory.temp_size_in_bytes + memory.argument_size_in_bytes
                + memory.output_size_in_bytes - memory.alias_size_in_bytes
            ) / 2**30  # fmt: skip

        def run_step(batch):
            state[0], state[1], metrics = compiled(*state, self.teacher_params, batch, self.key)
            return jax.block_until_ready(metrics["loss"])

        return run_step, batch, state, info

    def update(self, host, prompt: int, response: int, rule: str = "full"):
        run_step, batch, _, info = self.compile_step(host, prompt, rule)
        return (lambda: run_step(batch)), info

    def rollout_update(self, host, prompt: int, response: int):
        run_step, _, state, info = self.compile_step(host, prompt, "full")
        prompts = jnp.asarray(host["tokens"][:, :prompt])

        @jax.jit
        def to_batch(result):
            r = result.response_mask
            seg = core.fixed_segments(r[:, prompt:], SEGMENT_TOKENS)
            return dict(tokens=result.tokens, attention_mask=r | result.prompt_mask,
                        response_mask=r, seg=seg)  # fmt: skip

        def run():
            result = sampling.sample(
                nnx.merge(self.graphdef, state[0]), prompts, key=self.key,
                max_new_tokens=response, method=sampling.Temperature(1.0), eos_ids=(),
            )  # fmt: skip
            return run_step(to_batch(result))

        return run, info

    def close(self) -> None:
        del self.teacher_params


class TorchSide:
    """transformers' models (``from_pretrained`` of the same directories, SDPA attention) and
    ``torch_opd.TorchOPD``; ``compile``: the backbones through ``torch.compile``."""

    def __init__(self, dirs, dtype: str, chunk: int, remat: bool, compile: bool = False):
        import transformers

        self.name = "torch_compile" if compile else "torch"
        self.models = [
            transformers.AutoModelForCausalLM.from_pretrained(
                dirs[role], dtype=getattr(torch, dtype), attn_implementation="sdpa"
            ).to(TORCH_DEVICE)
            for role in ("student", "teacher")
        ]
        self.chunk, self.remat, self.compile = chunk, remat, compile

    def _opd(self, prompt: int) -> torch_opd.TorchOPD:
        if TORCH_DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return torch_opd.TorchOPD(
            *self.models, prompt, chunk_size=self.chunk, remat=self.remat, compile=self.compile
        )

    def _done(self, loss: torch.Tensor) -> float:
        return float(loss)  # waits for the device

    def update(self, host, prompt: int, response: int):
        opd = self._opd(prompt)
        names = ("tokens", "attention_mask", "response_mask")
        batch = {n: torch.from_numpy(host[n].astype(np.int64)).to(TORCH_DEVICE) for n in names}
        batch["padded"] = bool((host["attention_mask"] == 0).any())
        return (lambda: self._done(opd.step(batch)[0])), {}

    def rollout_update(self, host, prompt: int, response: int):
        opd = self._opd(prompt)
        prompts = torch.from_numpy(host["tokens"][:, :prompt].astype(np.int64)).to(TORCH_DEVICE)
        return (lambda: self._done(opd.step(opd.generate(prompts, response))[0])), {}

    def info(self) -> dict[str, float]:
        if TORCH_DEVICE != "cuda":
            return {}
        return {"torch_peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    def close(self) -> None:
        del self.models


def make_side(framework: str, dirs, dtype: str, chunk: int, remat: bool, attention: str):
    """The side of ``framework`` (``opd_jax``, ``torch`` or ``torch_compile``)."""
    if framework == "opd_jax":
        return JaxSide(dirs, dtype, chunk, remat, attention)
    return TorchSide(dirs, dtype, chunk, remat, compile=framework == "torch_compile")
