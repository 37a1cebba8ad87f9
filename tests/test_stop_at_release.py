"""Release-aware sampling (``sampling.stop_at_release``): the teacher's margins scored during
decoding, rows that stop there, the update on what is kept, the token counts, the refusals."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import core, models, sampling, text_segments
from opd_jax.config import ConfigError, load_config
from opd_jax.train.loop import train
from opd_jax.train.metrics import read_metrics
from opd_jax.train.session import Session, cut_rows, kept_width, step_settings
from tests.test_train import overrides
from tests.xla_flags import with_devices

NEVER = 1e30  # a BIC gain no series reaches: the watcher scores every row and stops none


@pytest.fixture(scope="module")
def pair_models(tiny_pair):
    student, tokenizer = models.load(tiny_pair / "student")
    teacher, _ = models.load(tiny_pair / "teacher")
    return student, teacher, tokenizer


def _prompts(tokenizer, batch=3):
    texts = ["Add 3 and 4.", "What is 12 - 5? Say it.", "Multiply 6 by 7, then add 1."][:batch]
    return models.encode_prompts(tokenizer, texts, 32, chat_template=False, system_prompt="")


def _watch(teacher, tokenizer, n_new, **kw):
    options = dict(segments=("fixed", 4), rule_options={}, min_gain=NEVER) | kw
    return sampling.ReleaseWatch(teacher, tokenizer, max_new_tokens=n_new, **options)


def _sample(student, tokens, mask, n_new, watcher=None, n=1, compact_every=4):
    return sampling.sample(
        student, tokens, mask, key=jax.random.key(3), max_new_tokens=n_new,
        method=sampling.Temperature(1.0), n=n, compact_every=compact_every, watcher=watcher,
    )  # fmt: skip


def _count_teacher_looks(monkeypatch) -> list[int]:
    """Records the width of every teacher forward the watcher runs."""
    widths, looker = [], sampling.release_watch._teacher_looker

    def counting(graphdef):
        look = looker(graphdef)

        def counted(*args, width, **kwargs):
            widths.append(width)
            return look(*args, width=width, **kwargs)

        return counted

    monkeypatch.setattr(sampling.release_watch, "_teacher_looker", counting)
    return widths


@pytest.mark.parametrize(
    "logits_at_once, segments, eos",
    [
        (2**24, ("token", 1), ()),  # every look can release: the teacher scores at each
        (1, ("token", 1), ()),  # the same, logits formed one column at a time
        (2**24, ("fixed", 4), ()),  # no look can release (3 segments in 13 tokens): one pass
        (2**24, ("fixed", 4), tuple(range(0, 320, 3))),  # rows end early and leave the loop
        (2**24, ("fixed", 3), ()),  # the teacher owes 8 columns at most: [9, 4]
    ],
)
def test_margins_scored_while_sampling_equal_a_full_forwards(
    pair_models, monkeypatch, logits_at_once, segments, eos, n=2
):
    """The teacher's cached chunks and the student's top-K recorded by decoding give the margin
    that the step's full forward passes give, at every sampled token (prompts of different
    lengths, `n` samples sharing a prefill, rows finishing early and dropped from the loop),
    however many columns' logits a look forms at once, and whether the teacher scores at
    every look or waits until a sentence count could release (or rows leave the loop)."""
    monkeypatch.setattr(sampling.release_watch, "LOOK_LOGITS", logits_at_once)
    widths = _count_teacher_looks(monkeypatch)
    student, teacher, tokenizer = pair_models
    tokens, mask = _prompts(tokenizer)
    N = 13  # not a multiple of compact_every: the last look scores a shorter chunk
    owed = 8 if segments == ("fixed", 3) else 64
    watch = _watch(teacher, tokenizer, N, segments=segments, max_deferred=owed, keep_hidden=True)
    result = sampling.sample(
        student, tokens, mask, key=jax.random.key(3), max_new_tokens=N, eos_ids=eos,
        method=sampling.Temperature(1.0), n=n, compact_every=4, watcher=watch,
    )  # fmt: skip
    lengths = np.asarray(result.lengths)
    if eos:
        assert (lengths < N).sum() >= 4, f"too few rows ended early to be dropped: {lengths}"
        assert watch.rows.size < len(lengths), "no row left the loop"
    elif segments[0] == "token":
        assert widths == [5, 4, 4], widths  # the first look also scores the prefill's token
    elif owed < N:
        assert widths == [9, 4], widths  # owed 9 >= 8 at the second look, then the rest
    else:
        assert widths == [N], widths  # the whole response in one teacher forward
    P = tokens.shape[1]
    attention = result.prompt_mask | result.response_mask
    h_s = student.response_hidden(result.tokens, attention, P)
    h_t = teacher.response_hidden(result.tokens, attention, P)
    stats = core.token_stats(
        student.logits(h_s), teacher.logits(h_t), result.tokens[:, P:], k=watch.k
    )
    want = np.asarray(core.margin_from_stats(stats, "gap"))
    response = np.asarray(result.response_mask[:, P:]).astype(bool)
    assert response.sum() == watch.scored_tokens and not watch.stopped.any()
    # float32 forwards in another order (cached chunks against one pass): rounding only
    np.testing.assert_allclose(watch.margin[response], want[response], atol=1e-4, rtol=1e-4)
    assert (watch.margin[~response] == 0).all()
    kept = watch.scores[core.TEACHER_HIDDEN]  # the hidden states that predict each token
    np.testing.assert_allclose(kept[response], np.asarray(h_t)[response], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("segments", [("sentence", 0), ("fixed", 3)])
def test_the_watchers_segments_are_those_of_the_finished_rollouts(pair_models, segments):
    """Every row is split once more after its last token (rows ending early and dropped from
    the loop, rows stopped, rows run to the budget): the watcher's segment ids and texts are
    what splitting the finished rollouts gives, so the step need not split them again."""
    student, teacher, tokenizer = pair_models
    tokens, mask = _prompts(tokenizer)
    N = 24
    watch = _watch(
        teacher, tokenizer, N, segments=segments, min_gain=0.0,
        rule_options=dict(min_segments=1, penalty=0.0),
    )  # fmt: skip
    result = sampling.sample(
        student, tokens, mask, key=jax.random.key(5), max_new_tokens=N,
        eos_ids=tuple(range(0, 320, 29)), method=sampling.Temperature(1.0), n=2,
        compact_every=4, watcher=watch,
    )  # fmt: skip
    P = tokens.shape[1]
    rows, texts = text_segments.response_segments(
        tokenizer, np.asarray(result.tokens)[:, P:], np.asarray(result.response_mask)[:, P:],
        *segments,
    )  # fmt: skip
    lengths = np.asarray(result.lengths)
    assert len(set(lengths.tolist())) > 2 and watch.rows.size < len(lengths), lengths
    np.testing.assert_array_equal(watch.seg, rows["seg"])
    assert watch.texts() == (texts if segments[0] == "sentence" else None)


class StopAt:
    """A watcher that stops the rows ``stop`` at their first look."""

    k = 0

    def __init__(self, stop):
        self.stop, self.looks = np.asarray(stop), 0

    def start(self, tokens, mask, n):
        pass

    def look(self, s, prompt_len, made):
        self.looks += 1
        out = self.stop[np.asarray(s.rows_R)] & ~np.asarray(s.done_R)
        self.stop = np.zeros_like(self.stop)
        return out

    def take(self, index, s):
        pass


def test_a_stopped_row_is_a_prefix_of_its_unstopped_sample(pair_models):
    """Stopping ends a row like an EOS, and changes no token of any row before it: row r's
    draws depend on the key, r and the position only."""
    student, _, tokenizer = pair_models
    tokens, mask = _prompts(tokenizer)
    full = _sample(student, tokens, mask, 12)
    cut = _sample(student, tokens, mask, 12, StopAt([True, False, True]))
    P = tokens.shape[1]
    lengths = np.asarray(cut.lengths)
    # the first look comes after the prefill's token and compact_every = 4 more
    assert lengths[0] == lengths[2] == 5 and lengths[1] == int(full.lengths[1])
    for r, length in enumerate(lengths):
        np.testing.assert_array_equal(cut.tokens[r, : P + length], full.tokens[r, : P + length])
        assert not np.asarray(cut.response_mask[r, P + length :]).any()
        # what the loop decoded after the look (it decodes on while the watcher looks) is gone
        assert (np.asarray(cut.tokens[r, P + length :]) == 0).all()
        assert not np.asarray(cut.logprobs[r, P + length :]).any()


def test_a_watcher_needs_looks(pair_models):
    student, teacher, tokenizer = pair_models
    tokens, mask = _prompts(tokenizer)
    with pytest.raises(ValueError, match="compact_every"):
        _sample(student, tokens, mask, 8, _watch(teacher, tokenizer, 8), compact_every=0)


def test_the_watcher_stops_rows_whose_cut_is_certain(pair_models):
    """With no BIC penalty and one-token segments, the random pair's margins release early:
    stopped rows end before the budget, their cut lies before their end, and :func:`final_cuts`
    keeps exactly the tokens before that cut."""
    student, teacher, tokenizer = pair_models
    tokens, mask = _prompts(tokenizer)
    N = 40
    watch = _watch(
        teacher, tokenizer, N, segments=("token", 1), min_gain=0.0,
        rule_options=dict(min_segments=1, penalty=0.0), confirm=0,
    )  # fmt: skip
    result = _sample(student, tokens, mask, N, watch)
    assert watch.stopped.any(), "no row stopped: pick a setting where the rule fires"
    P = tokens.shape[1]
    response = np.asarray(result.response_mask[:, P:])
    lengths = response.sum(-1)
    seg = np.where(response > 0, np.arange(N), -1)
    keep, released, offline_tau = sampling.final_cuts(
        watch.margin, seg, response, watch.stopped, watch.tau, dict(min_segments=1, penalty=0.0)
    )
    stopped = watch.stopped
    assert (lengths[stopped] < N).all() and released[stopped].all()
    np.testing.assert_array_equal(keep[stopped], watch.tau[stopped])  # one token a segment
    assert (keep[stopped] < lengths[stopped]).all()
    assert (offline_tau <= np.where(response > 0, seg + 1, 0).max(-1)).all()


def test_cut_rows_pads_after_the_kept_tokens_and_narrows_the_columns():
    P, N = 2, 16
    tokens = np.arange(3 * (P + N)).reshape(3, P + N)
    response = np.zeros((3, P + N), np.int32)
    response[:, P:] = 1
    host = {
        "tokens": tokens,
        "attention_mask": response | (np.arange(P + N) < P),
        "response_mask": response,
        "seg": np.tile(np.arange(N) // 3, (3, 1)),
    }
    keep = np.array([3, 5, 0])
    cut = cut_rows(host, keep, P, dataclasses.make_dataclass("S", [("max_new_tokens", int)])(N))
    assert kept_width(5, N) == 6  # a multiple of ceil(16 / 8) = 2
    assert cut["tokens"].shape == (3, P + 6) and cut["seg"].shape == (3, 6)
    np.testing.assert_array_equal(cut["response_mask"][:, P:].sum(-1), keep)
    np.testing.assert_array_equal(cut["attention_mask"][:, :P], 1)
    assert (cut["seg"][0, 3:] == -1).all() and (cut["seg"][1, :5] == [0, 0, 0, 1, 1]).all()


def test_the_prefix_loss_and_gradient_on_cut_rows_equal_the_offline_rules_bit_for_bit():
    """The update on rows cut at the release boundary (rule ``full``) is the offline release
    rule's update on the whole rows, where both cut at the same place."""
    B, T, D, V = 3, 12, 8, 11
    keys = jax.random.split(jax.random.key(0), 5)
    h_s = jax.random.normal(keys[0], (B, T, D))
    h_t = jax.random.normal(keys[1], (B, T, D))
    w_s, w_t = jax.random.normal(keys[2], (D, V)), jax.random.normal(keys[3], (D, V))
    tokens = jax.random.randint(keys[4], (B, T), 0, V)
    response = jnp.ones((B, T), jnp.int32).at[2, 9:].set(0)
    # sentence means 3, 3, 3, then 0, 0, 0: a clear drop after segment 3 (token 6)
    seg = jnp.where(response > 0, jnp.arange(T) // 2, -1)
    release = core.ObjectiveSettings(rule="release", loss="sampled_reverse_kl", k=4)

    def offline(h):
        scored = core.score_chunked(h, w_s, h_t, w_t, tokens, k=4, chunk_size=8)
        margin = jnp.where(seg < 3, 3.0, 0.0)
        forced = scored._replace(stats=_with_margin(scored.stats, margin))
        return core.objective_from_scores(forced, response, seg, None, release)

    loss, aux = offline(h_s)
    boundary = int(jnp.argmin(aux.weights[0]))
    assert aux.weights[:, :boundary].all() and not aux.weights[:, boundary:].any()
    cut = response * (jnp.arange(T) < boundary)
    full = dataclasses.replace(release, rule="full", compared_rules=())

    def online(h):
        scored = core.score_chunked(h, w_s, h_t, w_t, tokens, k=4, chunk_size=8)
        return core.objective_from_scores(scored, cut, jnp.where(cut > 0, seg, -1), None, full)

    g_offline = jax.grad(lambda h: offline(h)[0])(h_s)
    g_online = jax.grad(lambda h: online(h)[0])(h_s)
    assert online(h_s)[0] == loss
    np.testing.assert_array_equal(g_online, g_offline)


def _with_margin(stats, margin):
    """Statistics whose ``gap`` margin is ``margin``: the top candidate ``margin`` above the
    rest."""
    q = jnp.zeros_like(stats.teacher_at_student_topk).at[..., 0].set(margin)
    return stats._replace(teacher_at_student_topk=q - 10.0)


def test_the_hidden_states_kept_for_stopped_and_dropped_rows_are_the_teachers_forwards(
    pair_models,
):
    """Rows stopped mid-rollout (the loop decoded on past their look) and rows dropped from the
    loop keep the teacher's hidden state of every token they sampled, no other."""
    student, teacher, tokenizer = pair_models
    tokens, mask = _prompts(tokenizer)
    N = 23
    watch = _watch(
        teacher, tokenizer, N, segments=("token", 1), min_gain=0.0, max_deferred=8,
        rule_options=dict(min_segments=1, penalty=0.0), keep_hidden=True,
    )  # fmt: skip
    result = sampling.sample(
        student, tokens, mask, key=jax.random.key(3), max_new_tokens=N, n=3, compact_every=2,
        eos_ids=tuple(range(0, 320, 7)), method=sampling.Temperature(1.0), watcher=watch,
    )  # fmt: skip
    assert watch.stopped.any() and watch.rows.size < len(watch.stopped)
    P = tokens.shape[1]
    h_t = teacher.response_hidden(result.tokens, result.prompt_mask | result.response_mask, P)
    response = np.asarray(result.response_mask[:, P:]).astype(bool)
    kept = watch.scores[core.TEACHER_HIDDEN]
    np.testing.assert_allclose(kept[response], np.asarray(h_t)[response], atol=1e-4, rtol=1e-4)


def test_the_update_on_kept_hidden_states_is_the_one_on_the_teachers_forward(tiny_pair, tmp_path):
    """A loss that needs the teacher's distribution forms it from the final hidden states kept
    while sampling: the loss and gradient of the teacher's forward pass, up to float rounding."""
    from opd_jax.train.step import _micro_loss

    config = load_config(None, overrides(tiny_pair, tmp_path, *STOPPING, "loss.kind=reverse_kl"))
    session = Session.build(config)
    tokens, mask = session.encode(["Add 3 and 4.", "What is 12 - 5? Say it."])
    with jax.set_mesh(session.mesh):
        rollout = session.rollout(tokens, mask, jax.random.key(0))
        kept = session.device_batch(rollout, session.segments(rollout)[0])
        assert core.TEACHER_HIDDEN in kept and kept["response_mask"].sum() > 0
        forward = {k: v for k, v in kept.items() if k != core.TEACHER_HIDDEN}
        teacher = nnx.merge(session.teacher_graphdef, session.teacher_params)
        settings = step_settings(config)

        def loss(batch):
            return jax.value_and_grad(_micro_loss, has_aux=True)(
                session.params, session.graphdef, teacher, batch, jax.random.key(1), settings
            )

        (got, _), g_got = loss(kept)
        (want, _), g_want = loss(forward)
    # float32 hidden states from cached chunks against one pass (~1e-6 apart, relative): the
    # loss and each gradient leaf agree to well within 1e-4 of their own scale
    np.testing.assert_allclose(got, want, rtol=1e-4)

    def close(a, b):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)

    jax.tree.map(close, g_got, g_want)


