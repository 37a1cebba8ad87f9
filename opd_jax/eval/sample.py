"""Sampling and scoring: ``k`` responses per problem, their extracted answers and avg@k/pass@k.

``evaluate(model, tokenizer, problems, ...)`` is the library entry point; :func:`generate`
decodes one response per prompt in fixed-shape batches (one compile per shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import models, sampling
from opd_jax.eval.accuracy import summarize
from opd_jax.eval.answers import extract_answer, is_correct
from opd_jax.models import encode_prompts, eos_ids, pad_id


class Samples(NamedTuple):
    """Sampled sequences, one row per prompt: prompt columns ``[0, P)``, response after."""

    tokens: np.ndarray  # [n, P + N] int32
    attention_mask: np.ndarray  # [n, P + N] 1 on real prompt and response tokens
    response_mask: np.ndarray  # [n, P + N] 1 on response tokens (EOS included)
    texts: list[str]  # the decoded responses (special tokens skipped)


def sample_prompts(
    model: models.Decoder,
    tokenizer: models.Tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    max_prompt_tokens: int,
    method: sampling.SamplingMethod,
    seed: int,
    chat_template: bool = True,
    system_prompt: str = "",
    n: int = 1,
) -> Samples:
    """``n`` samples per prompt (sharing its prefill), in order: rows ``i n .. i n + n - 1``
    are prompt ``i``'s. A call samples ``batch_size // n`` prompts (at least one); call ``b``
    uses key ``fold_in(key(seed), b)``; the last is padded to the same shape (one compile)."""
    batch_size = min(max(batch_size // n, 1), len(prompts))
    key = jax.random.key(seed)
    eos, pad = eos_ids(tokenizer, model.config.eos_token_id), pad_id(tokenizer)
    parts: list[tuple[np.ndarray, ...]] = []
    texts: list[str] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start : start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        tokens_BxP, mask_BxP = encode_prompts(
            tokenizer,
            padded,
            max_prompt_tokens,
            chat_template=chat_template,
            system_prompt=system_prompt,
            length_key="max_prompt_tokens",
        )
        result = sampling.sample(
            model,
            jnp.asarray(tokens_BxP),
            jnp.asarray(mask_BxP),
            key=jax.random.fold_in(key, b),
            max_new_tokens=max_new_tokens,
            method=method,
            eos_ids=eos,
            pad_id=pad,
            n=n,
        )
        tokens, response, prompt = (
            np.asarray(x)[: len(chunk) * n]
            for x in (result.tokens, result.response_mask, result.prompt_mask)
        )
        parts.append((tokens, response | prompt, response))
        for row, keep in zip(tokens, response.astype(bool), strict=True):
            texts.append(tokenizer.decode(row[keep].tolist(), skip_special_tokens=True))
    tokens, attention, response = (np.concatenate(x) for x in zip(*parts, strict=True))
    return Samples(tokens, attention, response, texts)


def generate(
    model: models.Decoder,
    tokenizer: models.Tokenizer,
    prompts: Sequence[str],
    **options: Any,
) -> list[str]:
    """The decoded responses (``n`` per prompt), in order; ``options`` as in
    :func:`sample_prompts`."""
    return sample_prompts(model, tokenizer, prompts, **options).texts


def score(problem: dict[str, str], responses: list[str]) -> dict[str, Any]:
    """The per-problem record: prompt, gold, responses, extracted answers, correct flags."""
    record = {"id": problem["id"]} if "id" in problem else {}
    return record | {
        "prompt": problem["prompt"],
        "gold": problem["answer"],
        "responses": responses,
        "extracted": [extract_answer(r) for r in responses],
        "correct": [is_correct(r, problem["answer"]) for r in responses],
    }


def evaluate(
    model: models.Decoder,
    tokenizer: models.Tokenizer,
    problems: list[dict[str, str]],
    *,
    k: int,
    batch_size: int,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float,
    seed: int,
    chat_template: bool = True,
    system_prompt: str = "",
    top_k: int = 0,
    top_p: float = 1.0,
) -> dict[str, Any]:
    """Samples ``k`` responses per problem (``{"prompt", "answer"}``) and scores them.

    A prompt's ``k`` samples share its prefill, ``batch_size`` rows per sampling call; at
    ``temperature == 0`` (greedy) one response is sampled and repeated. The same ``seed``
    (and ``batch_size``) gives the same responses.

    Returns ``{"metrics": summarize(correct [P, k]), "records": [score(...) per problem]}``
    (see :func:`opd_jax.eval.accuracy.summarize` and :func:`score`).
    """
    if not problems or k < 1:
        raise ValueError(f"need problems and k >= 1, got {len(problems)} problems, k={k}")
    draws = 1 if temperature == 0 else k
    texts = generate(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        n=draws,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        method=sampling.method_from(temperature, top_k, top_p),
        seed=seed,
        chat_template=chat_template,
        system_prompt=system_prompt,
    )
    records = [
        score(p, texts[i * draws : (i + 1) * draws] * (k // draws)) for i, p in enumerate(problems)
    ]
    correct_PxK = np.array([r["correct"] for r in records], dtype=bool)
    return {"metrics": summarize(correct_PxK), "records": records}
