"""Benchmark problems: ``[{"prompt", "answer", "id"}]`` from the arithmetic task or a file.

The built-in ``arithmetic`` task comes through the TFDS builder of :mod:`opd_jax.data`; local
``.jsonl`` / ``.parquet`` files are read by :func:`opd_jax.data.prompts.read_records`, with
field names chosen so that MATH-500, AIME, AMC, Minerva and OlympiadBench exports load as they
are (see :func:`read_problem_file`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opd_jax.config import ConfigError
from opd_jax.data import load_source
from opd_jax.data.prompts import read_records
from opd_jax.errors import InputError
from opd_jax.eval.spec import ARITHMETIC, BenchmarkSpec

PROMPT_FIELDS = ("prompt", "problem", "question")  # the first present is the prompt
ANSWER_FIELDS = ("answer", "final_answer", "solution")  # the first present is the gold
Problem = dict[str, str]


def _text(value: Any) -> str:
    """A string, a number, or a non-empty list of them (joined by ``", "``) as text; else ``""``."""
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
    """The text of field ``chosen`` (if set) or of the first of ``candidates`` in ``row``."""
    names = (chosen,) if chosen else candidates
    name = next((n for n in names if n in row), None)
    text = _text(row[name]) if name else ""
    if not text:
        raise InputError(f"{where}: needs a non-empty string field, one of {list(names)}")
    return text


def read_problem_file(
    path: str | os.PathLike, prompt_field: str = "", answer_field: str = ""
) -> list[Problem]:
    """``[{"prompt", "answer", "id"}]`` from a ``.jsonl`` or ``.parquet`` file.

    The prompt is the first of ``prompt``, ``problem``, ``question`` present in a record (or
    ``prompt_field``); the gold is the first of ``answer``, ``final_answer``, ``solution``
    (or ``answer_field``): a string, a number, or a list of them (joined by ``", "``). A
    worked ``solution`` is scored by its last ``\\boxed{...}``. The id is the record's ``id``
    or ``unique_id``, else ``<file stem>-<index>``.

    Raises:
      ValueError: naming the file and line (or row) of the first record without them.
    """
    path = Path(path)
    problems = []
    for _, where, row in read_records(path):
        problems.append(
            {
                "prompt": _field(row, prompt_field, PROMPT_FIELDS, where),
                "answer": _field(row, answer_field, ANSWER_FIELDS, where),
                "id": str(row.get("id", row.get("unique_id", f"{path.stem}-{len(problems)}"))),
            }
        )
    return problems


def _arithmetic_problems(spec: BenchmarkSpec, data_dir: str) -> list[Problem]:
    try:
        source = load_source(ARITHMETIC, spec.split, data_dir, **spec.arithmetic)
    except TypeError as error:  # an unknown ArithmeticConfig field
        raise ConfigError(f"arithmetic options {sorted(spec.arithmetic)}: {error}") from error
    count = len(source) if spec.limit == 0 else min(spec.limit, len(source))
    fields = ("prompt", "answer", "id")
    return [{f: bytes(source[i][f]).decode("utf-8") for f in fields} for i in range(count)]


def load_problems(spec: BenchmarkSpec, data_dir: str) -> list[Problem]:
    """The benchmark's first ``limit`` problems (all if 0), prompts put in ``template``."""
    if spec.source == ARITHMETIC:
        problems = _arithmetic_problems(spec, data_dir)
    else:
        problems = read_problem_file(spec.source, spec.prompt_field, spec.answer_field)
        problems = problems[: spec.limit or None]
    if not problems:
        raise InputError(f"benchmark {spec.source!r} has no problems")
    return [{**p, "prompt": spec.template.replace("{prompt}", p["prompt"])} for p in problems]
