"""The oracle cut: where the graded answer of a decoded response ends, in characters.

An oracle rule supervises a rollout up to the end of its answer sentence and no further. This
module finds that position in the text; mapping it to a token index is the rule's business
(token spans come from :func:`opd_jax.models.decode_with_offsets`)::

    answer_end("12 + 30 = 42. The answer is 42. We began with 12.")  # -> 31
    answer_end("12 + 30 = 42. The answer is 4.2.")                   # -> None (not an integer)

The default pattern is the arithmetic task's answer sentence, "The answer is N." with ``N`` an
integer (``-`` allowed) and the period ending the sentence; any other task passes its own.
"""

from __future__ import annotations

import re

ANSWER_PATTERN = r"The answer is -?\d+\.(?=\s|$)"


def answer_span(
    text: str, pattern: str | re.Pattern[str] = ANSWER_PATTERN
) -> tuple[int, int] | None:
    """``(start, end)`` character offsets of the first match of ``pattern`` (by default the
    first well-formed "The answer is N." sentence) in ``text``; None without one."""
    match = re.search(pattern, text)
    return match.span() if match else None


def answer_end(text: str, pattern: str | re.Pattern[str] = ANSWER_PATTERN) -> int | None:
    """The character offset just after the first answer sentence of ``text`` (the first match
    of ``pattern``), so ``text[:answer_end(text)]`` ends with it; None without one."""
    span = answer_span(text, pattern)
    return span[1] if span else None
