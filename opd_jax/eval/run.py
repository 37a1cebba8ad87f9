"""Evaluation runs: sample K answers per problem, score them, and write metrics and tables.

``evaluate(model, tokenizer, problems, ...)`` is the library entry point;
``evaluate_config(path, overrides)`` is ``opd-jax eval CONFIG [--set KEY=VALUE]``: every model
of the config on every benchmark, writing to ``out_dir``::

    results.json                      config and all metrics (avg@K, pass@1..K, stderrs)
    table.md, table.json              avg@K ± stderr: models x (benchmarks + average)
    samples/<model>__<benchmark>.jsonl  per problem: prompt, gold, responses, extracted, correct

Benchmarks are the built-in ``arithmetic`` task (through the TFDS builder of
:mod:`opd_jax.data`) or local ``.jsonl`` / ``.parquet`` files read here directly, so that
files with ``problem``/``solution`` fields (MATH-500, AIME, AMC, Minerva, OlympiadBench
exports) load as they are; see :func:`read_problem_file`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import time
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import models, sampling
from opd_jax.config import ConfigError, SamplingConfig, load_tree
from opd_jax.eval.answers import extract_answer, is_correct
from opd_jax.eval.metrics import summarize
from opd_jax.eval.tables import (
    atomic_write_text,
    benchmark_table,
    format_cell,
    to_markdown,
    write_table,
)
from opd_jax.models import DTYPES, encode_prompts, eos_ids, pad_id

ARITHMETIC = "arithmetic"
FILE_SUFFIXES = (".jsonl", ".parquet")
PROMPT_FIELDS = ("prompt", "problem", "question")  # the first present is the prompt
ANSWER_FIELDS = ("answer", "final_answer", "solution")  # the first present is the gold
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
Problem = dict[str, str]


@dataclasses.dataclass
class BenchmarkSpec:
    """One benchmark of an eval config (``benchmarks.<name>``)."""

    source: str = ARITHMETIC  # "arithmetic" or a local .jsonl/.parquet file
    split: str = "test"  # arithmetic split: train, test, test_long, test_unseen_op
    limit: int = 0  # the first `limit` problems; 0 = all
    template: str = "{prompt}"  # the prompt sent to the model; "{prompt}" is the problem text
    prompt_field: str = ""  # file field of the problem; "" = first of PROMPT_FIELDS
    answer_field: str = ""  # file field of the gold answer; "" = first of ANSWER_FIELDS
    arithmetic: dict[str, Any] = dataclasses.field(default_factory=dict)  # ArithmeticConfig


@dataclasses.dataclass
class EvalConfig:
    """``opd-jax eval`` settings; ``benchmarks`` holds :class:`BenchmarkSpec` after loading."""

    seed: int = 0  # the PRNG key of sampling (the same for every model: paired comparisons)
    out_dir: str = "runs/eval"
    data_dir: str = "runs/data"  # where TFDS builds of the arithmetic task are written
    dtype: str = "float32"  # float32 or bfloat16
    k: int = 4  # samples per problem (avg@k, pass@1..k)
    batch_size: int = 32  # sequences per sampling call (prompts are repeated k times)
    max_prompt_tokens: int = 256  # prompts are left-padded or cut (from the left) to this
    chat_template: bool = True
    system_prompt: str = ""
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    models: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> local checkpoint
    benchmarks: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> BenchmarkSpec


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(str(name)):
        raise ConfigError(f"{kind} name {name!r} must match [A-Za-z0-9_.-]+ (it names files).")


def benchmark_spec(name: str, raw: Any) -> BenchmarkSpec:
    """A :class:`BenchmarkSpec` from its YAML mapping (or a bare source string)."""
    raw = {"source": raw} if isinstance(raw, str) else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"benchmarks.{name} must be a mapping or a source, got {raw!r}.")
    hints = typing.get_type_hints(BenchmarkSpec)
    for key, value in raw.items():
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=1, cutoff=0.5)
            hint = f" Did you mean 'benchmarks.{name}.{near[0]}'?" if near else ""
            raise ConfigError(f"Unknown config key 'benchmarks.{name}.{key}'.{hint}")
        expected = typing.get_origin(hints[key]) or hints[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"benchmarks.{name}.{key} must be {expected.__name__}, got {value!r}."
            )
    spec = BenchmarkSpec(**raw)
    if spec.limit < 0:
        raise ConfigError(f"benchmarks.{name}.limit must be >= 0 (0 = all), got {spec.limit}.")
    if spec.source != ARITHMETIC and Path(spec.source).suffix not in FILE_SUFFIXES:
        raise ConfigError(
            f"benchmarks.{name}.source={spec.source!r} must be {ARITHMETIC!r} or a "
            f"{'/'.join(FILE_SUFFIXES)} file."
        )
    if spec.source != ARITHMETIC and spec.arithmetic:
        raise ConfigError(f"benchmarks.{name}.arithmetic applies only to source: {ARITHMETIC}.")
    return spec


def validate_eval_config(config: EvalConfig) -> EvalConfig:
    """Checks sizes, choices, names and paths; turns ``benchmarks`` into specs."""
    for key in ("k", "batch_size", "max_prompt_tokens"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(config, key)}.")
    if config.sampling.max_new_tokens < 1 or config.sampling.temperature < 0:
        raise ConfigError("need sampling.max_new_tokens >= 1 and sampling.temperature >= 0.")
    if config.sampling.top_k > 0 and config.sampling.top_p < 1.0:
        raise ConfigError("set sampling.top_k or sampling.top_p, not both.")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype={config.dtype!r} is not one of {list(DTYPES)}.")
    if not config.models or not config.benchmarks:
        raise ConfigError("an eval config needs `models` (name: path) and `benchmarks`.")
    for name, path in config.models.items():
        _check_name("model", name)
        if not isinstance(path, str) or not Path(path).exists():
            raise ConfigError(f"models.{name}: no local checkpoint at {path!r}.")
    specs = {}
    for name, raw in config.benchmarks.items():
        _check_name("benchmark", name)
        specs[name] = benchmark_spec(name, raw)
        if specs[name].source != ARITHMETIC and not Path(specs[name].source).is_file():
            raise ConfigError(f"benchmarks.{name}.source: no file at {specs[name].source}.")
    return dataclasses.replace(config, benchmarks=specs)


def load_eval_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """An :class:`EvalConfig` from YAML plus ``KEY=VALUE`` overrides, validated."""
    return validate_eval_config(load_tree(EvalConfig, path, overrides))


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, str | int | float) for v in value)
    ):
        return ", ".join(str(v) for v in value)
    return ""


def _field(row: Mapping[str, Any], chosen: str, candidates: Sequence[str], where: str) -> str:
    names = (chosen,) if chosen else candidates
    name = next((n for n in names if n in row), None)
    text = _text(row[name]) if name else ""
    if not text:
        raise ValueError(f"{where}: needs a non-empty string field, one of {list(names)}")
    return text


def _file_rows(path: Path) -> list[tuple[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: invalid JSON ({error})") from error
    return rows


def read_problem_file(
    path: str | os.PathLike, prompt_field: str = "", answer_field: str = ""
) -> list[Problem]:
    """``[{"prompt", "answer", "id"}]`` from a ``.jsonl`` or ``.parquet`` file.

    The prompt is the first of ``prompt``, ``problem``, ``question`` present in a record (or
    ``prompt_field``); the gold is the first of ``answer``, ``final_answer``, ``solution``
    (or ``answer_field``): a string, a number, or a list of them (joined by ``", "``). A
    worked ``solution`` is scored by its last ``\\boxed{...}``.
    """
    path = Path(path)
    problems = []
    for where, row in _file_rows(path):
        where = f"{path}, {where}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        problems.append(
            {
                "prompt": _field(row, prompt_field, PROMPT_FIELDS, where),
                "answer": _field(row, answer_field, ANSWER_FIELDS, where),
                "id": str(row.get("id", row.get("unique_id", f"{path.stem}-{len(problems)}"))),
            }
        )
    return problems


def _arithmetic_problems(spec: BenchmarkSpec, data_dir: str, limit: int) -> list[Problem]:
    from opd_jax.data import load_source  # TFDS: imported only when the task is used

    try:
        source = load_source(ARITHMETIC, spec.split, data_dir, **spec.arithmetic)
    except TypeError as error:  # an unknown ArithmeticConfig field
        raise ConfigError(f"arithmetic options {sorted(spec.arithmetic)}: {error}") from error
    count = len(source) if limit == 0 else min(limit, len(source))
    fields = ("prompt", "answer", "id")
    return [{f: bytes(source[i][f]).decode("utf-8") for f in fields} for i in range(count)]


def load_problems(spec: BenchmarkSpec, data_dir: str) -> list[Problem]:
    """The benchmark's first ``limit`` problems (all if 0), prompts put in ``template``."""
    if spec.source == ARITHMETIC:
        problems = _arithmetic_problems(spec, data_dir, spec.limit)
    else:
        problems = read_problem_file(spec.source, spec.prompt_field, spec.answer_field)
        problems = problems[: spec.limit or None]
    if not problems:
        raise ValueError(f"benchmark {spec.source!r} has no problems")
    return [{**p, "prompt": spec.template.replace("{prompt}", p["prompt"])} for p in problems]


