"""Supervised fine-tuning: teacher-forced next-token cross-entropy on reference responses.

The project's own way to make a model (e.g. the strong teacher and the weak starting student
of the offline experiment, :mod:`opd_jax.experiment`). Batches put the prompt in the first
``P`` columns (left-padded, as rollouts do) and the target response plus EOS in the next
``N`` (right-padded); only target tokens are scored, through the chunked log-probabilities of
:func:`opd_jax.core.token_logprobs_chunked` (no ``[B, S, V]`` logits).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opd_jax import core
from opd_jax.config import OptimConfig
from opd_jax.errors import InputError
from opd_jax.models import Decoder, Tokenizer, encode_prompts, pad_id
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.state import init_state


def sft_batch(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    prompt_len: int,
    target_len: int,
    *,
    chat_template: bool = True,
) -> dict[str, np.ndarray]:
    """Host: ``tokens, attention_mask, target_mask [B, P + N]`` int32 for teacher forcing.

    Prompts are left-padded to ``prompt_len`` (:func:`encode_prompts`); each target is
    followed by EOS and right-padded (or cut) to ``target_len``.
    """
    prompt_BxP, prompt_mask_BxP = encode_prompts(
        tokenizer, prompts, prompt_len, chat_template=chat_template
    )
    if tokenizer.eos_token_id is None:
        raise InputError("supervised fine-tuning needs a tokenizer with an EOS token.")
    ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    target_BxN = np.full((len(ids), target_len), pad_id(tokenizer), np.int32)
    target_mask_BxN = np.zeros((len(ids), target_len), np.int32)
    for b, row in enumerate(ids):
        row = (list(row) + [tokenizer.eos_token_id])[:target_len]
        target_BxN[b, : len(row)] = row
        target_mask_BxN[b, : len(row)] = 1
    return {
        "tokens": np.concatenate([prompt_BxP, target_BxN], 1),
        "attention_mask": np.concatenate([prompt_mask_BxP, target_mask_BxN], 1),
        "target_mask": np.concatenate([np.zeros_like(prompt_mask_BxP), target_mask_BxN], 1),
    }


def sft_loss(
    model: Decoder, batch: dict[str, jax.Array], prompt_len: int, chunk_size: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood of the target tokens, and its per-token statistics."""
    tokens, mask = batch["tokens"], batch["attention_mask"]
    h_BxNxD = model.response_hidden(tokens, mask, prompt_len)
    y_BxN = tokens[:, prompt_len:]
    m_BxN = batch["target_mask"][:, prompt_len:].astype(jnp.float32)
    logp_BxN = core.token_logprobs_chunked(
        h_BxNxD, model.unembed_matrix(), y_BxN, chunk_size=chunk_size
    )
    count = jnp.maximum(m_BxN.sum(), 1.0)
    loss = -(logp_BxN * m_BxN).sum() / count
    return loss, {"loss": loss, "target_tokens": m_BxN.sum()}


def make_sft_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, prompt_len: int, chunk_size: int
) -> Callable[..., tuple[nnx.State, Any, dict[str, jax.Array]]]:
    """The jitted, state-donating ``(params, opt_state, batch) -> (params, opt_state,
    metrics)`` of supervised fine-tuning (``metrics``: loss, grad_norm, target_tokens)."""

    def step(params, opt_state, batch):
        def loss_fn(p):
            return sft_loss(nnx.merge(graphdef, p), batch, prompt_len, chunk_size)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """Supervised fine-tuning of one model: ``steps`` updates of the optimizer ``optim``
    (:func:`~opd_jax.train.optimizer.make_optimizer`, as OPD's) on ``prompt_len`` prompt and
    ``target_len`` target tokens."""

    steps: int
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    prompt_len: int = 96
    target_len: int = 96
    chunk_size: int = 1024
    chat_template: bool = True


def sft(
    model: Decoder,
    tokenizer: Tokenizer,
    batches: Iterator[dict[str, Any]],
    settings: SFTSettings,
    *,
    log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 50,
) -> Decoder:
    """Fine-tunes ``model`` in place on ``batches`` of ``{"prompt": [...], "solution": [...]}``
    and returns it; ``log(step, {"loss", "grad_norm", "tokens_per_s"})`` every ``log_every``
    steps and at the end."""
    tx = make_optimizer(settings.optim, settings.steps)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = init_state(tx, params).opt_state
    step_fn = make_sft_step(graphdef, tx, settings.prompt_len, settings.chunk_size)
    start, tokens = time.perf_counter(), 0.0
    for step in range(settings.steps):
        raw = next(batches)
        host = sft_batch(
            tokenizer,
            raw["prompt"],
            raw["solution"],
            settings.prompt_len,
            settings.target_len,
            chat_template=settings.chat_template,
        )
        params, opt_state, metrics = step_fn(params, opt_state, jax.tree.map(jnp.asarray, host))
        tokens += float(host["target_mask"].sum())
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == settings.steps):
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            scalars["tokens_per_s"] = tokens / (time.perf_counter() - start)
            log(step + 1, scalars)
    nnx.update(model, params)
    return model
