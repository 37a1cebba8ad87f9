"""Release-aware sampling: the teacher scores rows while they are sampled, and a row stops
once its release cut is certain (``sampling.stop_at_release``; docs/method.md §3a).

At every look of :func:`~opd_jax.sampling.generate.sample` (each ``compact_every`` tokens)
:class:`ReleaseWatch` runs the teacher over the columns sampled since the last look, one
chunked forward with its own KV cache, and forms the margin there from the student's top-K
candidates that decoding recorded. On the host it splits the responses so far into sentences,
takes the margin's mean over each complete one (every sentence but a live row's last) and asks
:func:`~opd_jax.core.online_cut` whether the cut is certain. Rows that are certain stop like
rows that sampled an EOS.

Once the rollouts are back, :func:`final_cuts` gives every row its kept response tokens: the
online cut where a row stopped, else the offline rule on all its sentences, both on the margins
scored here (the update then needs no rule of its own: it trains on what is kept).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import core
from opd_jax.core.stats import TokenStats, margin_from_stats
from opd_jax.models.decoder import Decoder, KVCache
from opd_jax.models.tokenizer import OffsetDecoder, Tokenizer
from opd_jax.sampling.generate import _State
from opd_jax.text_segments import token_sentences

MARGIN_OPTIONS = ("margin_kind", "margin_k", "renormalize")


def split_release_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The release rule's options as ``(margin options, change point options)``, defaults
    filled in (:func:`opd_jax.core.rule_options`)."""
    full = core.rule_options("release") | dict(options)
    margin = {k: v for k, v in full.items() if k in MARGIN_OPTIONS}
    return margin, {k: v for k, v in full.items() if k not in MARGIN_OPTIONS}


@functools.partial(jax.jit, static_argnames=("graphdef", "size", "n"))
def _teacher_prefill(graphdef, params, tokens_BxP, mask_BxP, *, size: int, n: int):
    """The teacher's cache over the prompts (``size`` slots), repeated ``n`` times like the
    sampler's, and its last hidden state (it predicts the first response token)."""
    teacher: Decoder = nnx.merge(graphdef, params)
    cache = KVCache.init(teacher.config, tokens_BxP.shape[0], size)
    h_BxPxD, cache = teacher.hidden_cached(tokens_BxP, cache, attention_mask=mask_BxP)
    repeat = lambda x, axis: jnp.repeat(x, n, axis=axis)  # noqa: E731
    cache = KVCache(
        k=repeat(cache.k, 1), v=repeat(cache.v, 1), mask=repeat(cache.mask, 0), index=cache.index
    )
    return cache, repeat(h_BxPxD[:, -1], 0)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "width", "kind", "k", "renormalize", "scores"),
    donate_argnums=(2,),
)
def _teacher_margins(
    graphdef, params, cache, last_RxD, s: _State, start, *, width, kind, k, renormalize, scores
):
    """The teacher over columns ``[start, start + width)`` of the sampler's rows: the margin
    ``[R, width]`` there (0 off the response), the cache after them, the last hidden and, with
    ``scores``, the :class:`~opd_jax.core.TeacherScores` there (else None)."""
    teacher: Decoder = nnx.merge(graphdef, params)
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)  # noqa: E731
    tokens_RxC, response_RxC = cut(s.tokens_RxS), cut(s.response_RxS)
    h_RxCxD, cache = teacher.hidden_cached(tokens_RxC, cache, attention_mask=response_RxC)
    before_RxCxD = jnp.concatenate([last_RxD[:, None], h_RxCxD[:, :-1]], axis=1)  # predicts
    z_RxCxV = teacher.logits(before_RxCxD)
    lse_RxCx1 = jax.nn.logsumexp(z_RxCxV, axis=-1, keepdims=True)
    ids_RxCxK = cut(s.topk_ids_RxSxK)
    q_at = lambda ids: jnp.take_along_axis(z_RxCxV, ids, axis=-1) - lse_RxCx1  # noqa: E731
    zeros = jnp.zeros_like(ids_RxCxK, jnp.float32)
    stats = TokenStats(
        tokens=tokens_RxC,
        student_logp=zeros[..., 0],  # no margin kind reads these four
        teacher_logp=q_at(tokens_RxC[..., None])[..., 0],
        student_topk_ids=ids_RxCxK,
        student_topk_logp=cut(s.topk_logp_RxSxK),
        teacher_at_student_topk=q_at(ids_RxCxK),
        teacher_topk_ids=ids_RxCxK,
        teacher_topk_logp=zeros,
        student_at_teacher_topk=zeros,
    )
    margin_RxC = margin_from_stats(stats, kind, k=k, renormalize=renormalize)
    kept = core.teacher_scores_from_logits(ids_RxCxK, z_RxCxV, tokens_RxC) if scores else None
    return jnp.where(response_RxC > 0, margin_RxC, 0.0), cache, h_RxCxD[:, -1], kept


