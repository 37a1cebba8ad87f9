"""The OPD update step in PyTorch + transformers: the peer that opd_jax's step is measured against.

The same step as ``opd_jax.train.step`` with the ``full`` rule (every response token weighted 1):

1. teacher forward over prompt + response under ``torch.no_grad``;
2. student forward; with ``q``, ``s`` the teacher and student log-probs of the sampled tokens
   ``y_t`` (log-softmax in float32, then gather), the advantage ``A_t = q_t - s_t`` is detached
   and ``loss = -sum_t w_t A_t s_t / sum_t w_t`` over response tokens (``w`` = response mask):
   the policy-gradient form of per-token reverse KL;
3. backward, global-norm clipping (``clip_grad_norm_``) and AdamW, the hyper-parameters of
   ``opd_jax.train.optimizer.make_optimizer`` (``b1``, ``b2``, ``eps=1e-8``, decoupled weight
   decay).

Written the way a PyTorch user would: transformers' SDPA attention (flash / memory-efficient
kernels on a GPU; the causal flag instead of a mask when there is no padding), parameters in the
dtype they are loaded in (bfloat16 on a GPU, as opd_jax's bfloat16 configs), fused AdamW on CUDA.
The vocabulary projection is chunked like opd_jax's ``score_chunked``: ``chunk_size`` positions'
``[chunk, V]`` logits at a time, each chunk under ``torch.utils.checkpoint`` so the backward
recomputes them (``chunk_size=0``: one ``[B, N, V]`` projection, stored for the backward).
``remat=True`` recomputes the student's decoder layers in the backward pass (transformers'
gradient checkpointing; opd_jax's ``remat``). ``compile=True`` runs both backbones through
``torch.compile`` (the loss head stays eager).

Not in this step (opd_jax's step does them): the top-K statistics, the release rule and the
diagnostics; they are measured separately by ``benchmarks.opd_step``.

Used by ``benchmarks.opd_step`` (through ``benchmarks.opd_sides``) and
``tests/test_torch_peer.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils.checkpoint


@dataclasses.dataclass(frozen=True)
class Hyper:
    """AdamW and clipping; the defaults of ``opd_jax.config.OptimConfig`` (constant rate)."""

    learning_rate: float = 1e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0


def make_optimizer(model: torch.nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters; fused on CUDA, ``foreach`` elsewhere."""
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        model.parameters(),
        lr=hyper.learning_rate,
        betas=(hyper.b1, hyper.b2),
        eps=hyper.eps,
        weight_decay=hyper.weight_decay,
        fused=cuda or None,
        foreach=None if cuda else True,
    )