def _encode(
    tokenizer: models.Tokenizer,
    prompts: Sequence[str],
    length: int,
    chat_template: bool,
    system_prompt: str,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_prompts`, its truncation warning naming the eval key."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_prompts(
            tokenizer, prompts, length, chat_template=chat_template, system_prompt=system_prompt
        )
    for warning in caught:
        message = str(warning.message).replace("data.max_prompt_tokens", "max_prompt_tokens")
        warnings.warn(message, warning.category, stacklevel=3)
    return encoded


def generate(
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
) -> list[str]:
    """One decoded response per prompt, in order. Batch ``b`` samples with key
    ``fold_in(key(seed), b)``; the last batch is padded to the same shape (one compile)."""
    batch_size = min(batch_size, len(prompts))
    key = jax.random.key(seed)
    eos, pad = eos_ids(tokenizer, model.config.eos_token_id), pad_id(tokenizer)
    texts: list[str] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start : start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        tokens_BxP, mask_BxP = _encode(
            tokenizer, padded, max_prompt_tokens, chat_template, system_prompt
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
        )
        response_BxN = np.asarray(result.tokens)[:, max_prompt_tokens:]
        keep_BxN = np.asarray(result.response_mask)[:, max_prompt_tokens:].astype(bool)
        for row, keep in list(zip(response_BxN, keep_BxN, strict=True))[: len(chunk)]:
            texts.append(tokenizer.decode(row[keep].tolist(), skip_special_tokens=True))
    return texts


def score(problem: Problem, responses: list[str]) -> dict[str, Any]:
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

    Each prompt is repeated ``k`` times and the ``P * k`` rows are sampled in batches of
    ``batch_size``; at ``temperature == 0`` (greedy) one response is sampled and repeated.
    The same ``seed`` (and ``batch_size``) gives the same responses.

    Returns ``{"metrics": summarize(correct [P, k]), "records": [score(...) per problem]}``
    (see :func:`opd_jax.eval.metrics.summarize` and :func:`score`).
    """
    if not problems or k < 1:
        raise ValueError(f"need problems and k >= 1, got {len(problems)} problems, k={k}")
    draws = 1 if temperature == 0 else k
    texts = generate(
        model,
        tokenizer,
        [p["prompt"] for p in problems for _ in range(draws)],
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


def _jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _write_results(out_dir: Path, config: EvalConfig, results: dict[str, Any]) -> None:
    report = {"config": dataclasses.asdict(config), "metric": f"avg@{config.k}", **results}
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")


def evaluate_config(
    config_path: str | os.PathLike, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """``opd-jax eval``: every model on every benchmark of the config; writes ``out_dir``
    (see the module doc), prints the avg@K table and returns ``{"results", "table"}`` with
    ``results[model][benchmark]`` the metrics of :func:`evaluate`."""
    config = load_eval_config(config_path, overrides)
    out_dir = Path(config.out_dir)
    problems = {name: load_problems(s, config.data_dir) for name, s in config.benchmarks.items()}
    metric = f"avg@{config.k}"
    results: dict[str, Any] = {"results": {}}
    for model_name, path in config.models.items():
        model, tokenizer = models.load(path, DTYPES[config.dtype])
        for bench, bench_problems in problems.items():
            start = time.perf_counter()
            out = evaluate(
                model,
                tokenizer,
                bench_problems,
                k=config.k,
                batch_size=config.batch_size,
                max_new_tokens=config.sampling.max_new_tokens,
                max_prompt_tokens=config.max_prompt_tokens,
                temperature=config.sampling.temperature,
                seed=config.seed,
                chat_template=config.chat_template,
                system_prompt=config.system_prompt,
                top_k=config.sampling.top_k,
                top_p=config.sampling.top_p,
            )
            samples = out_dir / "samples" / f"{model_name}__{bench}.jsonl"
            atomic_write_text(samples, _jsonl(out["records"]))
            results["results"].setdefault(model_name, {})[bench] = out["metrics"]
            _write_results(out_dir, config, results)
            print(
                f"{model_name} / {bench}: {metric} = {format_cell(out['metrics'][metric])} % "
                f"({len(bench_problems)} problems, {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        del model
    table = benchmark_table(
        {m: {b: r[metric] for b, r in row.items()} for m, row in results["results"].items()},
        list(config.benchmarks),
        metric=metric,
    )
    write_table(table, out_dir)
    print(to_markdown(table), end="", flush=True)
    return {"results": results["results"], "table": table}
