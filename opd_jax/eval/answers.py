"""Final-answer extraction and mathematical equivalence (math-verify, with a string fallback).

``extract_answer`` reads the answer a response commits to, in order of precedence:

1. the content of the last non-empty, brace-balanced ``\\boxed{...}`` (or ``\\fbox{...}``);
2. else the last "The answer is X" / "answer: X" / "#### X" (X up to the end of its sentence);
3. else the last number in the text (``-3``, ``1,000``, ``0.5``, ``1/2``).

``is_correct`` compares the extracted answers with math-verify (``parse`` + ``verify``: equal
numbers, fractions, decimals and simple LaTeX such as ``\\frac{1}{2} = 0.5 = 1/2``), or, if
math-verify raises, by their normalised strings. Malformed input never raises: it is wrong.

math-verify's timeouts use ``signal.alarm``, which works only in the main thread (elsewhere
it raises ``ValueError``): timeouts are on in the main thread and off in any other thread.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

TIMEOUT_SECONDS = 5  # per parse / comparison, main thread only (signal.alarm)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER = re.compile(
    r"(?:answer\s*(?:is\s*:?|:)|####)[ \t]*(?P<answer>[^\n]*?)[ \t]*(?:\.(?:\s|$)|\n|$)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\d+\s*/\s*\d+|-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d*\.?\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-"})
_WRAPPERS = ("$", "\\(", "\\)", "\\[", "\\]", "**", "*")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |~")


def _braced(text: str, open_index: int) -> str | None:
    """The text between ``text[open_index] == "{"`` and its matching ``}``; None if unclosed."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    contents = (_braced(text, m.end() - 1) for m in _BOX.finditer(text))
    boxed = [c.strip() for c in contents if c is not None and c.strip()]
    return boxed[-1] if boxed else None


def _strip_wrappers(answer: str) -> str:
    """Drops surrounding ``$``, ``\\(...\\)``, bold markers and a trailing period."""
    previous = None
    while answer != previous:
        previous = answer
        answer = answer.strip().rstrip(".").strip()
        for wrapper in _WRAPPERS:
            answer = answer.removeprefix(wrapper).removesuffix(wrapper)
    return answer


def _last_stated(text: str) -> str | None:
    stated = [_strip_wrappers(m.group("answer")) for m in _ANSWER.finditer(text)]
    stated = [s for s in stated if s]
    if not stated:
        return None
    boxed = _last_boxed(stated[-1])
    return boxed if boxed is not None else stated[-1]


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text.translate(_UNICODE_MINUS))
    return re.sub(r"\s+", "", numbers[-1]) if numbers else None


def extract_answer(text: str) -> str | None:
    """The final answer a response states (see the module doc for the precedence), or None."""
    if not isinstance(text, str) or not text.strip():
        return None
    for find in (_last_boxed, _last_stated, _last_number):
        answer = find(text)
        if answer:
            return answer
    return None


def gold_answer(gold: str) -> str | None:
    """The reference answer: a boxed or stated answer inside a worked solution, else the
    whole (stripped) string, so ``"(3, \\frac{\\pi}{2})"`` is kept as one answer."""
    if not isinstance(gold, str) or not gold.strip():
        return None
    return _last_boxed(gold) or _last_stated(gold) or _strip_wrappers(gold) or None


def normalize(answer: str) -> str:
    """A canonical string for the fallback comparison: no spaces, ``$``, ``\\left``/``\\right``
    or thin spaces; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; unicode minus -> ``-``; no
    thousands separators; ``\\text{X}`` -> ``X``; trailing zeros of decimals dropped."""
    answer = _strip_wrappers(answer.translate(_UNICODE_MINUS))
    answer = _LATEX_NOISE.sub("", answer)
    answer = re.sub(r"\\[dt]frac", r"\\frac", answer)
    answer = re.sub(r"\\(?:text|mathrm|mathbf)\{([^{}]*)\}", r"\1", answer)
    answer = _THOUSANDS.sub("", answer)
    answer = re.sub(r"\s+", "", answer)
    answer = re.sub(r"^(-?\d+)\.(\d*?)0+$", r"\1.\2", answer).removesuffix(".")
    return answer


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _math_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence of two extracted answers (each parsed as ``\\boxed{...}``)."""
    timeout = _timeout()
    wrap = lambda s: "\\boxed{" + normalize(s) + "}"  # noqa: E731
    gold_parsed = parse(wrap(gold), parsing_timeout=timeout, raise_on_error=True)
    answer_parsed = parse(wrap(answer), parsing_timeout=timeout, raise_on_error=True)
    if not gold_parsed or not answer_parsed:
        return False
    return verify(gold_parsed, answer_parsed, timeout_seconds=timeout, raise_on_error=True)


def is_correct(response: str, gold: str) -> bool:
    """Whether the answer extracted from ``response`` equals the gold answer.

    Equal normalised strings count as correct; otherwise math-verify decides, and if it
    raises (parse error, timeout) the answers are unequal. Unbalanced braces are wrong.
    """
    answer, reference = extract_answer(response), gold_answer(gold)
    if answer is None or reference is None:
        return False
    if normalize(answer) == normalize(reference):
        return True
    if not _balanced(answer):
        return False
    try:
        return bool(_math_equal(reference, answer))
    except (Exception, TimeoutException):  # sympy errors and timeouts: not equal.
        return False
