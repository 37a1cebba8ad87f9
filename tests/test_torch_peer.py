"""The PyTorch peer of the benchmarks computes opd_jax's OPD step: same loss, same gradient.

``benchmarks.opd_step`` times opd_jax's jitted step against ``benchmarks.torch_opd``;
the comparison is only fair if both compute the same thing. Here, in float32 on the same tiny
weights (opd_jax and transformers reading one checkpoint) and the same batch, with left-padded
prompts and a response stopped early, one step of each gives the same loss and the same
gradient norm (with and without the peer's gradient checkpointing), and the chunked
log-probabilities equal the unchunked ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from benchmarks.torch_opd import TorchOPD, sampled_logprobs
from opd_jax import core, models
from opd_jax.config import OptimConfig
from opd_jax.models.testing import tiny_hf_config, train_tiny_tokenizer
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.step import StepSettings, make_train_step

P, N = 4, 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tied-embedding Qwen3 student (as in the benchmarks) and a wider, untied Llama teacher,
    initialised by transformers with large weights (std 0.3) so that every token matters."""
    root = tmp_path_factory.mktemp("peer")
    tokenizer = train_tiny_tokenizer()
    shape = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=48, initializer_range=0.3)
    configs = {
        "student": tiny_hf_config("qwen3", tie_word_embeddings=True, **shape),
        "teacher": tiny_hf_config("llama", **shape | {"hidden_size": 48}),
    }
    for seed, (role, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**config)
        )
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
    return root


def batch_arrays():
    """B=2: row 0 stops after 4 of 6 response tokens, row 1 has one left pad in its prompt."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 300, (2, P + N)).astype(np.int32)
    prompt = np.ones((2, P + N), np.int32)
    prompt[:, P:] = 0
    prompt[1, 0] = 0
    response = np.zeros((2, P + N), np.int32)
    response[:, P:] = 1
    response[0, P + 4 :] = 0
    tokens[1, 0] = tokens[0, P + 4 :] = 0  # pad id where nothing is real
    attention = prompt | response
    seg = np.asarray(core.fixed_segments(jnp.asarray(response[:, P:]), 2))
    return {"tokens": tokens, "attention_mask": attention, "response_mask": response, "seg": seg}


def opd_jax_step(root, batch):
    student, _ = models.load(root / "student")
    teacher, _ = models.load(root / "teacher")
    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    tx = make_optimizer(OptimConfig(schedule="constant"), steps=1)
    objective = core.ObjectiveSettings(rule="full", k=4, chunk_size=5)
    settings = StepSettings(prompt_len=P, objective=objective, accumulate=1)
    step = make_train_step(graphdef, teacher_graphdef, tx, settings)
    _, _, metrics = step(params, tx.init(params), teacher_params, batch, jax.random.key(0))
    return float(metrics["loss"]), float(metrics["grad_norm"])


def torch_models(root):
    return [
        transformers.AutoModelForCausalLM.from_pretrained(
            root / role, dtype=torch.float32, attn_implementation="sdpa"
        )
        for role in ("student", "teacher")
    ]


def test_torch_step_has_opd_jax_loss_and_gradient_norm(pair):
    host = batch_arrays()
    loss, grad_norm = opd_jax_step(pair, {k: jnp.asarray(v) for k, v in host.items()})
    batch = {k: torch.from_numpy(host[k].astype(np.int64)) for k in ("tokens", "attention_mask")}
    batch["response_mask"] = torch.from_numpy(host["response_mask"])
    assert np.isfinite(loss) and grad_norm > 0
    for remat in (False, True):
        peer = TorchOPD(*torch_models(pair), P, chunk_size=3, remat=remat)
        torch_loss, torch_norm = peer.step(batch)
        np.testing.assert_allclose(float(torch_loss), loss, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(float(torch_norm), grad_norm, rtol=1e-4)


def test_chunked_log_probs_equal_the_full_projection(pair):
    student, _ = torch_models(pair)
    h = torch.randn(2, 5, student.config.hidden_size, requires_grad=True)
    y = torch.randint(0, student.config.vocab_size, (2, 5))
    weight = student.lm_head.weight
    full = sampled_logprobs(h, weight, y, chunk_size=0)
    (full_grad,) = torch.autograd.grad(full.sum(), h)
    chunked = sampled_logprobs(h, weight, y, chunk_size=3)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), h)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_grad, full_grad)
