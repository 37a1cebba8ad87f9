"""The arithmetic task's ideal teacher: p* is the generator's next-token distribution."""

import itertools
import math
from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import core
from opd_jax.data import arithmetic, recap
from opd_jax.experiment.ideal_teacher import (
    IdealTeacher,
    compare_by_sentence,
    ideal_token_stats,
    parse_chain,
    score_rollouts,
    sentence_profile,
    smoothed,
    summarise_comparison,
)
from opd_jax.models.testing import train_tiny_tokenizer
from opd_jax.models.tokenizer import train_bpe_tokenizer

SMALL = dict(train_size=300, test_size=10, test_long_size=10, test_unseen_op_size=10)
SMALL |= dict(max_start=20, max_addend=20, max_factor=5, max_value=99, min_steps=3, max_steps=5)
SMALL |= dict(long_min_steps=6, long_max_steps=7)
PROMPT = "Start with 3. Add 2. Multiply by 2. What is the result?"  # answer 10


@pytest.fixture(scope="module")
def task_tokenizer():
    """The experiment's kind of tokenizer: byte-level BPE, digits split, trained on the task."""
    examples = arithmetic.generate_split(arithmetic.arithmetic_config(**SMALL, recap=4), "train")
    texts = [e[field] for e in examples for field in ("prompt", "solution")]
    return train_bpe_tokenizer(texts, 400, split_digits=True)


@pytest.fixture(scope="module", params=["task", "tiny"])
def tokenizer(request, task_tokenizer):
    return task_tokenizer if request.param == "task" else train_tiny_tokenizer()


