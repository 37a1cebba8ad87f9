"""The experiment's evaluation of one model, per problem and per sample, on every split.

For each split of ``experiment.eval_splits`` (every problem unless ``eval_problems`` caps them)
the model samples ``eval_k`` responses per problem at ``eval_temperature``, and each sample is
scored three ways:

- ``correct``: the first "The answer is N." sentence states the gold (:func:`graded_correct`;
  a response without one is wrong);
- ``steps``: the fraction of the reference chain's steps stated exactly, each in its place
  (:func:`opd_jax.data.step_accuracy`);
- on the first (in-domain) split, against the teacher: the per-token reverse KL
  ``KL(p_S || p_T)`` over the vocabulary on the model's own sample
  (:func:`opd_jax.eval.token_reverse_kl`), averaged over the whole response (``kl``), over the
  solution: the chain and its answer sentence (``kl_solution``), and over the recap: after the
  answer, or with ``answer_last`` between the chain and the answer (``kl_recap``, NaN without
  one).

``eval.json`` keeps every ``[P, k]`` array, so the report can pair any two models problem by
problem, and under ``settings`` what else it depends on (:func:`eval_settings`): an
``eval.json`` made with other settings (an earlier config, a cut-short trial run) is made again
rather than mixed into the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax import data, models, sampling
from opd_jax.config import Config
from opd_jax.eval import sample_prompts, token_reverse_kl
from opd_jax.files import atomic_write_text

EVAL_BATCH = 256  # sequences per sampling call
_ANSWER_SENTENCE = re.compile(r"The answer is [^.]*\.")
_GRADED = re.compile(r"The answer is (-?\d+)\.")


def graded_correct(response: str, gold: str) -> bool:
    """Whether the task's graded answer, the first "The answer is N." sentence of
    ``response``, states the integer ``gold``. A response without one is wrong: no fallback to
    its last number, which with ``answer_last`` (the recap before the answer) could be a
    recap's."""
    match = _GRADED.search(response)
    return match is not None and int(match.group(1)) == int(gold)


def task_problems(config: Config, split: str, limit: int = 0) -> list[dict[str, str]]:
    """The first ``limit`` problems of an arithmetic split (all when 0): ``prompt``,
    ``answer``, ``solution``, ``id``."""
    c = config.data
    source = data.load_source(c.source, split, c.data_dir, **c.arithmetic)
    count = len(source) if limit == 0 else min(limit, len(source))
    fields = ("prompt", "answer", "solution", "id")
    return [{f: bytes(source[i][f]).decode("utf-8") for f in fields} for i in range(count)]


def _kl_parts(
    kl_BxN: np.ndarray,
    tokens_BxN: np.ndarray,
    mask_BxN: np.ndarray,
    tokenizer: models.Tokenizer,
    answer_last: bool = False,
) -> dict[str, np.ndarray]:
    """Per sample: the mean KL over the response, its solution and its recap ``[B]``; a token
    belongs to the part its text starts in (:func:`opd_jax.data.arithmetic.solution_ranges`)."""
    whole, solution, recap = [], [], []
    for kl_N, row, keep in zip(kl_BxN, tokens_BxN, mask_BxN.astype(bool), strict=True):
        kl_L = kl_N[keep]
        text, spans = models.decode_with_offsets(tokenizer, row[keep].tolist())
        ranges = data.arithmetic.solution_ranges(text, answer_last, _ANSWER_SENTENCE)
        in_solution = np.array([any(a <= s < b for a, b in ranges) for s, _ in spans], bool)
        whole.append(kl_L.mean() if kl_L.size else np.nan)
        solution.append(kl_L[in_solution].mean() if in_solution.any() else np.nan)
        recap.append(kl_L[~in_solution].mean() if (~in_solution).any() else np.nan)
    return {"kl": np.array(whole), "kl_solution": np.array(solution), "kl_recap": np.array(recap)}


