"""Synthetic multi-step arithmetic: a TFDS builder generated locally from a seed.

Each example is a chain of integer operations applied to a start value::

    prompt   "Start with 12. Add 30. Multiply by 2. Subtract 5. What is the result?"
    solution "12 + 30 = 42. 42 * 2 = 84. 84 - 5 = 79. The answer is 79."
    answer   "79"
    num_steps 3
    id       "train-00000"

The solution has one sentence per operation plus the closing "The answer is N." sentence, so
NLTK Punkt splits it into ``num_steps + 1`` sentences: each sentence is one reasoning step, the
unit the release rule scores.

With ``recap > 0`` the solution goes on after the answer with ``recap`` sentences drawn
without replacement from the first ``recap_kinds`` kinds of :mod:`opd_jax.data.recap` (four by
default, twelve in all), in random order, each in a random wording::

    "... The answer is 79. Check: 79 = 61 + 18. We began with 12. That took 3 steps."

With ``answer_last`` the recap comes before the answer, which closes the solution::

    "... 84 - 5 = 79. Check: 79 = 61 + 18. We began with 12. That took 3 steps. The answer is 79."

The recap is where local teachability collapse can occur by construction: its first words and
the free operand of the check admit several equally good continuations, so a teacher that
learned the task does not prefer one of the student's candidates over another there, while
every token of the computation before it is fixed by the prefix. The determined parts of the
recap (the check's second operand, the largest value) are harder than the chain's steps, for
the teacher too. The answer is read from "The answer is N.": by default it precedes the recap,
so nothing written after it changes the grade; with ``answer_last`` it follows the recap, so a
rule that stops supervising late sentences can cost accuracy.

Every value along the chain lies in ``[0, max_value]`` (subtraction never goes negative,
multiplication never overflows ``max_value``, division is exact), which keeps the numbers
within reach of a 135M-parameter model.

Splits:
- ``train``, ``test``: in-domain, ``min_steps..max_steps`` operations drawn from add, subtract
  and multiply; ``test`` holds no prompt that is in ``train``.
- ``test_long``: out of domain by length, ``long_min_steps..long_max_steps`` operations.
- ``test_unseen_op``: out of domain by operation, in-domain lengths, every chain has at least
  one exact integer division ("Divide by N."), an operation never seen in ``train``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from opd_jax.data import oracle
from opd_jax.data.recap import FIRST_RELEASE_KINDS, KINDS, recap_sentences

IN_DOMAIN_OPS = ("add", "subtract", "multiply")
UNSEEN_OP = "divide"
SPLITS = ("train", "test", "test_long", "test_unseen_op")

_PROMPT_VERB = {
    "add": "Add {}.",
    "subtract": "Subtract {}.",
    "multiply": "Multiply by {}.",
    "divide": "Divide by {}.",
}
_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
_APPLY = {
    "add": operator.add,
    "subtract": operator.sub,
    "multiply": operator.mul,
    "divide": operator.floordiv,
}
# Split -> (index mixed into the seed, operations, step-range field names).
_SPLIT_SPEC = {
    "train": (0, IN_DOMAIN_OPS, ("min_steps", "max_steps")),
    "test": (1, IN_DOMAIN_OPS, ("min_steps", "max_steps")),
    "test_long": (2, IN_DOMAIN_OPS, ("long_min_steps", "long_max_steps")),
    "test_unseen_op": (3, IN_DOMAIN_OPS + (UNSEEN_OP,), ("min_steps", "max_steps")),
}
_MAX_TRIES_PER_EXAMPLE = 100
# Fields added after the first release enter a config's name only when set, so the configs
# of earlier builds keep their names (and build directories).
_LATER_FIELDS = ("recap_kinds", "answer_last")


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(tfds.core.BuilderConfig):
    """Sizes, lengths and number ranges of the arithmetic task (defaults build in seconds).

    Attributes:
      seed: the seed every split derives from.
      train_size, test_size, test_long_size, test_unseen_op_size: examples per split.
      min_steps, max_steps: operations per chain in ``train``, ``test``, ``test_unseen_op``.
      long_min_steps, long_max_steps: operations per chain in ``test_long``; must exceed
        ``max_steps`` so the split is out of domain.
      max_start: start values are drawn from ``1..max_start``.
      max_addend: add/subtract operands are drawn from ``1..max_addend``.
      max_factor: multiply/divide operands are drawn from ``2..max_factor``.
      max_value: every intermediate value stays in ``0..max_value``.
      recap: sentences of free-form recap, 0 to ``recap_kinds`` (see the module doc).
      recap_kinds: the recap draws its distinct kinds from the first ``recap_kinds`` of
        :data:`opd_jax.data.recap.KINDS`, 1 to 12; the default 4 draws as the first release did.
      answer_last: the recap precedes "The answer is N.", which ends the solution.
    """

    seed: int = 0
    train_size: int = 2000
    test_size: int = 200
    test_long_size: int = 200
    test_unseen_op_size: int = 200
    min_steps: int = 2
    max_steps: int = 4
    long_min_steps: int = 6
    long_max_steps: int = 8
    max_start: int = 50
    max_addend: int = 50
    max_factor: int = 9
    max_value: int = 999
    recap: int = 0
    recap_kinds: int = FIRST_RELEASE_KINDS
    answer_last: bool = False

    def __post_init__(self) -> None:
        if min(self.split_sizes().values()) < 0:
            raise ValueError(f"split sizes must be >= 0, got {self.split_sizes()}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"
            )
        if not self.max_steps < self.long_min_steps <= self.long_max_steps:
            raise ValueError(
                "need max_steps < long_min_steps <= long_max_steps, got "
                f"{self.max_steps}, {self.long_min_steps}, {self.long_max_steps}"
            )
        if not (
            1 <= self.max_start <= self.max_value and self.max_addend >= 1 and 2 <= self.max_factor
        ):
            raise ValueError("need 1 <= max_start <= max_value, max_addend >= 1, max_factor >= 2")
        if not 1 <= self.recap_kinds <= len(KINDS):
            raise ValueError(f"need 1 <= recap_kinds <= {len(KINDS)}, got {self.recap_kinds}")
        if not 0 <= self.recap <= self.recap_kinds:
            raise ValueError(
                f"recap={self.recap} sentences need as many distinct kinds, but recap_kinds="
                f"{self.recap_kinds}: need 0 <= recap <= recap_kinds <= {len(KINDS)}"
            )

    def split_sizes(self) -> dict[str, int]:
        """Examples per split, ``{split: size}``."""
        return {
            "train": self.train_size,
            "test": self.test_size,
            "test_long": self.test_long_size,
            "test_unseen_op": self.test_unseen_op_size,
        }

    def task_fields(self) -> dict[str, int | bool]:
        """The fields that determine the generated data (not the TFDS name/version)."""
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base
        }


def arithmetic_config(**fields: int | bool) -> ArithmeticConfig:
    """An :class:`ArithmeticConfig` named by its fields: ``default`` or ``custom-<hash>``.

    Configs with equal fields share a name, hence a build directory; different fields never do.
    """
    config = ArithmeticConfig(name="default", **fields)
    default = ArithmeticConfig(name="default").task_fields()
    if config.task_fields() != default:
        named = {
            f: v
            for f, v in config.task_fields().items()
            if f not in _LATER_FIELDS or v != default[f]
        }
        digest = hashlib.sha256(json.dumps(named, sort_keys=True).encode())
        config.name = f"custom-{digest.hexdigest()[:12]}"
    return config


def _feasible_operands(op: str, value: int, config: ArithmeticConfig) -> range | list[int]:
    """Operands of ``op`` that keep ``value op operand`` an integer in ``0..max_value``."""
    if op == "add":
        return range(1, min(config.max_addend, config.max_value - value) + 1)
    if op == "subtract":
        return range(1, min(config.max_addend, value) + 1)
    if op == "multiply":
        return range(2, min(config.max_factor, config.max_value // max(value, 1)) + 1)
    return [k for k in range(2, config.max_factor + 1) if value % k == 0]


def _chain(
    rng: np.random.Generator, num_steps: int, ops: tuple[str, ...], config: ArithmeticConfig
) -> tuple[int, list[tuple[str, int, int, int]]]:
    """A start value and ``num_steps`` ``(op, before, operand, after)`` operations."""
    start = value = int(rng.integers(1, config.max_start + 1))
    steps = []
    for _ in range(num_steps):
        choices = {op: _feasible_operands(op, value, config) for op in ops}
        feasible = [op for op in ops if len(choices[op])]
        op = feasible[int(rng.integers(len(feasible)))]
        operand = int(choices[op][int(rng.integers(len(choices[op])))])
        steps.append((op, value, operand, _APPLY[op](value, operand)))
        value = steps[-1][3]
    return start, steps


def _example(
    start: int,
    steps: list[tuple[str, int, int, int]],
    example_id: str,
    recap: Sequence[str] = (),
    answer_last: bool = False,
) -> dict:
    prompt = " ".join(
        [f"Start with {start}."]
        + [_PROMPT_VERB[op].format(k) for op, _, k, _ in steps]
        + ["What is the result?"]
    )
    answer = steps[-1][3]
    chain = [f"{a} {_SYMBOL[op]} {k} = {b}." for op, a, k, b in steps]
    graded = [f"The answer is {answer}."]
    parts = chain + list(recap) + graded if answer_last else chain + graded + list(recap)
    solution = " ".join(parts)
    return {
        "prompt": prompt,
        "answer": str(answer),
        "solution": solution,
        "num_steps": len(steps),
        "id": example_id,
    }


def _generate(config: ArithmeticConfig, split: str, exclude: set[str]) -> list[dict]:
    split_index, ops, (lo_field, hi_field) = _SPLIT_SPEC[split]
    lo, hi = getattr(config, lo_field), getattr(config, hi_field)
    rng = np.random.default_rng([config.seed, split_index])
    size = config.split_sizes()[split]
    examples: list[dict] = []
    seen = set(exclude)
    for _ in range(size * _MAX_TRIES_PER_EXAMPLE):
        if len(examples) == size:
            return examples
        start, steps = _chain(rng, int(rng.integers(lo, hi + 1)), ops, config)
        if split == "test_unseen_op" and all(op != UNSEEN_OP for op, *_ in steps):
            continue
        free = ()
        if config.recap:
            free = recap_sentences(rng, config.recap, start, steps, config.recap_kinds)
        example = _example(start, steps, f"{split}-{len(examples):05d}", free, config.answer_last)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            examples.append(example)
    if len(examples) < size:
        raise ValueError(
            f"cannot draw {size} distinct {split!r} problems from {config}: "
            "raise the number ranges or lower the split size"
        )
    return examples


_STEP = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)\.")


def solution_steps(text: str) -> list[tuple[int, str, int, int]]:
    """The ``a op k = b.`` sentences of a solution, in order, as ``(a, op, k, b)``."""
    return [(int(a), op, int(k), int(b)) for a, op, k, b in _STEP.findall(text)]


def step_accuracy(response: str, solution: str) -> float:
    """The fraction of the reference ``solution``'s steps that ``response`` states exactly,
    each at its own place in the chain (the i-th step of the response against the i-th of
    the reference: the right operand, operation and result). Steps after the last reference
    step are not counted; a reference without steps scores 1."""
    reference, stated = solution_steps(solution), solution_steps(response)
    if not reference:
        return 1.0
    right = sum(want == got for want, got in zip(reference, stated, strict=False))
    return right / len(reference)


def solution_ranges(
    text: str, answer_last: bool = False, pattern: str | re.Pattern[str] = oracle.ANSWER_PATTERN
) -> list[tuple[int, int]]:
    """The character ranges ``[start, end)`` of a response's solution: its computation and its
    first answer sentence (a match of ``pattern``); the rest of ``text`` is its recap.

    By default the solution is everything up to the end of the answer sentence. With
    ``answer_last`` the text between the last ``a op k = b.`` step before the answer and the
    whitespace before the answer is recap too. Without an answer sentence: all of ``text``.
    """
    span = oracle.answer_span(text, pattern)
    if span is None:
        return [(0, len(text))]
    answer_start, answer_end = span
    if not answer_last:
        return [(0, answer_end)]
    steps_end = max((m.end() for m in _STEP.finditer(text, 0, answer_start)), default=None)
    gap_end = len(text[:answer_start].rstrip())
    if steps_end is None or steps_end >= gap_end:
        return [(0, answer_end)]
    return [(0, steps_end), (gap_end, answer_end)]


def generate_split(config: ArithmeticConfig, split: str) -> list[dict]:
    """The examples of ``split``, a pure function of ``config`` (no I/O).

    Returns a list of ``{"prompt": str, "answer": str, "solution": str, "num_steps": int,
    "id": str}``; prompts are distinct within the split and ``test`` excludes ``train``'s.
    """
    if split not in _SPLIT_SPEC:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    exclude = set()
    if split == "test":
        exclude = {e["prompt"] for e in _generate(config, "train", set())}
    return _generate(config, split, exclude)


class Arithmetic(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the synthetic arithmetic task; see the module docstring."""

    name = "opd_arithmetic"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [arithmetic_config()]
    # No download checksums to find; TFDS's lookup of them also needs `importlib_resources`,
    # which it does not declare on Python >= 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "solution": tfds.features.Text(),
                    "num_steps": tfds.features.Scalar(dtype=np.int32),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("prompt", "answer"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Generated locally.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        for example in generate_split(self.builder_config, split):
            yield example["id"], example


def arithmetic_builder(data_dir: str | os.PathLike, **fields: int) -> Arithmetic:
    """The :class:`Arithmetic` builder for ``fields`` (see :class:`ArithmeticConfig`).

    Builds land in ``data_dir/opd_arithmetic/<config name>/<version>``.
    """
    config = arithmetic_config(**fields)
    # TFDS refuses a custom config named like a registered one, so pass the default by name.
    return Arithmetic(data_dir=data_dir, config="default" if config.name == "default" else config)
