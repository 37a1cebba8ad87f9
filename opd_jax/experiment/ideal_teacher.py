"""The arithmetic task's ideal teacher: the generator's own next-token distribution.

A prompt fixes its chain, and the generator (:mod:`opd_jax.data.arithmetic`,
:mod:`opd_jax.data.recap`) then draws a reference response: the chain's steps and the answer
(determined), ``recap`` sentences of distinct kinds in random order, wording and free operands,
and EOS, tokenised as supervised fine-tuning tokenises its targets (the solution without
special tokens, then EOS; the chat template touches only the prompt). ``p*(v | y_<t)`` is that
distribution over token sequences conditioned on the response's first ``t`` tokens: what any
calibrated teacher would predict. Where the prefix is no reference's (a wrong step, text
tokenised otherwise than canonically, a token past EOS) ``p*`` is undefined: NaN.

It is computed sentence by sentence, never over whole responses: the response is a
concatenation of blocks, the head (the computation, and the answer unless ``answer_last``),
each recap sentence with its leading space, and the tail (`` The answer is N.`` with
``answer_last``) with EOS. The byte-level pre-tokenizer cuts before ``" X"``, so no token spans
two blocks and a response's tokens are its blocks' tokens in order; :class:`IdealTeacher`
checks this of each chain and refuses a tokenizer that merges across a sentence boundary.
While reading the response it keeps every way the generator may be writing it: (block tokens,
tokens matched, recap kinds used, probability); a finished block branches into every possible
next one (:func:`opd_jax.data.recap.next_sentences`).

``p*`` has zeros, so before the core's margins and advantage read it, it is mixed with a small
uniform error (:func:`smoothed`, :func:`ideal_token_stats`). Where ``p*`` is one token's and
that token is among the student's candidates, the ``gap`` is then ``log(1 + (1 - eps) V /
eps)``, a convention; :func:`compare_by_sentence` also splits the tokens into those where
``p*`` is one token's (determined) and the others (open), which does not depend on it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from opd_jax import core
from opd_jax.data.arithmetic import _APPLY, ArithmeticConfig, _example
from opd_jax.data.recap import Step, next_sentences
from opd_jax.models import Tokenizer

_OPERATION = re.compile(r" (Add|Subtract|Multiply by|Divide by) (\d+)\.")
_OPS = {"Add": "add", "Subtract": "subtract", "Multiply by": "multiply", "Divide by": "divide"}
_SENTINEL = "\x00"  # stands for the recap when the reference is laid out


def parse_chain(prompt: str) -> tuple[int, list[Step]] | None:
    """A task prompt's ``(start, [(op, before, operand, after), ...])``; None if ``prompt``
    is not one that :mod:`opd_jax.data.arithmetic` writes."""
    found = re.match(r"Start with (\d+)\.", prompt)
    if found is None:
        return None
    start = value = int(found.group(1))
    steps = []
    for verb, number in _OPERATION.findall(prompt):
        op, operand = _OPS[verb], int(number)
        if op == "divide" and operand == 0:
            return None
        steps.append((op, value, operand, _APPLY[op](value, operand)))
        value = steps[-1][3]
    if not steps or _example(start, steps, "")["prompt"] != prompt:
        return None
    return start, steps


class IdealScores(NamedTuple):
    """``p*`` of the generator on one or more responses. Leading dims ``[..., T]``; NaN
    where ``p*`` is undefined (off the generator's support, or off the response)."""

    topk_logp: np.ndarray  # [..., T, K] log p*(v) on the given ids (-inf where p*(v) = 0)
    token_logp: np.ndarray  # [..., T] log p*(y_t) of the response's own token
    entropy: np.ndarray  # [..., T] entropy of p*(. | y_<t) over the vocabulary, nats

    @property
    def covered(self) -> np.ndarray:
        """``[..., T]`` bool: the prefix ``y_<t`` is on the generator's support."""
        return ~np.isnan(self.token_logp)


class _Path(NamedTuple):
    """One way the generator may be writing the response."""

    block: tuple[int, ...]  # token ids of the block being written
    pos: int  # its tokens already matched
    slot: int  # 0 the head, 1..recap the recap sentences, recap + 1 the tail and EOS
    used: tuple[str, ...]  # recap kinds written so far, this block's included
    weight: float  # probability of the path's blocks


class IdealTeacher:
    """``p*`` of one chain (module doc) under ``task``'s recap settings and ``tokenizer``."""

    def __init__(self, start: int, steps: list[Step], task: ArithmeticConfig, tokenizer: Tokenizer):
        self.start, self.steps, self.task, self.tokenizer = start, steps, task, tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the ideal teacher needs a tokenizer with an EOS token")
        recap = [_SENTINEL] if task.recap else []
        layout = _example(start, steps, "", recap, task.answer_last)["solution"]
        head, tail = layout.split(_SENTINEL) if task.recap else (layout, "")
        if task.recap and not head.endswith(" "):
            raise ValueError(f"expected a space before the recap in {layout!r}")
        self._head = self._encode([head.removesuffix(" ")])[0]
        self._tail = self._encode([tail])[0] + (tokenizer.eos_token_id,)
        self._blocks: dict[str, tuple[int, ...]] = {}  # recap sentence -> its block's tokens
        self._check_blocks(head, tail)

    def _encode(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [tuple(row) for row in ids]

    def _next(self, used: tuple[str, ...]) -> list[tuple[str, tuple[int, ...], str, float]]:
        """``(sentence, block tokens, kind, probability)`` of every recap sentence that can
        follow the kinds ``used``."""
        options = next_sentences(self.start, self.steps, self.task.recap_kinds, used)
        missing = [text for text, _, _ in options if text not in self._blocks]
        for text, ids in zip(missing, self._encode([" " + t for t in missing]), strict=True):
            self._blocks[text] = ids
        return [(text, self._blocks[text], kind, p) for text, kind, p in options]

    def _check_blocks(self, head: str, tail: str) -> None:
        """Raises unless a reference's tokens are its blocks' tokens in order (checked on the
        first sentence of each recap slot)."""
        text, blocks, used = head.removesuffix(" "), [self._head], ()
        for _ in range(self.task.recap):
            sentence, block, kind, _ = self._next(used)[0]
            text, used = f"{text} {sentence}", used + (kind,)
            blocks.append(block)
        whole = self._encode([text + tail])[0] + (self.tokenizer.eos_token_id,)
        if whole != sum(blocks, ()) + self._tail:
            raise ValueError(
                "the tokenizer merges text across a sentence boundary of the task's responses; "
                "the ideal teacher needs a pre-tokenizer that cuts before ' X' (byte-level BPE)"
            )

    def _children(self, slot: int, used: tuple[str, ...], weight: float) -> list[_Path]:
        """The paths that start block ``slot`` after the kinds ``used``."""
        if slot == 0:
            return [_Path(self._head, 0, 0, (), weight)]
        if slot <= self.task.recap:
            return [
                _Path(block, 0, slot, used + (kind,), weight * p)
                for _, block, kind, p in self._next(used)
            ]
        return [_Path(self._tail, 0, slot, used, weight)] if slot == self.task.recap + 1 else []

    def _advance(self, paths: list[_Path], token: int) -> list[_Path]:
        kept = []
        for path in paths:
            if path.block[path.pos] != token:
                continue
            if path.pos + 1 < len(path.block):
                kept.append(path._replace(pos=path.pos + 1))
            else:
                kept += self._children(path.slot + 1, path.used, path.weight)
        return kept

    def score(self, response: Sequence[int], topk_ids: np.ndarray) -> IdealScores:
        """``p*`` along ``response`` (token ids ``[T]``, EOS included) on ``topk_ids [T, K]``
        (e.g. the student's top-K at each position) and on the response's own tokens."""
        topk_ids = np.asarray(topk_ids)
        length = len(response)
        topk_logp = np.full(topk_ids.shape, np.nan)
        token_logp, entropy = np.full(length, np.nan), np.full(length, np.nan)
        paths = self._children(0, (), 1.0)
        for t, token in enumerate(int(y) for y in response):
            if not paths:
                break
            mass: dict[int, float] = defaultdict(float)
            for path in paths:
                mass[path.block[path.pos]] += path.weight
            total = sum(mass.values())
            p = np.asarray([mass.get(int(v), 0.0) for v in topk_ids[t]]) / total
            with np.errstate(divide="ignore"):
                topk_logp[t] = np.log(p)
            token_logp[t] = math.log(mass[token] / total) if token in mass else -np.inf
            entropy[t] = sum(-m / total * math.log(m / total) for m in mass.values())
            paths = self._advance(paths, token)
        return IdealScores(topk_logp, token_logp, entropy)


def score_rollouts(
    prompts: Sequence[str],
    tokens: np.ndarray,
    response_mask: np.ndarray,
    topk_ids: np.ndarray,
    task: ArithmeticConfig,
    tokenizer: Tokenizer,
) -> IdealScores:
    """:meth:`IdealTeacher.score` of each row: ``prompts [B]`` (one per row), the response
    ``tokens, response_mask [B, T]`` and ``topk_ids [B, T, K]``. A row whose prompt is not the
    task's is NaN throughout."""
    topk_logp = np.full(topk_ids.shape, np.nan)
    token_logp, entropy = np.full(tokens.shape, np.nan), np.full(tokens.shape, np.nan)
    teachers: dict[str, IdealTeacher | None] = {}
    for b, prompt in enumerate(prompts):
        if prompt not in teachers:
            chain = parse_chain(prompt)
            teachers[prompt] = None if chain is None else IdealTeacher(*chain, task, tokenizer)
        keep = np.asarray(response_mask[b]).astype(bool)
        if teachers[prompt] is not None:
            row = teachers[prompt].score(tokens[b][keep], topk_ids[b][keep])
            topk_logp[b, keep], token_logp[b, keep], entropy[b, keep] = row
    return IdealScores(topk_logp, token_logp, entropy)


def smoothed(logp: np.ndarray, epsilon: float, vocab: int) -> np.ndarray:
    """``log((1 - epsilon) p + epsilon / vocab)``: ``p*`` mixed with a uniform error, so that
    margins and advantages are finite. NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        return np.logaddexp(math.log1p(-epsilon) + logp, math.log(epsilon / vocab))


def ideal_token_stats(
    scores: IdealScores, student: core.TokenStats, epsilon: float, vocab: int
) -> core.TokenStats:
    """The :class:`~opd_jax.core.TokenStats` of the student against the ideal teacher, with
    ``p*`` smoothed (:func:`smoothed`) in the teacher's place, ``[B, T, K]``: the core's
    margins (:func:`~opd_jax.core.margin_from_stats`) and advantage
    (:func:`~opd_jax.core.sampled_advantage`) apply as they are, NaN off the support. The
    teacher's own top-K is not computed: its fields are the student's ids with NaN log-probs."""
    student = core.TokenStats(*jax.tree.map(np.asarray, tuple(student)))
    nan = np.full(student.student_topk_logp.shape, np.nan, np.float32)
    return student._replace(
        teacher_logp=smoothed(scores.token_logp, epsilon, vocab).astype(np.float32),
        teacher_at_student_topk=smoothed(scores.topk_logp, epsilon, vocab).astype(np.float32),
        teacher_topk_ids=student.student_topk_ids,
        teacher_topk_logp=nan,
        student_at_teacher_topk=nan,
    )


def _sentence_sums(
    values: np.ndarray, seg: np.ndarray, keep: np.ndarray, num_segments: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``values [B, T]`` and counts of the tokens ``keep`` in each row's sentences
    ``seg [B, T]`` below ``num_segments``, ``[B, S]`` each."""
    keep = np.asarray(keep, bool) & (seg >= 0) & (seg < num_segments)
    row = np.broadcast_to(np.arange(seg.shape[0])[:, None], seg.shape)
    sums = np.zeros((seg.shape[0], num_segments))
    counts = np.zeros_like(sums)
    np.add.at(sums, (row[keep], seg[keep]), np.asarray(values, np.float64)[keep])
    np.add.at(counts, (row[keep], seg[keep]), 1.0)
    return sums, counts


def sentence_profile(
    values: np.ndarray, seg: np.ndarray, keep: np.ndarray, num_segments: int
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy :func:`~opd_jax.core.segment_profile` over the tokens ``keep [B, T]``: each row's
    mean of ``values [B, T]`` in each sentence ``seg [B, T]``, averaged over the rows with a
    kept token there. Returns ``means [S]`` (NaN where no row has one) and ``rows [S]``."""
    sums, counts = _sentence_sums(values, seg, keep, num_segments)
    rows = (counts > 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, 0.0).sum(0) / rows
    return means, rows.astype(np.float64)


# The per-sentence means of :func:`compare_by_sentence`: name -> (quantity, tokens it is
# averaged over). covered: p* is defined; determined: p* is one token's; open: covered, not
# determined. The trained teacher on determined tokens is free of the data's entropy.
SERIES = {
    "ideal_margin": ("ideal_margin", "covered"),
    "teacher_margin_covered": ("teacher_margin", "covered"),
    "ideal_advantage": ("ideal_advantage", "covered"),
    "teacher_advantage_covered": ("teacher_advantage", "covered"),
    "ideal_entropy": ("ideal_entropy", "covered"),
    "teacher_margin_determined": ("teacher_margin", "determined"),
    "teacher_margin_open": ("teacher_margin", "open"),
    "ideal_margin_open": ("ideal_margin", "open"),
}
TOKENS = ("response", "covered", "determined")  # counted by sentence: <name>_tokens_by_sentence


def compare_by_sentence(
    ideal: core.TokenStats,
    teacher: core.TokenStats,
    scores: IdealScores,
    seg: np.ndarray,
    response_mask: np.ndarray,
    num_segments: int,
    margin: dict,
) -> dict[str, list[float]]:
    """One batch's ideal and trained teacher side by side, by sentence index ``[S]``.

    ``ideal`` (:func:`ideal_token_stats`) and ``teacher`` hold the same rollouts' ``[B, T]``
    statistics; ``margin`` the keyword arguments of :func:`~opd_jax.core.margin_from_stats`.
    Returns, for each name of :data:`SERIES`, ``<name>_by_sentence`` (over the rows with such
    tokens at an index, the mean of each row's mean over them: :func:`sentence_profile`) and
    ``<name>_rows_by_sentence``; for each of :data:`TOKENS`, ``<name>_tokens_by_sentence``.
    """
    response = np.asarray(response_mask).astype(bool)
    covered = scores.covered & response
    determined = covered & (scores.entropy == 0)
    keep = {"covered": covered, "determined": determined, "open": covered & ~determined}
    values = {
        "ideal_margin": core.margin_from_stats(ideal, **margin),
        "teacher_margin": core.margin_from_stats(teacher, **margin),
        "ideal_advantage": core.sampled_advantage(ideal),
        "teacher_advantage": core.sampled_advantage(teacher),
        "ideal_entropy": scores.entropy,
    }
    record = {}
    for name, (quantity, tokens) in SERIES.items():
        means, rows = sentence_profile(
            np.asarray(values[quantity]), seg, keep[tokens], num_segments
        )
        record[f"{name}_by_sentence"] = means.tolist()
        record[f"{name}_rows_by_sentence"] = rows.tolist()
    for name, tokens in zip(TOKENS, (response, covered, determined), strict=True):
        _, counts = _sentence_sums(np.ones(seg.shape), seg, tokens, num_segments)
        record[f"{name}_tokens_by_sentence"] = counts.sum(0).tolist()
    return record


def summarise_comparison(records: list[dict]) -> dict[str, list[float] | float]:
    """Batches of :func:`compare_by_sentence` pooled: each series' means weighted by its
    rows, its rows summed; ``coverage_by_sentence`` (covered over response tokens),
    ``determined_by_sentence`` (determined over covered tokens) and ``coverage`` (over the
    response tokens of every sentence index counted)."""
    summary: dict[str, list[float] | float] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in SERIES:
            rows = np.asarray([r[f"{name}_rows_by_sentence"] for r in records], np.float64)
            values = np.asarray([r[f"{name}_by_sentence"] for r in records], np.float64)
            pooled = np.where(rows > 0, values * rows, 0.0).sum(0) / rows.sum(0)
            summary[f"{name}_by_sentence"] = pooled.tolist()
            summary[f"{name}_rows_by_sentence"] = rows.sum(0).tolist()
        response, covered, determined = (
            np.sum([r[f"{name}_tokens_by_sentence"] for r in records], 0) for name in TOKENS
        )
        summary["coverage_by_sentence"] = (covered / response).tolist()
        summary["determined_by_sentence"] = (determined / covered).tolist()
        summary["coverage"] = float(covered.sum() / response.sum())
    return summary
