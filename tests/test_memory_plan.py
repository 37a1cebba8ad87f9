"""``opd-jax plan`` against the arrays a Session really allocates (tiny models, CPU)."""

import math

import jax
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.memory_plan import GIB, plan
from opd_jax.models import KVCache
from opd_jax.run_models import spec_config
from opd_jax.sampling.release_watch import DEFERRED_LOOKS, look_columns
from opd_jax.train.session import Session

B, P, N = 2, 16, 8


def bytes_per_device(tree) -> int:
    """The largest, over devices, of the bytes of the shards of ``tree`` held there."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def tiny_args(pair) -> list[str]:
    return [
        f"student.path={pair / 'student'}",
        f"teacher.path={pair / 'teacher'}",
        f"data.batch_size={B}",
        f"data.max_prompt_tokens={P}",
        f"sampling.max_new_tokens={N}",
        "score.chunk_size=8",
    ]


@pytest.fixture(scope="module")
def planned(tiny_pair):
    config = load_config(None, tiny_args(tiny_pair))
    return config, plan(config), Session.build(config)


@pytest.mark.parametrize(
    "row, allocated",
    [
        ("student_params", lambda session: session.state.params),
        ("optimizer_state", lambda session: session.state.opt_state),
        ("teacher_params", lambda session: session.teacher_params),
    ],
)
def test_plan_rows_are_the_bytes_the_session_allocates(planned, row, allocated):
    _, result, session = planned
    actual = bytes_per_device(allocated(session))
    assert actual > 0
    assert round(result["gib_per_device"][row] * GIB) == actual


def test_kv_cache_row_is_the_samplers_cache(planned):
    config, result, _ = planned
    cache = jax.eval_shape(lambda: KVCache.init(spec_config(config.student), B, P + N))
    expected = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (*cache.k, *cache.v))
    assert round(result["gib_per_device"]["sampler_kv_cache"] * GIB) == expected


def test_step_temporaries_are_positive_and_finite(planned):
    _, result, _ = planned
    temp = result["gib_per_device"]["step_temporaries"]
    assert math.isfinite(temp) and temp > 0
    assert temp == result["compiled"]["temp_gib"]
    total = result["gib_per_device"]["total"]
    rows = sum(v for k, v in result["gib_per_device"].items() if k != "total")
    assert total == pytest.approx(rows)


def test_samples_per_prompt_and_async_rollouts_add_what_they_hold(planned, tiny_pair):
    extra = ["sampling.n=3", "train.async_rollouts=true"]
    more = plan(load_config(None, tiny_args(tiny_pair) + extra))["gib_per_device"]
    before = planned[1]["gib_per_device"]
    assert more["sampler_kv_cache"] == pytest.approx(3 * before["sampler_kv_cache"])  # 3x rows
    assert before["rollout_params"] == 0
    assert more["rollout_params"] == before["student_params"]  # the rollouts' own copy


def test_an_int8_teachers_row_is_the_bytes_of_its_quantised_weights(tiny_pair):
    config = load_config(None, [*tiny_args(tiny_pair), "teacher.quantize=int8"])
    result = plan(config)
    session = Session.build(config)
    planned = round(result["gib_per_device"]["teacher_params"] * GIB)
    assert planned == bytes_per_device(session.teacher_params)
    fp32 = plan(load_config(None, tiny_args(tiny_pair)))["gib_per_device"]["teacher_params"]
    assert planned < fp32 * GIB  # the blocks' weights at a quarter, embeddings as they were


def test_the_plan_reports_the_shared_vocabulary(planned):
    _, result, _ = planned
    assert result["vocab"] == {"shared": 320, "student_rows": 320, "teacher_rows": 320}


def test_stopping_at_release_adds_the_teachers_cache_and_the_watchers_buffers(tiny_pair):
    """The teacher's cache is the one :class:`~opd_jax.sampling.ReleaseWatch` fills, of the
    teacher's shape; without stopping neither row holds anything."""
    stop = ["sampling.stop_at_release=true", "sampling.compact_every=4"]
    config = load_config(None, tiny_args(tiny_pair) + stop)
    rows = plan(config)["gib_per_device"]
    cache = jax.eval_shape(lambda: KVCache.init(spec_config(config.teacher), B, P + N))
    expected = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (*cache.k, *cache.v))
    assert round(rows["teacher_kv_cache"] * GIB) == expected
    vocab = spec_config(config.student).vocab_size
    heads = spec_config(config.teacher).num_heads
    k = config.score.k  # the student's candidates recorded
    widest = min(N, (DEFERRED_LOOKS + 1) * config.sampling.compact_every)
    look = look_columns(B, vocab, widest)
    assert look == widest  # the tiny vocabulary fits the whole look
    assert round(rows["release_watch_buffers"] * GIB) == B * (
        (P + N) * (2 * k * 8 + 8) + 2 * 4 * vocab * look + 2 * 4 * heads * widest * (P + N)
    )
    off = plan(load_config(None, tiny_args(tiny_pair)))["gib_per_device"]
    assert off["teacher_kv_cache"] == off["release_watch_buffers"] == off["teacher_kept"] == 0


def test_the_step_planned_with_kept_hidden_states_takes_them_as_arguments(tiny_pair):
    """Under stopping, a loss that needs the teacher's distribution takes its final hidden
    states kept from sampling ``[B, N, D]`` and its unembedding instead of its K-sized scores;
    the plan counts what the batch keeps (``teacher_kept``)."""
    stop = ["sampling.stop_at_release=true", "sampling.compact_every=4"]
    planned = {
        loss: plan(load_config(None, tiny_args(tiny_pair) + stop + [f"loss.kind={loss}"]))
        for loss in ("sampled_reverse_kl", "reverse_kl")
    }
    config = load_config(None, tiny_args(tiny_pair) + stop)
    teacher = spec_config(config.teacher)
    scores = B * N * (4 + 4 * config.score.k * 4)  # q[y]; ids and values on S_t and the top-K
    hidden = B * N * teacher.hidden_size * 4
    unembedding = teacher.hidden_size * teacher.vocab_size * 4
    argument = {loss: p["compiled"]["argument_gib"] for loss, p in planned.items()}
    grown = round((argument["reverse_kl"] - argument["sampled_reverse_kl"]) * GIB)
    assert grown >= hidden + unembedding - scores
    kept = {loss: p["gib_per_device"]["teacher_kept"] for loss, p in planned.items()}
    assert round(kept["sampled_reverse_kl"] * GIB) == scores  # one device: the whole batch
    assert round(kept["reverse_kl"] * GIB) == hidden