STOPPING = (
    "rule.kind=release", "sampling.stop_at_release=true", "sampling.compact_every=4",
    "segments.kind=token", "sampling.stop_min_gain=0",
    "rule.options={min_segments: 1, penalty: 0.0}",
)  # fmt: skip


@pytest.mark.parametrize("loss", ["sampled_reverse_kl", "reverse_kl"])
def test_training_with_stopping_logs_what_was_sampled_scored_and_kept(tiny_pair, tmp_path, loss):
    """The teacher scores each sampled token once: a loss that reads only q[y] trains on its
    scores kept from sampling, one that needs its distribution on its final hidden states kept
    there (:data:`~opd_jax.core.TEACHER_HIDDEN`)."""
    config = load_config(
        None,
        overrides(tiny_pair, tmp_path, *STOPPING, f"loss.kind={loss}"),
    )
    train(config)
    lines = read_metrics(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert 0 < line["kept_tokens"] <= line["sampled_tokens"]
        assert line["scored_tokens"] == line["sampled_tokens"]
        assert line["kept_fraction"] == line["kept_tokens"] / line["sampled_tokens"]
        assert 0 <= line["stopped_fraction"] <= line["released_fraction"] <= 1
        assert "boundary_histogram" not in line
    assert any(line["stopped_fraction"] > 0 for line in lines), "no row stopped"
    compared = [line for line in lines if "online_same_cut" in line]
    assert compared and all(0 <= line["online_same_cut"] <= 1 for line in compared)


def test_prefix_tokens_samples_no_token_past_its_n(tiny_pair, tmp_path):
    config = load_config(
        None,
        overrides(tiny_pair, tmp_path, "rule.kind=prefix_tokens", "rule.options={n: 5}"),
    )
    train(config)
    for line in read_metrics(tmp_path):
        assert line["sampled_tokens"] <= 5 * config.data.batch_size
        assert line["kept_tokens"] == line["sampled_tokens"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["rule.kind=full"], "rule.kind=release"),
        (["rule.kind=release", "sampling.compact_every=0"], "compact_every"),
        (["rule.kind=release", "sampling.compact_every=12"], "compact_every"),
    ],
)
def test_stopping_is_refused_where_it_cannot_run(tiny_pair, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides(tiny_pair, tmp_path, "sampling.stop_at_release=true", *extra))