class Replay:
    """Stands in for ``np.random.Generator``: takes the choices of ``script`` in turn (the
    first option past its end) and records how many options each draw had."""

    def __init__(self, script):
        self.script, self.arity = list(script), []

    def _choose(self, n):
        choice = self.script[len(self.arity)] if len(self.arity) < len(self.script) else 0
        self.arity.append(n)
        return choice

    def integers(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        return low + self._choose(high - low)

    def permutation(self, items):
        orders = list(itertools.permutations(items))
        return np.asarray(orders[self._choose(len(orders))])


def every_draw(fn):
    """``{fn(rng): probability}`` over every sequence of draws ``fn`` can make."""
    outcomes, stack = defaultdict(float), [[]]
    while stack:
        script = stack.pop()
        rng = Replay(script)
        outcomes[fn(rng)] += math.prod(1 / n for n in rng.arity)
        choices = script + [0] * (len(rng.arity) - len(script))
        for j in range(len(script), len(rng.arity)):
            stack += [choices[:j] + [c] for c in range(1, rng.arity[j])]
    return outcomes


def every_response(prompt, task, tokenizer):
    """``{token ids: probability}`` of every reference response: the generator's draws of the
    kinds and of each sentence replayed one by one, each response tokenised whole."""
    start, steps = parse_chain(prompt)
    kinds = recap.KINDS[: task.recap_kinds]
    orders = every_draw(lambda rng: tuple(map(str, rng.permutation(list(kinds))[: task.recap])))
    sentences = {
        kind: every_draw(lambda rng, kind=kind: recap._sentence(rng, kind, start, steps))
        for kind in kinds
    }
    texts = defaultdict(float)
    for order, p_order in orders.items():
        for drawn in itertools.product(*(sentences[kind].items() for kind in order)):
            words = [text for text, _ in drawn]
            solution = arithmetic._example(start, steps, "", words, task.answer_last)["solution"]
            texts[solution] += p_order * math.prod(p for _, p in drawn)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    responses = defaultdict(float)
    for row, p in zip(ids, texts.values(), strict=True):
        responses[tuple(row) + (tokenizer.eos_token_id,)] += p
    return responses


def brute_force(responses, response, vocab):
    """``p*(. | response[:t])`` ``[T, V]`` by summing the complete responses (NaN off them)."""
    table = np.full((len(response), vocab), np.nan)
    for t in range(len(response)):
        mass = np.zeros(vocab)
        for ids, p in responses.items():
            if len(ids) > t and ids[:t] == tuple(response[:t]):
                mass[ids[t]] += p
        if mass.sum() > 0:
            table[t] = mass / mass.sum()
    return table


def full_scores(teacher, response, vocab):
    return teacher.score(response, np.tile(np.arange(vocab), (len(response), 1)))


def test_sentence_distribution_mirrors_the_generators_draws():
    start, steps = parse_chain(PROMPT)
    for kind in recap.KINDS:
        drawn = every_draw(lambda rng, kind=kind: recap._sentence(rng, kind, start, steps))
        listed = recap.sentence_distribution(kind, start, steps)
        assert listed.keys() == drawn.keys()
        assert all(listed[s] == pytest.approx(drawn[s]) for s in drawn)


def test_next_sentences_draw_uniformly_among_the_kinds_not_used():
    start, steps = parse_chain(PROMPT)
    options = recap.next_sentences(start, steps, 4, used=("check",))
    assert sum(p for *_, p in options) == pytest.approx(1.0)
    by_kind = defaultdict(float)
    for _, kind, p in options:
        by_kind[kind] += p
    assert by_kind == pytest.approx({"start": 1 / 3, "count": 1 / 3, "peak": 1 / 3})
    assert recap.next_sentences(start, steps, 2, used=("start", "count")) == []


@pytest.mark.parametrize(
    "fields",
    [dict(recap=2), dict(recap=2, answer_last=True), dict(recap=2, recap_kinds=6)],
    ids=["answer_first", "answer_last", "six_kinds"],  # six: 720 orders to replay
)
def test_p_star_matches_a_brute_force_enumeration_of_every_response(tokenizer, fields):
    task = arithmetic.arithmetic_config(**fields)
    responses = every_response(PROMPT, task, tokenizer)
    assert sum(responses.values()) == pytest.approx(1.0)
    teacher = IdealTeacher(*parse_chain(PROMPT), task, tokenizer)
    vocab = len(tokenizer)
    rng = np.random.default_rng(0)
    everything = list(responses)
    for index in rng.choice(len(everything), 6, replace=False):
        response = everything[index]
        scores = full_scores(teacher, response, vocab)
        want = brute_force(responses, response, vocab)
        assert scores.covered.all() and np.isfinite(scores.token_logp).all()
        np.testing.assert_allclose(np.exp(scores.topk_logp), want, atol=1e-12)
        np.testing.assert_allclose(np.exp(scores.topk_logp).sum(-1), 1.0)


@pytest.mark.parametrize("answer_last", [False, True])
def test_references_of_the_generator_are_covered_with_positive_p_star(tokenizer, answer_last):
    task = arithmetic.arithmetic_config(**SMALL, recap=3, recap_kinds=6, answer_last=answer_last)
    for example in arithmetic.generate_split(task, "test"):
        teacher = IdealTeacher(*parse_chain(example["prompt"]), task, tokenizer)
        response = tokenizer(example["solution"], add_special_tokens=False)["input_ids"]
        response = response + [tokenizer.eos_token_id]
        scores = full_scores(teacher, response, len(tokenizer))
        assert scores.covered.all()
        assert (scores.token_logp > -np.inf).all()
        np.testing.assert_allclose(np.exp(scores.topk_logp).sum(-1), 1.0)
        assert scores.token_logp[-1] == 0.0  # EOS after the last sentence


def test_p_star_is_a_point_mass_on_the_solutions_tokens(tokenizer):
    task = arithmetic.arithmetic_config(recap=2)
    start, steps = parse_chain(PROMPT)
    solution = "3 + 2 = 5. 5 * 2 = 10. The answer is 10."
    head = tokenizer(solution, add_special_tokens=False)["input_ids"]
    scores = full_scores(IdealTeacher(start, steps, task, tokenizer), head, len(tokenizer))
    p = np.exp(scores.topk_logp)
    np.testing.assert_array_equal(p, np.eye(len(tokenizer))[head])
    assert (scores.entropy == 0).all()


def test_p_star_is_undefined_after_a_wrong_or_unusual_token(tokenizer):
    task = arithmetic.arithmetic_config(recap=2)
    teacher = IdealTeacher(*parse_chain(PROMPT), task, tokenizer)
    good = tokenizer("3 + 2 = 5. 5 * 2 = 10.", add_special_tokens=False)["input_ids"]
    wrong = tokenizer("3 + 2 = 6. 6 * 2 = 12.", add_special_tokens=False)["input_ids"]
    t = next(i for i, (a, b) in enumerate(zip(good, wrong, strict=True)) if a != b)
    scores = full_scores(teacher, wrong, len(tokenizer))
    assert scores.covered[: t + 1].all() and not scores.covered[t + 1 :].any()
    assert scores.token_logp[t] == -np.inf and np.isnan(scores.topk_logp[t + 1 :]).all()
    spelled = [i for c in "3 + 2" for i in tokenizer(c, add_special_tokens=False)["input_ids"]]
    canonical = tokenizer("3 + 2", add_special_tokens=False)["input_ids"]
    if spelled != canonical:  # " +" is one token: spelled " ", "+" it is off the support
        assert not full_scores(teacher, spelled, len(tokenizer)).covered.all()


def test_a_prompt_not_of_the_task_has_no_chain():
    assert parse_chain(PROMPT) == (3, [("add", 3, 2, 5), ("multiply", 5, 2, 10)])
    assert parse_chain("Start with 3. Add 2. What is 3 + 2?") is None
    assert parse_chain("Write a poem.") is None


def student_stats(tokens, topk_ids):
    """Student statistics of log-prob 0 everywhere (only the ids matter here)."""
    zeros, zeros_k = jnp.zeros(tokens.shape), jnp.zeros(topk_ids.shape)
    ids = jnp.asarray(topk_ids)
    return core.TokenStats(jnp.asarray(tokens), zeros, zeros, ids, zeros_k, zeros_k, ids,
                           zeros_k, zeros_k)  # fmt: skip


def test_rollouts_are_scored_per_prompt_and_ideal_margins_use_the_core(task_tokenizer):
    tok, task, vocab = task_tokenizer, arithmetic.arithmetic_config(recap=2), len(task_tokenizer)
    head = tok("3 + 2 = 5. 5 * 2 = 10. The answer is 10.", add_special_tokens=False)
    tokens = np.asarray([head["input_ids"], [tok.eos_token_id] * len(head["input_ids"])])
    mask = np.ones_like(tokens)
    topk_ids = (tokens[:, :, None] + np.arange(4)) % vocab  # the sampled token first
    scores = score_rollouts([PROMPT, PROMPT], tokens, mask, topk_ids, task, tok)
    assert scores.covered[0].all()
    assert scores.covered[1, 0] and not scores.covered[1, 1:].any()  # EOS first: off it
    ideal = ideal_token_stats(scores, student_stats(tokens, topk_ids), 1e-3, vocab)
    gap = np.asarray(core.margin_from_stats(ideal, "gap"))
    one, none = smoothed(np.asarray([0.0, -np.inf]), 1e-3, vocab)
    np.testing.assert_allclose(gap[0], one - none, rtol=1e-5)  # log(1 + 0.999 V / 0.001)
    assert np.isnan(gap[1, 1:]).all()
    advantage = np.asarray(core.sampled_advantage(ideal))
    np.testing.assert_allclose(advantage[0], one, atol=1e-6)
    assert advantage[1, 0] == pytest.approx(none)


def test_sentence_profile_is_the_cores_segment_profile_on_the_kept_tokens():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 10))
    seg = np.asarray([[0, 0, 1, 1, 1, 2, 2, -1, -1, -1]] * 2 + [[0] * 5 + [1] * 5])
    mask = (seg >= 0).astype(np.int32)
    means, rows = sentence_profile(values, seg, mask, 4)
    want, want_rows = core.segment_profile(jnp.asarray(values), seg, mask, 4)
    np.testing.assert_allclose(means[:3], np.asarray(want)[:3], rtol=1e-5)
    np.testing.assert_array_equal(rows, want_rows)
    assert np.isnan(means[3])
    keep = mask.astype(bool) & (np.arange(10) < 3)
    means, rows = sentence_profile(values, seg, keep, 4)
    assert rows.tolist() == [3, 2, 0, 0] and means[1] == pytest.approx(values[:2, 2].mean())