def positions(attention_mask_BxS: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``[B, S]`` = running count of real tokens minus one (opd_jax's default)."""
    return (attention_mask_BxS.long().cumsum(-1) - 1).clamp(min=0)


def response_hidden(
    backbone: Any,
    tokens_BxS: torch.Tensor,
    attention_mask_BxS: torch.Tensor | None,
    position_ids_BxS: torch.Tensor,
    prompt_len: int,
) -> torch.Tensor:
    """Final-norm hidden states ``[B, N, D]`` that predict the response columns ``[P, S)``.

    ``backbone`` is the transformers decoder without its head (``model.model``, or its
    ``torch.compile`` wrapper); ``attention_mask=None`` means no padding (SDPA's causal path).
    """
    out = backbone(
        input_ids=tokens_BxS,
        attention_mask=attention_mask_BxS,
        position_ids=position_ids_BxS,
        use_cache=False,
    )
    return out.last_hidden_state[:, prompt_len - 1 : -1]


def _chunk_logprobs(h_CxD: torch.Tensor, weight_VxD: torch.Tensor, y_C: torch.Tensor):
    logits_CxV = (h_CxD @ weight_VxD.T).float()
    return torch.log_softmax(logits_CxV, dim=-1).gather(-1, y_C[:, None])[:, 0]


def sampled_logprobs(
    h_BxNxD: torch.Tensor, weight_VxD: torch.Tensor, y_BxN: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``log softmax(h @ W^T)[y]``, ``[B, N]`` float32, ``chunk_size`` positions at a time."""
    B, N, D = h_BxNxD.shape
    h_RxD, y_R = h_BxNxD.reshape(B * N, D), y_BxN.reshape(B * N)
    if chunk_size <= 0 or chunk_size >= B * N:
        return _chunk_logprobs(h_RxD, weight_VxD, y_R).reshape(B, N)
    grad = torch.is_grad_enabled() and h_RxD.requires_grad
    parts = []
    for start in range(0, B * N, chunk_size):
        h, y = h_RxD[start : start + chunk_size], y_R[start : start + chunk_size]
        if grad:
            parts.append(
                torch.utils.checkpoint.checkpoint(
                    _chunk_logprobs, h, weight_VxD, y, use_reentrant=False
                )
            )
        else:
            parts.append(_chunk_logprobs(h, weight_VxD, y))
    return torch.cat(parts).reshape(B, N)


def opd_loss(
    student: Any,
    teacher: Any,
    batch: dict[str, torch.Tensor],
    prompt_len: int,
    chunk_size: int,
    backbones: tuple[Any, Any] | None = None,
) -> torch.Tensor:
    """Sampled-token reverse KL in policy-gradient form, token mean over the response.

    ``batch``: ``tokens``, ``attention_mask``, ``response_mask`` ``[B, S]``; an optional
    ``padded`` bool says whether ``attention_mask`` has zeros (otherwise it is not passed, so
    that SDPA takes its causal path). ``backbones``: (student, teacher) decoders to call
    instead of ``model.model`` (e.g. compiled).
    """
    s_backbone, t_backbone = backbones or (student.model, teacher.model)
    tokens, mask = batch["tokens"], batch["attention_mask"]
    pos = positions(mask)
    attn = mask if batch.get("padded", True) else None
    y_BxN = tokens[:, prompt_len:]
    with torch.no_grad():
        h_t = response_hidden(t_backbone, tokens, attn, pos, prompt_len)
        q_BxN = sampled_logprobs(h_t, teacher.lm_head.weight, y_BxN, chunk_size)
    h_s = response_hidden(s_backbone, tokens, attn, pos, prompt_len)
    s_BxN = sampled_logprobs(h_s, student.lm_head.weight, y_BxN, chunk_size)
    advantage_BxN = (q_BxN - s_BxN).detach()
    w_BxN = batch["response_mask"][:, prompt_len:].float()
    return -(w_BxN * advantage_BxN * s_BxN).sum() / w_BxN.sum().clamp(min=1.0)


class TorchOPD:
    """Student, teacher and AdamW: ``step(batch)`` is one OPD update, ``generate`` samples."""

    def __init__(
        self,
        student: Any,
        teacher: Any,
        prompt_len: int,
        *,
        hyper: Hyper = Hyper(),
        chunk_size: int = 1024,
        remat: bool = False,
        compile: bool = False,
    ):
        self.student, self.teacher = student.train(), teacher.eval()
        # transformers' per-layer checkpointing, as opd_jax's remat (renamed in transformers 5.2x)
        prefix = "activation" if hasattr(student, "activation_checkpointing_enable") else "gradient"
        if remat:
            getattr(student, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
        else:
            getattr(student, f"{prefix}_checkpointing_disable")()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.prompt_len, self.hyper, self.chunk_size = prompt_len, hyper, chunk_size
        self.optimizer = make_optimizer(student, hyper)
        self.backbones = None
        if compile:
            self.backbones = (torch.compile(student.model), torch.compile(teacher.model))

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One update; returns the loss and the gradient norm before clipping (tensors)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = opd_loss(
            self.student, self.teacher, batch, self.prompt_len, self.chunk_size, self.backbones
        )
        loss.backward()
        params = [p for p in self.student.parameters() if p.grad is not None]
        if self.hyper.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.hyper.clip_norm, foreach=True)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
            )
        self.optimizer.step()
        return loss.detach(), norm

    def generate(self, prompts_BxP: torch.Tensor, new_tokens: int) -> dict[str, torch.Tensor]:
        """Temperature-1 samples of exactly ``new_tokens`` tokens (no EOS stop, no top-k/p)
        with transformers' ``generate``, as the batch ``step`` takes."""
        self.student.generation_config.eos_token_id = None
        tokens = self.student.generate(
            prompts_BxP,
            attention_mask=torch.ones_like(prompts_BxP),
            max_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
        )
        response = torch.zeros_like(tokens)
        response[:, prompts_BxP.shape[1] :] = 1
        return {
            "tokens": tokens,
            "attention_mask": torch.ones_like(tokens),
            "response_mask": response,
            "padded": False,
        }