@functools.partial(jax.jit, static_argnames=("options",))
def _online(means_RxN, complete_R, options: tuple):
    return core.online_cut(means_RxN, complete_R, **dict(options))


def segment_means_host(
    margin_RxN: np.ndarray, seg_RxN: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Host: the margin's mean over each segment, ``[R, width]``, and each row's segment
    count ``[R]`` (1 + its largest id; ids >= ``width`` ignored)."""
    rows, n = margin_RxN.shape
    valid = (seg_RxN >= 0) & (seg_RxN < width)
    r_idx = np.broadcast_to(np.arange(rows)[:, None], (rows, n))[valid]
    sums = np.zeros((rows, width), np.float64)
    counts = np.zeros((rows, width), np.float64)
    np.add.at(sums, (r_idx, seg_RxN[valid]), margin_RxN[valid])
    np.add.at(counts, (r_idx, seg_RxN[valid]), 1.0)
    means = np.where(counts > 0, sums / np.maximum(counts, 1.0), 0.0).astype(np.float32)
    segments = np.where(valid, seg_RxN + 1, 0).max(axis=-1, initial=0).astype(np.int32)
    return means, segments


def first_token_of(seg_RxN: np.ndarray, tau_R: np.ndarray, length_R: np.ndarray) -> np.ndarray:
    """Each row's first response index in segment ``tau`` (its length where there is none)."""
    hit = seg_RxN == tau_R[:, None]
    return np.where(hit.any(-1), hit.argmax(-1), length_R).astype(np.int32)


class ReleaseWatch:
    """A :class:`~opd_jax.sampling.generate.Watcher` that stops rows at a certain cut.

    Args:
      teacher: the teacher (on the sampler's mesh).
      tokenizer: decodes responses for sentence splitting.
      max_new_tokens: the sampler's ``N``.
      segments: ``(kind, tokens)`` of the ``segments`` section.
      rule_options: the release rule's options (margin and change point).
      confirm, min_gain: :func:`~opd_jax.core.online_cut`'s.
      k: the student's candidates recorded (the margin reads its first ``margin_k``).
      keep_scores: also keep :class:`~opd_jax.core.TeacherScores` of every sampled token.

    After :func:`sample`, ``margin [R0, N]`` holds every sampled token's margin, ``stopped``
    ``[R0]`` the rows it stopped, ``tau [R0]`` their cut (sentences kept), ``seen [R0]`` the
    complete sentences at that look and ``scored_tokens`` the tokens the teacher scored;
    with ``keep_scores``, ``scores`` holds the teacher's scores ``[R0, N(, k)]`` by field.
    """

    def __init__(
        self,
        teacher: Decoder,
        tokenizer: Tokenizer,
        *,
        max_new_tokens: int,
        segments: tuple[str, int],
        rule_options: Mapping[str, Any],
        confirm: int = 0,
        min_gain: float = 8.0,
        k: int | None = None,
        keep_scores: bool = False,
    ) -> None:
        self.graphdef, self.params = nnx.split(teacher)
        self.tokenizer, self.N, self.segments = tokenizer, max_new_tokens, segments
        self.margin_options, changepoint = split_release_options(rule_options)
        self.k = int(self.margin_options["margin_k"]) if k is None else k
        self.keep_scores = keep_scores
        self.online = tuple(
            sorted((changepoint | dict(confirm=confirm, min_gain=min_gain)).items())
        )

    def start(self, tokens_BxP: jax.Array, mask_BxP: jax.Array, n: int) -> None:
        B, P = tokens_BxP.shape
        self.cache, self.last = _teacher_prefill(
            self.graphdef, self.params, tokens_BxP, mask_BxP, size=P + self.N, n=n
        )
        self.rows = np.arange(B * n)
        self.column = P
        self.margin = np.zeros((B * n, self.N), np.float32)
        self.stopped = np.zeros(B * n, bool)
        self.tau = np.full(B * n, -1, np.int32)
        self.seen = np.zeros(B * n, np.int32)
        self.scored_tokens = 0
        self.decoders: dict[int, OffsetDecoder] = {}
        self.scores: dict[str, np.ndarray] = {}

    def look(self, s: _State, prompt_len: int, made: int) -> np.ndarray:
        P, width = prompt_len, prompt_len + made - self.column
        o = self.margin_options
        margin, self.cache, self.last, scores = _teacher_margins(
            self.graphdef, self.params, self.cache, self.last, s, np.int32(self.column),
            width=width, kind=o["margin_kind"], k=o["margin_k"], renormalize=o["renormalize"],
            scores=self.keep_scores,
        )  # fmt: skip
        new = slice(made - width, made)  # the response columns scored now
        self.margin[self.rows, new] = np.asarray(margin)
        if scores is not None:
            for name, value in scores._asdict().items():
                if name not in self.scores:
                    shape = (len(self.margin), self.N) + value.shape[2:]
                    self.scores[name] = np.zeros(shape, value.dtype)
                self.scores[name][self.rows, new] = np.asarray(value)
        self.column = P + made
        # whole to the host, then sliced: a device slice would compile for every (rows, made)
        tokens, response = (np.asarray(x)[:, P : P + made] for x in (s.tokens_RxS, s.response_RxS))
        self.scored_tokens += int(response[:, new].sum())
        live = ~(np.asarray(s.done_R) | (made >= self.N))
        if not live.any():
            return live
        # every row of the loop (its row count compiles once): finished rows are never stopped
        seg = self._seg(tokens, response)
        means, count = segment_means_host(self.margin[self.rows, :made], seg, self.N)
        cut = _online(means, np.maximum(count - 1, 0), self.online)  # the last may go on
        stop = np.asarray(cut.certain) & live
        rows = self.rows[stop]
        self.stopped[rows] = True
        self.tau[rows] = np.asarray(cut.tau)[stop]
        self.seen[rows] = (count - 1)[stop]
        return stop

    def take(self, index_R: np.ndarray) -> None:
        self.rows = self.rows[index_R]
        self.cache, self.last = _take(self.cache, self.last, jnp.asarray(index_R, jnp.int32))

    def _seg(self, tokens: np.ndarray, response: np.ndarray) -> np.ndarray:
        """The segment ids of the loop's rows so far, ``[R, made]``, as
        :func:`~opd_jax.text_segments.response_segments` gives them; each row's tokens are
        decoded once (:class:`~opd_jax.models.OffsetDecoder`)."""
        kind, block = self.segments
        seg = np.full(tokens.shape, -1, np.int32)
        for i, row in enumerate(self.rows):
            real = response[i].astype(bool)
            n = int(real.sum())  # a row's response is its first n columns
            if kind == "sentence":
                decoder = self.decoders.setdefault(row, OffsetDecoder(self.tokenizer))
                decoder.feed(tokens[i, len(decoder.ids) : n])
                seg[i, :n] = token_sentences(*decoder.result())
            else:
                seg[i, :n] = np.arange(n) // (block if kind == "fixed" else 1)
        return seg


@jax.jit
def _take(cache: KVCache, last_RxD: jax.Array, index_R: jax.Array):
    taken = KVCache(
        k=jnp.take(cache.k, index_R, axis=1),
        v=jnp.take(cache.v, index_R, axis=1),
        mask=jnp.take(cache.mask, index_R, axis=0),
        index=cache.index,
    )
    return taken, jnp.take(last_RxD, index_R, axis=0)


def final_cuts(
    margin_RxN: np.ndarray,
    seg_RxN: np.ndarray,
    response_RxN: np.ndarray,
    stopped_R: np.ndarray,
    tau_R: np.ndarray,
    changepoint: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """``(keep [R], released [R])``: each row's kept response tokens, before its stopped cut
    ``tau`` or, for a row sampled to its end, before the offline rule's cut on all its
    sentences (all of them where it does not release)."""
    means, count = segment_means_host(margin_RxN, seg_RxN, seg_RxN.shape[1])
    offline_tau, released, _ = core.bic_split(means, count, **changepoint)
    tau = np.where(stopped_R, tau_R, np.asarray(offline_tau))
    released = stopped_R | np.asarray(released)
    length = response_RxN.sum(-1).astype(np.int32)
    keep = np.where(released, first_token_of(seg_RxN, tau, length), length)
    return keep.astype(np.int32), released
