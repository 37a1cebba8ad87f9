"""Supervised fine-tuning: the batch layout, and a model that learns its targets."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.config import OptimConfig
from opd_jax.models import Decoder, ModelConfig
from opd_jax.models.testing import tiny_hf_config, train_tiny_tokenizer
from opd_jax.sft import SFTSettings, sft, sft_batch, sft_loss

P, N = 24, 16


def test_batch_puts_prompts_left_and_targets_plus_eos_right():
    tok = train_tiny_tokenizer()
    batch = sft_batch(tok, ["What is 1 + 1?", "Hi"], ["2", "The answer is 42."], P, N)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, P + N) for k in batch}
    target = batch["target_mask"].astype(bool)
    assert not target[:, :P].any()
    for row, text in zip(range(2), ["2", "The answer is 42."], strict=True):
        ids = batch["tokens"][row, P:][target[row, P:]].tolist()
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == text
        assert batch["attention_mask"][row, P - 1] == 1  # prompts end at column P - 1
    assert (batch["attention_mask"] >= batch["target_mask"]).all()


def test_targets_longer_than_the_budget_are_cut():
    tok = train_tiny_tokenizer()
    batch = sft_batch(tok, ["q"], ["word " * 50], P, 4)
    assert batch["target_mask"][0, P:].tolist() == [1, 1, 1, 1]


def _model(seed=0):
    config = ModelConfig.from_hf(tiny_hf_config(num_hidden_layers=1, hidden_size=32))
    return Decoder(config, rngs=nnx.Rngs(seed))


def test_fine_tuning_learns_a_repeated_target():
    tok = train_tiny_tokenizer()
    model = _model()
    data = {"prompt": ["What is 12 + 30?"] * 4, "solution": ["The answer is 42."] * 4}
    batch = jax.tree.map(jnp.asarray, sft_batch(tok, data["prompt"], data["solution"], P, N))
    before = float(sft_loss(model, batch, P, 8)[0])
    logs = []
    optim = OptimConfig(learning_rate=1e-2)
    settings = SFTSettings(steps=30, optim=optim, prompt_len=P, target_len=N, chunk_size=8)
    sft(model, tok, iter([data] * 30), settings, log=lambda s, m: logs.append((s, m)), log_every=10)
    after = float(sft_loss(model, batch, P, 8)[0])
    assert [s for s, _ in logs] == [10, 20, 30]
    assert after < 0.1 * before
    assert np.isfinite(logs[-1][1]["grad_norm"])


def test_loss_equals_a_full_logits_cross_entropy():
    tok = train_tiny_tokenizer()
    model = _model(1)
    batch = jax.tree.map(jnp.asarray, sft_batch(tok, ["a b", "c"], ["d e f", "g"], P, N))
    logits = model(batch["tokens"], attention_mask=batch["attention_mask"])[:, P - 1 : -1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, P:, None], -1)[..., 0]
    m = batch["target_mask"][:, P:]
    want = -(logp * m).sum() / m.sum()
    np.testing.assert_allclose(sft_loss(model, batch, P, 5)[0], want, rtol=1e-5)
