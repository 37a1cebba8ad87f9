"""The arithmetic task's recap: free-form sentences that state true facts about a chain.

A recap sentence has a kind, the fact it states, and one of several wordings drawn at random::

    start     "We began with 12."                   count     "That took 3 steps."
    peak      "The largest value was 84."           check     "Check: 79 = 61 + 18."
    least     "The smallest value was 12."          step      "After step 2 we had 84."
    first_op  "The first operation was an addition."
    last_op   "The last operation was a subtraction."
    adds      "The number of additions was 1."      mults     "Multiplications used: 1."
    operands  "The operands summed to 37."          parity    "The result is odd."

Free choices: the kind and wording of each sentence, the check's first operand (``low`` or the
``extra`` above the answer) and the step that ``step`` reports. A recap draws ``count``
distinct kinds, in random order, from the first ``kinds`` of :data:`KINDS`. The first
:data:`FIRST_RELEASE_KINDS` are the task's original ones, whose draws are unchanged: the same
random stream gives the same sentences as the first release.

No sentence contains the word "answer" or an ``a op k = b.`` equation, so neither the grader
(:mod:`opd_jax.eval.answers`) nor the step checker reads a recap.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence

import numpy as np

Step = tuple[str, int, int, int]  # (op, before, operand, after)

# Kind -> its wordings; "{}" fields are filled by _sentence. The order of kinds is fixed:
# configs draw from a prefix of it.
WORDINGS: dict[str, tuple[str, ...]] = {
    "start": ("We began with {start}.", "We started from {start}.", "The start was {start}."),
    "count": (
        "That took {count} steps.",
        "We used {count} operations.",
        "There were {count} steps.",
    ),
    "peak": ("The largest value was {peak}.", "The peak was {peak}.", "At most we had {peak}."),
    "check": ("Check: {answer} = {low} + {rest}.", "Check: {answer} = {high} - {extra}."),
    "least": (
        "The smallest value was {least}.",
        "The lowest value was {least}.",
        "We never went below {least}.",
    ),
    "step": ("After step {k} we had {value}.", "Step {k} gave {value}.", "Step {k} left {value}."),
    "first_op": (
        "The first operation was {first_op}.",
        "We opened with {first_op}.",
        "The first step was {first_op}.",
    ),
    "last_op": (
        "The last operation was {last_op}.",
        "We finished with {last_op}.",
        "The final step was {last_op}.",
    ),
    "adds": (
        "The number of additions was {adds}.",
        "Additions used: {adds}.",
        "Steps that added: {adds}.",
    ),
    "mults": (
        "The number of multiplications was {mults}.",
        "Multiplications used: {mults}.",
        "Steps that multiplied: {mults}.",
    ),
    "operands": (
        "The operands summed to {operands}.",
        "The operands add up to {operands}.",
        "All operands together make {operands}.",
    ),
    "parity": (
        "The result is {parity}.",
        "The final value is {parity}.",
        "We ended on an {parity} number.",
    ),
}
KINDS = tuple(WORDINGS)
FIRST_RELEASE_KINDS = 4  # start, count, peak, check
NOUNS = {
    "add": "an addition",
    "subtract": "a subtraction",
    "multiply": "a multiplication",
    "divide": "a division",
}
MAX_EXTRA = 20  # the check "answer = high - extra" draws extra from 1..MAX_EXTRA


def _values(start: int, steps: list[Step]) -> list[int]:
    """The values along a chain: the start, then each step's result."""
    return [start] + [after for *_, after in steps]


def _fields(start: int, steps: list[Step], low: int, extra: int) -> dict[str, int | str]:
    """The facts of a chain that the wordings name, with the check's free operands."""
    values = _values(start, steps)
    answer = values[-1]
    return {
        "start": start,
        "count": len(steps),
        "peak": max(values),
        "answer": answer,
        "low": low,
        "rest": answer - low,
        "high": answer + extra,
        "extra": extra,
        "least": min(values),
        "first_op": NOUNS[steps[0][0]],
        "last_op": NOUNS[steps[-1][0]],
        "adds": sum(op == "add" for op, *_ in steps),
        "mults": sum(op == "multiply" for op, *_ in steps),
        "operands": sum(operand for _, _, operand, _ in steps),
        "parity": "odd" if answer % 2 else "even",
    }


def _sentence(rng: np.random.Generator, kind: str, start: int, steps: list[Step]) -> str:
    """One sentence of ``kind`` in a random wording (draws: check operands, wording, step)."""
    values = _values(start, steps)
    low = int(rng.integers(0, values[-1] + 1))
    extra = int(rng.integers(1, MAX_EXTRA + 1))
    fields = _fields(start, steps, low, extra)
    wordings = WORDINGS[kind]
    wording = wordings[int(rng.integers(len(wordings)))]
    if kind == "step":  # drawn last and only here, so the first release's kinds draw as before
        k = int(rng.integers(1, len(steps) + 1))
        fields |= {"k": k, "value": values[k]}
    return wording.format(**fields)


def recap_sentences(
    rng: np.random.Generator,
    count: int,
    start: int,
    steps: list[Step],
    kinds: int = FIRST_RELEASE_KINDS,
) -> list[str]:
    """``count`` sentences of distinct kinds drawn from ``KINDS[:kinds]``, in random order."""
    drawn = rng.permutation(list(KINDS[:kinds]))[:count]
    return [_sentence(rng, str(kind), start, steps) for kind in drawn]


def sentence_distribution(kind: str, start: int, steps: list[Step]) -> dict[str, float]:
    """Every sentence of ``kind`` that :func:`_sentence` can draw for a chain, with its
    probability (equal sentences merged; the values sum to 1).

    Mirrors the draws: the wording is uniform; of the free operands only those the wording
    names matter, each uniform: the check's ``low`` in ``0..answer`` ("low + rest") or
    ``extra`` in ``1..MAX_EXTRA`` ("high - extra"), the step ``k`` in ``1..len(steps)``.
    """
    values = _values(start, steps)
    wordings = WORDINGS[kind]
    sentences: dict[str, float] = {}
    for wording in wordings:
        names = {name for _, name, _, _ in string.Formatter().parse(wording) if name}
        lows = range(values[-1] + 1) if names & {"low", "rest"} else [0]
        extras = range(1, MAX_EXTRA + 1) if names & {"high", "extra"} else [1]
        ks = range(1, len(steps) + 1) if names & {"k", "value"} else [0]
        p = 1.0 / (len(wordings) * len(lows) * len(extras) * len(ks))
        for low, extra, k in itertools.product(lows, extras, ks):
            text = wording.format(**_fields(start, steps, low, extra), k=k, value=values[k])
            sentences[text] = sentences.get(text, 0.0) + p
    return sentences


def next_sentences(
    start: int, steps: list[Step], kinds: int = FIRST_RELEASE_KINDS, used: Sequence[str] = ()
) -> list[tuple[str, str, float]]:
    """Every sentence that can follow recap sentences of the kinds ``used``, as ``(sentence,
    kind, probability)``; the probabilities sum to 1 (an empty list once every kind is used).

    The kinds are the first ones of a uniform permutation of ``KINDS[:kinds]``, so the next
    kind is uniform over those not yet used; its sentence is drawn as
    :func:`sentence_distribution` says.
    """
    left = [kind for kind in KINDS[:kinds] if kind not in used]
    return [
        (text, kind, p / len(left))
        for kind in left
        for text, p in sentence_distribution(kind, start, steps).items()
    ]
