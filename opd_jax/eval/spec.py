"""The ``opd-jax eval`` config: :class:`EvalConfig` and its :class:`BenchmarkSpec` per benchmark.

Loaded by :func:`opd_jax.config.load_tree` (unknown keys, wrong types and values out of their
declared range fail naming the key, ``benchmarks.<name>.<key>`` included), then checked across
fields by :func:`validate_eval_config`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from opd_jax.config import (
    ConfigError,
    NonEmpty,
    NonNegative,
    Positive,
    SamplingConfig,
    check_sampling,
    load_tree,
    note,
)
from opd_jax.data.prompts import PROMPT_SUFFIXES
from opd_jax.models import DTYPES

ARITHMETIC = "arithmetic"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclasses.dataclass
class BenchmarkSpec:
    """One benchmark of an eval config (``benchmarks.<name>``; a bare string is its source)."""

    source: str = ARITHMETIC  # "arithmetic" or a local .jsonl/.parquet file
    split: str = "test"  # arithmetic split: train, test, test_long, test_unseen_op
    limit: Annotated[NonNegative, note("0 = all")] = 0  # the first `limit` problems
    template: str = "{prompt}"  # the prompt sent to the model; "{prompt}" is the problem text
    prompt_field: str = ""  # file field of the problem; "" = first of prompt, problem, question
    answer_field: str = ""  # file field of the gold; "" = first of answer, final_answer, solution
    arithmetic: dict[str, Any] = dataclasses.field(default_factory=dict)  # ArithmeticConfig


@dataclasses.dataclass
class EvalConfig:
    """``opd-jax eval`` settings: every model of ``models`` on every benchmark of ``benchmarks``."""

    seed: int = 0  # the PRNG key of sampling (the same for every model: paired comparisons)
    out_dir: NonEmpty = "runs/eval"
    data_dir: str = "runs/data"  # where TFDS builds of the arithmetic task are written
    dtype: str = "float32"  # float32 or bfloat16
    k: Positive = 4  # samples per problem (avg@k, pass@1..k)
    batch_size: Positive = 32  # sequences per sampling call (k per prompt, sharing its prefill)
    max_prompt_tokens: Positive = 256  # prompts are left-padded or cut (from the left) to this
    chat_template: bool = True
    system_prompt: str = ""
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    models: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> local checkpoint
    benchmarks: dict[str, BenchmarkSpec] = dataclasses.field(default_factory=dict)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(str(name)):
        raise ConfigError(f"{kind} name {name!r} must match [A-Za-z0-9_.-]+ (it names files).")


def _check_benchmark(name: str, spec: BenchmarkSpec) -> None:
    _check_name("benchmark", name)
    if spec.source == ARITHMETIC:
        return
    if Path(spec.source).suffix not in PROMPT_SUFFIXES:
        raise ConfigError(
            f"benchmarks.{name}.source={spec.source!r} must be {ARITHMETIC!r} or a "
            f"{'/'.join(PROMPT_SUFFIXES)} file."
        )
    if spec.arithmetic:
        raise ConfigError(f"benchmarks.{name}.arithmetic applies only to source: {ARITHMETIC}.")
    if not Path(spec.source).is_file():
        raise ConfigError(f"benchmarks.{name}.source: no file at {spec.source}.")


def validate_eval_config(config: EvalConfig) -> EvalConfig:
    """``config`` once its sizes, choices, names and paths are checked (else ConfigError)."""
    check_sampling(config.sampling)
    if config.sampling.n != 1:
        raise ConfigError(
            f"sampling.n={config.sampling.n} does not apply to evaluation: set k, the samples "
            "per problem (they share the prompt's prefill)."
        )
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype={config.dtype!r} is not one of {list(DTYPES)}.")
    if not config.models or not config.benchmarks:
        raise ConfigError("an eval config needs `models` (name: path) and `benchmarks`.")
    for name, path in config.models.items():
        _check_name("model", name)
        if not isinstance(path, str) or not Path(path).exists():
            raise ConfigError(f"models.{name}: no local checkpoint at {path!r}.")
    for name, spec in config.benchmarks.items():
        _check_benchmark(name, spec)
    return config


def load_eval_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """An :class:`EvalConfig` from YAML plus ``KEY=VALUE`` overrides, validated."""
    return validate_eval_config(load_tree(EvalConfig, path, overrides))
