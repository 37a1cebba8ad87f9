"""Release-aware sampling: the teacher scores rows while they are sampled, and a row stops
once its release cut is certain (``sampling.stop_at_release``; docs/method.md §3a).

At every look of :func:`~opd_jax.sampling.generate.sample` (each ``compact_every`` tokens)
:class:`ReleaseWatch` splits the responses so far into sentences on the host. Where some row
completed a sentence count at which the cut could fire (``2 min_segments + confirm`` or more:
:func:`fires_from`), the teacher scores every column not yet scored, one chunked forward with
its own KV cache, and forms the margin there from the student's top-K candidates that decoding
recorded; the watcher takes the margin's mean over each complete sentence (every sentence but a
live row's last) and asks :func:`~opd_jax.core.first_certain` whether the cut became certain at
any sentence count completed since the last look (:func:`~opd_jax.core.online_cut`). Rows that
are certain stop like rows that sampled an EOS. Where no count could fire, the teacher waits:
its columns are scored at a later look, one larger forward, before rows leave the loop, at the
end (a rollout too short to release costs the teacher one pass over it, as offline), or once
it owes ``max_deferred`` columns (a pass's width stays bounded).

Where the sampler's rows are on other devices than the teacher (``mesh.rollout``) the rows
move to the teacher's in one transfer at each look, and the teacher scores every look's new
columns as soon as they are read, before the host splits them: its pass then runs on its own
devices while the student decodes (``apart``; the decisions are the same).

Once the rollouts are back, :func:`final_cuts` gives every row its kept response tokens: the
online cut where a row stopped, else the offline rule on all its sentences, both on the margins
scored here (the update then needs no rule of its own: it trains on what is kept).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from opd_jax import core
from opd_jax.core.stats import TokenStats, margin_from_stats
from opd_jax.models.decoder import Decoder, KVCache
from opd_jax.models.tokenizer import OffsetDecoder, Tokenizer
from opd_jax.sampling.generate import Rows, prefill_cache, prompt_window
from opd_jax.sharding import ShardingRules, constrain
from opd_jax.text_segments import GrowingSentences

MARGIN_OPTIONS = ("margin_kind", "margin_k", "renormalize")


def split_release_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The release rule's options as ``(margin options, change point options)``, defaults
    filled in (:func:`opd_jax.core.rule_options`)."""
    full = core.rule_options("release") | dict(options)
    margin = {k: v for k, v in full.items() if k in MARGIN_OPTIONS}
    return margin, {k: v for k, v in full.items() if k not in MARGIN_OPTIONS}


LOOK_LOGITS = 2**24  # teacher logits alive at once in a look (64 MiB of float32), at least a column