def test_the_watchers_sentences_grown_look_by_look_equal_the_hosts_at_once(pair_models):
    """Each look decodes only a row's new tokens; the sentence ids are
    :func:`~opd_jax.text_segments.response_segments`' on the response so far."""
    from opd_jax.text_segments import response_segments

    _, teacher, tokenizer = pair_models
    texts = ["We began with 12. The peak was 84. Check: 7 = 3 + 4.", "One. Two! Three? Four"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, ids))
    tokens = np.zeros((2, width), np.int32)
    response = np.zeros((2, width), np.int32)
    for r, row in enumerate(ids):
        tokens[r, : len(row)], response[r, : len(row)] = row, 1
    watch = _watch(teacher, tokenizer, width, segments=("sentence", 0))
    watch.tokens, watch.response, watch.decoders, watch.sentences = tokens, response, {}, {}
    for made in (5, 11, width):
        got = watch._seg(np.arange(2), made)
        want = response_segments(tokenizer, tokens[:, :made], response[:, :made], "sentence", 0)
        np.testing.assert_array_equal(got, want[0]["seg"])
    assert got.max() >= 2  # the texts' sentences were found


@pytest.mark.parametrize(
    "N, min_gain, eos, seeds",
    [
        (40, 0.0, (), [3]),
        # rows that end at a look: their last sentence completes with the row, one count more
        # than a live row's look can complete (seed 1: row 1 is certain only at its end)
        (9, 1.5, tuple(range(0, 320, 13)), [1, 2, 20]),
    ],
)
def test_the_live_decision_is_the_replay_of_the_sampled_rows(pair_models, N, min_gain, eos, seeds):
    """Looks check every sentence count that completed since the last one: on the rollouts
    it made, :func:`~opd_jax.core.replay_online` stops the rows the watcher stopped, at the same
    count and cut, and no other row."""
    student, teacher, tokenizer = pair_models
    tokens, mask = _prompts(tokenizer)
    options = dict(min_segments=1, penalty=0.0)
    for seed in seeds:
        watch = _watch(
            teacher, tokenizer, N, segments=("token", 1), min_gain=min_gain,
            rule_options=options, confirm=0,
        )  # fmt: skip
        result = sampling.sample(
            student, tokens, mask, key=jax.random.key(seed), max_new_tokens=N, eos_ids=eos,
            method=sampling.Temperature(1.0), n=2, compact_every=4, watcher=watch,
        )  # fmt: skip
        _assert_live_is_replay(watch, result, tokens.shape[1], N, min_gain, options)