def evaluate_problems(
    model: models.Decoder,
    teacher: models.Decoder | None,
    tokenizer: models.Tokenizer,
    config: Config,
    problems: list[dict[str, str]],
    *,
    k: int,
    temperature: float,
) -> dict[str, Any]:
    """``[P, k]`` arrays of ``k`` samples per problem at ``temperature``: ``correct``,
    ``steps`` and, with a teacher, the three KLs; and an example response."""
    P = config.data.max_prompt_tokens
    samples = sample_prompts(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        n=k,
        batch_size=min(EVAL_BATCH, len(problems) * k),
        max_new_tokens=config.experiment.eval_max_new_tokens,
        max_prompt_tokens=P,
        method=sampling.method_from(temperature),
        seed=config.seed,
        chat_template=config.data.chat_template,
        system_prompt=config.data.system_prompt,
    )
    gold = [p for p in problems for _ in range(k)]
    shape = (len(problems), k)
    result: dict[str, Any] = {
        "correct": np.array(
            [graded_correct(t, p["answer"]) for t, p in zip(samples.texts, gold, strict=True)]
        ).reshape(shape),
        "steps": np.array(
            [data.step_accuracy(t, p["solution"]) for t, p in zip(samples.texts, gold, strict=True)]
        ).reshape(shape),
    }
    if teacher is not None:
        kl_BxN = np.asarray(
            token_reverse_kl(
                model,
                teacher,
                samples.tokens,
                samples.attention_mask,
                P,
                chunk_size=config.score.chunk_size,
            )
        )
        answer_last = bool(config.data.arithmetic.get("answer_last", False))
        parts = _kl_parts(
            kl_BxN, samples.tokens[:, P:], samples.response_mask[:, P:], tokenizer, answer_last
        )
        result |= {name: values.reshape(shape) for name, values in parts.items()}
    result = {name: values.tolist() for name, values in result.items()}
    result["example"] = {"prompt": problems[0]["prompt"], "response": samples.texts[0]}
    return result


def eval_settings(config: Config, with_teacher: bool) -> dict[str, Any]:
    """What an evaluation depends on besides the model, as ``eval.json`` records it."""
    e, d = config.experiment, config.data
    return {
        "splits": list(e.eval_splits),
        "problems": e.eval_problems,
        "k": e.eval_k,
        "temperature": e.eval_temperature,
        "max_new_tokens": e.eval_max_new_tokens,
        "max_prompt_tokens": d.max_prompt_tokens,
        "chat_template": d.chat_template,
        "system_prompt": d.system_prompt,
        "seed": config.seed,
        "kl": with_teacher,
    }


def stored_evaluation(path: Path, config: Config, with_teacher: bool) -> dict[str, Any] | None:
    """The evaluation in ``path`` when it was made with this config's settings, else None
    (absent, or made otherwise: said on stdout). A file from before ``settings`` were recorded
    counts when every split has this config's ``[P, k]`` shape."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    wanted = eval_settings(config, with_teacher)
    if "settings" in stored:
        current = stored["settings"] == wanted
    else:
        e = config.experiment
        shapes = {
            s: (len(task_problems(config, s, e.eval_problems)), e.eval_k) for s in e.eval_splits
        }
        current = all(np.shape(stored.get(s, {}).get("correct")) == shapes[s] for s in shapes)
    if not current:
        print(f"{path} was made with other evaluation settings: evaluating again", flush=True)
        return None
    return stored


def evaluate_model(
    model: models.Decoder,
    teacher: models.Decoder | None,
    tokenizer: models.Tokenizer,
    config: Config,
    out: Path,
) -> dict[str, Any]:
    """Every eval split (the KL on the first, in-domain one, when a teacher is given); writes
    ``out`` (``eval.json``, with its ``settings``) and returns its content. Skipped when
    ``out`` holds an evaluation made with the same settings (:func:`stored_evaluation`)."""
    stored = stored_evaluation(out, config, teacher is not None)
    if stored is not None:
        return stored
    e = config.experiment
    result = {}
    for index, split in enumerate(e.eval_splits):
        result[split] = evaluate_problems(
            model,
            teacher if index == 0 else None,
            tokenizer,
            config,
            task_problems(config, split, e.eval_problems),
            k=e.eval_k,
            temperature=e.eval_temperature,
        )
    result["settings"] = eval_settings(config, teacher is not None)
    atomic_write_text(out, json.dumps(result) + "\n")
    return result