def teacher_mesh(params: Any) -> jax.sharding.Mesh | None:
    """The mesh the teacher's parameters are placed on (None where they are not on one)."""
    sharding = jax.tree.leaves(params)[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def fires_from(changepoint: Mapping[str, Any], confirm: int) -> int:
    """The fewest complete sentences at which :func:`~opd_jax.core.online_cut` can be certain:
    the test on ``n - confirm`` sentences needs ``min_segments`` on each side of its split."""
    return 2 * int(changepoint["min_segments"]) + confirm


DEFERRED_LOOKS = 4  # the training loop's max_deferred: this many looks' worth of columns


def widest_look(compact_every: int, max_new_tokens: int) -> int:
    """The most columns one teacher pass of the training loop's watcher scores: it owes fewer
    than ``DEFERRED_LOOKS * compact_every`` before a look adds ``compact_every`` more (the
    first look also the prefill's token)."""
    return min(max_new_tokens, (DEFERRED_LOOKS + 1) * compact_every)


def look_columns(rows: int, vocab: int, width: int) -> int:
    """Columns whose ``[rows, V]`` teacher logits a look forms at once: as many as fit in
    :data:`LOOK_LOGITS` (so small batches make one matmul of the look), at least one."""
    return max(1, min(width, LOOK_LOGITS // max(rows * vocab, 1)))


def _constrain(cache: KVCache, last_RxD: jax.Array, rules: ShardingRules):
    """The teacher's cache and last hidden with their rows over the mesh's batch axes, as the
    sampler's (under an ambient mesh; identity without)."""
    return cache.constrained(rules), constrain(last_RxD, ("batch", None), rules)


@functools.partial(jax.jit, static_argnames=("graphdef", "size", "n", "window"))
def _teacher_prefill(graphdef, params, tokens_BxP, mask_BxP, *, size: int, n: int, window: int):
    """The teacher's cache over the prompts (``size`` slots; their last ``window`` columns
    read, as the sampler's), repeated ``n`` times like the sampler's, and its last hidden
    state (it predicts the first response token)."""
    teacher: Decoder = nnx.merge(graphdef, params)
    h_BxWxD, cache = prefill_cache(teacher, tokens_BxP, mask_BxP, size, n, window)
    return _constrain(cache, jnp.repeat(h_BxWxD[:, -1], n, axis=0), teacher.rules)


def _teacher_look(
    graphdef, params, cache, last_RxD, s: Rows, start, *, width, kind, k, renormalize, scores,
    hidden, columns,
):  # fmt: skip
    """The teacher over columns ``[start, start + width)`` of the sampler's rows, one chunked
    forward with its cache. Returns the margin there ``[R, width]`` (0 off the response),
    the cache after them, the last hidden, with ``scores`` the
    :class:`~opd_jax.core.TeacherScores` there (else None) and with ``hidden`` the final hidden
    state that predicts each column ``[R, width, D]`` (else None). Logits are formed
    ``columns`` columns at a time (:func:`look_columns`)."""
    teacher: Decoder = nnx.merge(graphdef, params)
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)  # noqa: E731
    tokens_RxC, response_RxC = cut(s.tokens_RxS), cut(s.response_RxS)
    h_RxCxD, cache = teacher.hidden_cached(tokens_RxC, cache, attention_mask=response_RxC)
    before_RxCxD = jnp.concatenate([last_RxD[:, None], h_RxCxD[:, :-1]], axis=1)  # predicts
    ids_RxCxK, logp_RxCxK = cut(s.topk_ids_RxSxK), cut(s.topk_logp_RxSxK)

    def column(xs):
        h_RxD, y_R, ids_RxK, logp_RxK = xs
        z_RxV = teacher.logits(h_RxD[:, None])[:, 0]
        kept = core.teacher_scores_from_logits(ids_RxK, z_RxV, y_R)
        zeros = jnp.zeros_like(logp_RxK)
        stats = TokenStats(
            tokens=y_R,
            student_logp=zeros[:, 0],  # no margin kind reads these two
            teacher_logp=kept.teacher_logp,
            student_topk_ids=ids_RxK,
            student_topk_logp=logp_RxK,
            teacher_at_student_topk=kept.teacher_at_student_topk,
            teacher_topk_ids=kept.teacher_topk_ids,
            teacher_topk_logp=kept.teacher_topk_logp,
            student_at_teacher_topk=zeros,
        )
        margin_R = margin_from_stats(stats, kind, k=k, renormalize=renormalize)
        return margin_R, kept if scores else None

    by_column = jax.tree.map(
        lambda x: jnp.swapaxes(x, 0, 1), (before_RxCxD, tokens_RxC, ids_RxCxK, logp_RxCxK)
    )
    margin_CxR, kept = jax.lax.map(column, by_column, batch_size=columns)
    rows_first = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    margin_RxC = jnp.where(response_RxC > 0, rows_first(margin_CxR), 0.0)
    kept = None if kept is None else jax.tree.map(rows_first, kept)
    cache, last_RxD = _constrain(cache, h_RxCxD[:, -1], teacher.rules)
    return margin_RxC, cache, last_RxD, kept, before_RxCxD if hidden else None


@functools.cache
def _teacher_looker(graphdef: nnx.GraphDef) -> Callable[..., tuple]:
    """:func:`_teacher_look` of one teacher, jitted with its graph definition closed over (a
    look hashes no graph) and the cache donated."""
    statics = ("width", "kind", "k", "renormalize", "scores", "hidden", "columns")
    return jax.jit(
        functools.partial(_teacher_look, graphdef), static_argnames=statics, donate_argnums=(1,)
    )


@functools.partial(jax.jit, static_argnames=("window", "options"))
def _first_certain(means_RxN, seen_R, complete_R, *, window: int, options: tuple):
    return core.first_certain(means_RxN, seen_R, complete_R, window=window, **dict(options))


def segment_means_host(
    margin_RxN: np.ndarray, seg_RxN: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Host: the margin's mean over each segment, ``[R, width]``, and each row's segment
    count ``[R]`` (1 + its largest id; ids >= ``width`` ignored)."""
    rows = margin_RxN.shape[0]
    valid = (seg_RxN >= 0) & (seg_RxN < width)
    flat = (np.arange(rows)[:, None] * width + seg_RxN)[valid]
    sums = np.bincount(flat, margin_RxN[valid].astype(np.float64), minlength=rows * width)
    counts = np.bincount(flat, minlength=rows * width).astype(np.float64)
    sums, counts = sums.reshape(rows, width), counts.reshape(rows, width)
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
      keep_hidden: also keep the teacher's final hidden state that predicts every sampled
        token (:data:`~opd_jax.core.TEACHER_HIDDEN`: the update forms the teacher's logits
        from it, no forward pass).
      max_deferred: the teacher scores at the first look where it owes this many columns or
        more, whether or not a decision is possible (bounds a pass's width: its attention
        scores and its compiled widths; :func:`widest_look`).

    After :func:`sample`, ``margin [R0, N]`` holds every sampled token's margin, ``stopped``
    ``[R0]`` the rows it stopped, ``tau [R0]`` their cut (sentences kept), ``seen [R0]`` the
    complete sentences at that look and ``scored_tokens`` the tokens the teacher scored;
    with ``keep_scores``, ``scores`` holds the teacher's scores ``[R0, N(, k)]`` by field, and
    with ``keep_hidden`` its hidden states ``[R0, N, D]`` as ``scores[core.TEACHER_HIDDEN]``.
    ``seg [R0, N]`` holds each row's segment ids as last split (every row is split at the look
    after its last token: its whole response) and :meth:`texts` the texts split.
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
        keep_hidden: bool = False,
        max_deferred: int = 64,
    ) -> None:
        self.graphdef, self.params = nnx.split(teacher)
        self.teacher_look = _teacher_looker(self.graphdef)
        self.mesh = teacher_mesh(self.params)
        self.max_deferred = max_deferred
        self.rules = teacher.rules
        self.vocab = teacher.config.token_vocab or teacher.config.vocab_size
        self.tokenizer, self.N, self.segments = tokenizer, max_new_tokens, segments
        self.margin_options, changepoint = split_release_options(rule_options)
        self.k = int(self.margin_options["margin_k"]) if k is None else k
        self.keep_scores, self.keep_hidden = keep_scores, keep_hidden
        self.online = tuple(
            sorted((changepoint | dict(confirm=confirm, min_gain=min_gain)).items())
        )
        self.fires_from = fires_from(changepoint, confirm)

    def start(self, tokens_BxP: jax.Array, mask_BxP: jax.Array, n: int) -> None:
        B, P = tokens_BxP.shape
        window = prompt_window(np.asarray(mask_BxP))
        # the sampler's rows on other devices than the teacher's (mesh.rollout): the teacher
        # scores at every look, beside the decoding
        self.apart = self.mesh is not None and not self._on_teacher(tokens_BxP)
        tokens_BxP, mask_BxP = self._here((tokens_BxP, mask_BxP))
        with self._mesh():
            self.cache, self.last = _teacher_prefill(
                self.graphdef, self.params, tokens_BxP, mask_BxP, size=P + self.N, n=n,
                window=window,
            )  # fmt: skip
        R0 = B * n
        self.rows = np.arange(R0)
        self.prompt_len = P
        self.column = P  # the first column the teacher has not scored
        self.read = P  # the first column not yet read to the host
        self.tokens = np.zeros((R0, self.N), np.int32)  # the response columns, as sampled
        self.response = np.zeros((R0, self.N), np.int32)
        self.margin = np.zeros((R0, self.N), np.float32)
        self.checked = np.zeros(R0, np.int32)  # sentence counts already checked, per row
        self.stopped = np.zeros(R0, bool)
        self.tau = np.full(R0, -1, np.int32)
        self.seen = np.zeros(R0, np.int32)
        self.scored_tokens = 0
        self.decoders: dict[int, OffsetDecoder] = {}
        self.sentences: dict[int, GrowingSentences] = {}
        self.seg = np.full((R0, self.N), -1, np.int32)
        self.scores: dict[str, np.ndarray] = {}
        self.pending: list = []

    def look(self, s: Rows, prompt_len: int, made: int) -> np.ndarray:
        new = slice(self.read - prompt_len, made)  # the response columns sampled since
        # the counts a look may complete: one per new column, and the last sentence of a row
        # that ends now (complete with the row; a live row's last is not)
        window = prompt_len + made - self.read + 1
        rows = self.rows
        # read to the host whole, then cut: a device slice would wait for the decoding after
        cut_s = lambda x: np.asarray(x)[:, self.read : prompt_len + made]  # noqa: E731
        self.tokens[rows, new] = cut_s(s.tokens_RxS)
        self.response[rows, new] = cut_s(s.response_RxS)
        self.read = prompt_len + made
        # the rows that sampled now; a row's sentences are complete but for a live row's last
        done = np.asarray(s.done_R) | (made >= self.N)
        active = self.response[rows, new].any(-1)
        stop = np.zeros_like(active)
        if self.apart or done.all() or self.read - self.column >= self.max_deferred:
            self._score(s)  # the teacher has devices of its own, the loop ends here (every
            # column scored for the final cuts), or it owes its widest pass
        if done.all():
            self._collect()
        if not active.any():
            return stop
        # rows finished before are neither split nor checked: every row of the loop enters the
        # decision (its row count compiles once), those with no count left to check
        at = np.flatnonzero(active)
        seg = np.full((len(rows), made), -1, np.int32)
        seg[at] = self._seg(rows[at], made)
        self.seg[rows[at], :made] = seg[at]
        count = np.where(seg >= 0, seg + 1, 0).max(axis=-1, initial=0)
        complete = np.maximum(np.where(done, count, count - 1), self.checked[rows])
        complete = np.where(active, complete, self.checked[rows])
        if not ((complete > self.checked[rows]) & (complete >= self.fires_from)).any():
            self.checked[rows] = complete  # no count completed now can release: nothing to score
            return stop
        self._score(s)
        self._collect()
        # the complete sentences' means, in a power-of-two width (each compiles once)
        width = min(self.N, max(8, 1 << (int(complete.max()) - 1).bit_length()))
        means, _ = segment_means_host(self.margin[rows, :made], seg, width)
        with self._mesh():
            cut = _first_certain(
                means, self.checked[rows], complete, window=window, options=self.online
            )
        cut = jax.device_get(cut)
        stop = cut.stopped & active
        self.checked[rows] = complete
        decided = rows[stop]
        self.stopped[decided] = True
        self.tau[decided], self.seen[decided] = cut.tau[stop], cut.seen[stop]
        return stop

    def take(self, index_R: np.ndarray, s: Rows) -> None:
        self._score(s)  # rows about to leave the loop keep the teacher's scores of every column
        self.rows = self.rows[index_R]
        with self._mesh():
            self.cache, self.last = _take(
                self.cache, self.last, jnp.asarray(index_R, jnp.int32), rules=self.rules
            )

    def texts(self) -> list[str] | None:
        """Each result row's decoded response, where segments are sentences (the text its
        ``seg`` was split from; as :func:`~opd_jax.text_segments.response_segments` decodes
        it), else None."""
        if self.segments[0] != "sentence":
            return None
        return [self.decoders[row].result()[0] for row in range(len(self.margin))]

    def _score(self, s: Rows) -> None:
        """The teacher over every column sampled and not yet scored (up to the last look),
        one forward with its cache: margins, and the scores and hidden states kept, there."""
        width = self.read - self.column
        if width == 0:
            return
        new = slice(self.column - self.prompt_len, self.read - self.prompt_len)
        o = self.margin_options
        s = self._here(s)
        with self._mesh():
            margin, self.cache, self.last, scores, hidden = self.teacher_look(
                self.params, self.cache, self.last, s, np.int32(self.column),
                width=width, kind=o["margin_kind"], k=o["margin_k"], renormalize=o["renormalize"],
                scores=self.keep_scores, hidden=self.keep_hidden,
                columns=look_columns(len(self.rows), self.vocab, width),
            )  # fmt: skip
        self.pending.append((self.rows, new, margin, scores, hidden))
        self.column = self.read
        self.scored_tokens += int(self.response[self.rows, new].sum())

    def _collect(self) -> None:
        """The passes dispatched by :meth:`_score`, read to the host."""
        for rows, new, margin, scores, hidden in self.pending:
            self.margin[rows, new] = np.asarray(margin)
            kept = {} if scores is None else scores._asdict()
            kept |= {} if hidden is None else {core.TEACHER_HIDDEN: hidden}
            for name, value in kept.items():
                if name not in self.scores:
                    shape = (len(self.margin), self.N) + value.shape[2:]
                    self.scores[name] = np.zeros(shape, value.dtype)
                self.scores[name][rows, new] = np.asarray(value)
        self.pending = []

    def _mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _on_teacher(self, x: jax.Array) -> bool:
        return x.sharding.device_set == set(self.mesh.devices.flat)

    def _here(self, tree):
        """``tree``'s arrays on the teacher's devices (rows over its batch axes), where they
        are elsewhere (the sampler's rows on devices set apart: ``mesh.rollout``), in one
        transfer."""
        if self.mesh is None or all(map(self._on_teacher, jax.tree.leaves(tree))):
            return tree
        shards = int(np.prod([self.mesh.shape[a] for a in jax.tree.leaves(self.rules.batch)]))

        def sharding(x):
            spec = self.rules.spec(("batch",) + (None,) * (x.ndim - 1))
            return NamedSharding(self.mesh, PartitionSpec() if x.shape[0] % shards else spec)

        return jax.device_put(tree, jax.tree.map(sharding, tree))

    def _seg(self, rows: np.ndarray, made: int) -> np.ndarray:
        """The segment ids of result rows ``rows`` so far, ``[len(rows), made]``, as
        :func:`~opd_jax.text_segments.response_segments` gives them; each row's tokens are
        decoded once (:class:`~opd_jax.models.OffsetDecoder`) and its text split again only
        after its last final break (:class:`~opd_jax.text_segments.GrowingSentences`)."""
        kind, block = self.segments
        seg = np.full((len(rows), made), -1, np.int32)
        for i, row in enumerate(rows):
            n = int(self.response[row, :made].sum())  # a row's response is its first n columns
            if kind == "sentence":
                decoder = self.decoders.setdefault(row, OffsetDecoder(self.tokenizer))
                decoder.feed(self.tokens[row, len(decoder.ids) : n])
                sentences = self.sentences.setdefault(row, GrowingSentences())
                seg[i, :n] = sentences.update(*decoder.result())
            else:
                seg[i, :n] = np.arange(n) // (block if kind == "fixed" else 1)
        return seg


@functools.partial(jax.jit, static_argnames=("rules",))
def _take(cache: KVCache, last_RxD: jax.Array, index_R: jax.Array, *, rules: ShardingRules):
    taken = cache.map_rows(lambda x: jnp.take(x, index_R, axis=0))
    return _constrain(taken, jnp.take(last_RxD, index_R, axis=0), rules)


def final_cuts(
    margin_RxN: np.ndarray,
    seg_RxN: np.ndarray,
    response_RxN: np.ndarray,
    stopped_R: np.ndarray,
    tau_R: np.ndarray,
    changepoint: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keep [R], released [R], offline_tau [R])``: each row's kept response tokens, before
    its stopped cut ``tau`` or, for a row sampled to its end, before the offline rule's cut on
    all its sentences (all of them where it does not release); and that offline cut on all
    the sentences each row sampled (``n_b`` where it does not release), which a stopped row's
    online cut is compared with."""
    means, count = segment_means_host(margin_RxN, seg_RxN, seg_RxN.shape[1])
    offline_tau, released, _ = jax.device_get(core.bic_split(means, count, **changepoint))
    tau = np.where(stopped_R, tau_R, offline_tau)
    released = stopped_R | released
    length = response_RxN.sum(-1).astype(np.int32)
    keep = np.where(released, first_token_of(seg_RxN, tau, length), length)
    return keep.astype(np.int32), released, offline_tau.astype(np.int32)