def _assert_live_is_replay(watch, result, P, N, min_gain, options):
    response = np.asarray(result.response_mask[:, P:])
    seg = np.where(response > 0, np.arange(N), -1)
    means, count = sampling.release_watch.segment_means_host(watch.margin, seg, N)
    replay = jax.device_get(
        core.replay_online(means, count, confirm=0, min_gain=min_gain, **options)
    )
    assert watch.stopped.any()
    np.testing.assert_array_equal(watch.stopped, replay.stopped)
    np.testing.assert_array_equal(watch.seen[watch.stopped], replay.seen[watch.stopped])
    np.testing.assert_array_equal(watch.tau[watch.stopped], replay.tau[watch.stopped])


def test_the_teacher_looks_beside_decoding_on_devices_of_its_own(tiny_pair, tmp_path):
    """2 CPU devices: with the rollouts on one set apart (``mesh.rollout=1``) the teacher
    scores at every look on the other, the training device, while the student decodes; the
    rows, their cuts and the update are those of stopping on both devices at once (learning
    rate 0: the same parameters every step)."""
    args = overrides(
        tiny_pair, tmp_path / "apart", *STOPPING, "optim.learning_rate=0", "train.steps=2"
    )
    script = textwrap.dedent(
        f"""
        import json
        from opd_jax import sampling
        from opd_jax.config import load_config
        from opd_jax.train.loop import train
        from opd_jax.train.metrics import read_metrics
        apart, start = [], sampling.ReleaseWatch.start
        def recording(self, *args):
            start(self, *args)
            apart.append(self.apart)
        sampling.ReleaseWatch.start = recording
        args = {args!r}
        train(load_config(None, args + ["mesh.rollout=1"]))
        train(load_config(None, [a.replace("apart", "shared") for a in args]))
        runs = [read_metrics(d) for d in ({str(tmp_path / "apart")!r}, {str(tmp_path / "shared")!r})]
        print(json.dumps([apart, *runs]))
        """
    )
    env = os.environ | {"XLA_FLAGS": with_devices(2)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    apart, set_apart, shared = json.loads(out.stdout.strip().splitlines()[-1])
    assert apart == [True] * 2 + [False] * 2
    for a, s in zip(set_apart, shared, strict=True):
        for name in ("sampled_tokens", "scored_tokens", "kept_tokens", "stopped_fraction"):
            assert a[name] == s[name], name
        np.testing.assert_allclose(a["loss"], s["loss"], rtol=1e-5, atol=1e-6)