def test_compare_by_sentence_counts_coverage_and_point_mass(task_tokenizer):
    tok, task = task_tokenizer, arithmetic.arithmetic_config(recap=2)
    head, tail = "3 + 2 = 5. 5 * 2 = 10. The answer is 10.", " The peak was 10."
    in_tail = len(tok(tail, add_special_tokens=False)["input_ids"]) + 1  # and EOS
    ids = tok(head + tail, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tokens, mask = np.asarray([ids]), np.ones((1, len(ids)), np.int32)
    topk_ids = np.stack([tokens, (tokens + 1) % len(tok)], -1)
    scores = score_rollouts([PROMPT], tokens, mask, topk_ids, task, tok)
    seg = np.zeros_like(tokens)
    seg[0, -in_tail:] = 1
    student = student_stats(tokens, topk_ids)
    ideal = ideal_token_stats(scores, student, 1e-3, len(tok))
    margin = dict(kind="gap", k=2, renormalize=False)
    record = compare_by_sentence(ideal, student, scores, seg, mask, 4, margin)
    assert record["response_tokens_by_sentence"] == [len(ids) - in_tail, in_tail, 0, 0]
    assert record["covered_tokens_by_sentence"] == record["response_tokens_by_sentence"]
    assert record["determined_tokens_by_sentence"][0] == len(ids) - in_tail
    assert 0 < record["determined_tokens_by_sentence"][1] < in_tail  # " The" is a choice
    assert record["ideal_margin_rows_by_sentence"] == [1, 1, 0, 0]
    assert record["teacher_margin_open_rows_by_sentence"] == [0, 1, 0, 0]
    assert record["ideal_entropy_by_sentence"][0] == 0 < record["ideal_entropy_by_sentence"][1]
    summary = summarise_comparison([record, record])
    assert summary["ideal_margin_rows_by_sentence"] == [2, 2, 0, 0]
    assert summary["ideal_margin_by_sentence"][:2] == record["ideal_margin_by_sentence"][:2]
    assert summary["coverage"] == 1.0 and summary["coverage_by_sentence"][:2] == [1.0, 1.0]
    want = record["determined_tokens_by_sentence"][1] / in_tail
    assert summary["determined_by_sentence"][:2] == [1.0, pytest.approx(want)]


def test_profile_puts_the_ideal_teacher_beside_the_trained_one(tiny_pair, tmp_path):
    import json

    from opd_jax.config import load_config
    from opd_jax.experiment.margin_profile import profile

    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""
run: {{dir: {tmp_path / "run"}, progress: false, tensorboard: false, compilation_cache: ""}}
student: {{path: {tiny_pair / "student"}}}
teacher: {{path: {tiny_pair / "teacher"}}}
data: {{data_dir: {tmp_path / "data"}, batch_size: 2, max_prompt_tokens: 96,
        arithmetic: {{train_size: 32, test_size: 4, test_long_size: 4, test_unseen_op_size: 4,
                      recap: 2}}}}
sampling: {{max_new_tokens: 8}}
score: {{chunk_size: 8}}
"""
    )
    summary = profile(load_config(config), 2, ideal=True)
    saved = json.loads((tmp_path / "run" / "profile.json").read_text())
    ideal = saved["summary"]["ideal"]
    assert ideal["coverage"] == summary["ideal"]["coverage"]
    assert len(ideal["ideal_margin_by_sentence"]) == len(summary["margin_by_sentence"]) == 16
    assert ideal["ideal_margin_rows_by_sentence"][0] == summary["rows_by_sentence"][0] == 4
    assert 0 < ideal["coverage"] <= 1  # p* of the first token is always defined
    assert np.isfinite(ideal["ideal_margin_by_sentence"][0])
    assert all("ideal" in batch for batch in saved["batches"])
    assert (tmp_path / "run" / "plots" / "ideal_vs_teacher_by_sentence.png").is_file()
    assert "ideal teacher p*" in (tmp_path / "run" / "profile.md").read_text()


def test_profile_refuses_the_ideal_teacher_of_another_data_source(tiny_pair, tmp_path):
    from opd_jax.config import load_config
    from opd_jax.errors import InputError
    from opd_jax.experiment.margin_profile import profile

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Write a poem."}\n')
    config = tmp_path / "prose.yaml"
    config.write_text(
        f"""
run: {{dir: {tmp_path / "run"}}}
student: {{path: {tiny_pair / "student"}}}
teacher: {{path: {tiny_pair / "teacher"}}}
data: {{source: {prompts}, data_dir: {tmp_path / "data"}}}
"""
    )
    with pytest.raises(InputError, match="data.source=arithmetic"):
        profile(load_config(config), 1, ideal=True)
