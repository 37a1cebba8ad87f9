"""The trainer end to end on tiny models: every rule, resume exactness, sharding, refusals."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from opd_jax import core
from opd_jax.config import ConfigError, load_config
from opd_jax.models.scratch import init_checkpoint
from opd_jax.models.testing import tiny_hf_config, train_tiny_tokenizer
from opd_jax.train.loop import Status, train
from opd_jax.train.metrics import read_metrics
from tests.xla_flags import with_devices

SMALL = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=48)


@pytest.fixture(scope="session")
def pair(tiny_pair):
    return tiny_pair


def overrides(pair, run_dir, *extra):
    return [
        f"student.path={pair / 'student'}",
        f"teacher.path={pair / 'teacher'}",
        f"run.dir={run_dir}",
        "run.progress=false",
        "run.loggers=[]",
        f"data.data_dir={pair / 'data'}",
        "data.batch_size=2",
        "data.max_prompt_tokens=96",
        "data.arithmetic={train_size: 32, test_size: 4, test_long_size: 4, test_unseen_op_size: 4}",
        "sampling.max_new_tokens=12",
        "score.chunk_size=8",
        "optim.learning_rate=0.01",
        "train.steps=3",
        *extra,
    ]


@pytest.mark.parametrize("rule", sorted(core.RULES))
def test_every_rule_trains_three_steps(pair, tmp_path, rule):
    metrics = train(load_config(None, overrides(pair, tmp_path, f"rule.kind={rule}"))).metrics
    lines = read_metrics(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert 0 < metrics["kept_fraction"] <= 1
    assert len(lines[-1]["margin_by_position"]) == 20
    assert (tmp_path / "config.yaml").exists()


def _params(run_dir):
    """The student parameters of a run's last checkpoint, as NumPy."""
    from opd_jax.train.checkpoint import restore_student

    model, _ = restore_student(run_dir)
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(pair, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(None, overrides(pair, straight, "train.steps=6")))
    stopped = train(load_config(None, overrides(pair, resumed, "train.steps=6")), stop_after=3)
    assert (stopped.status, stopped.step) == (Status.STOPPED, 3)
    assert [line["step"] for line in read_metrics(resumed)] == [1, 2, 3]
    config = load_config(None, overrides(pair, resumed, "train.steps=6"))
    train(config)
    losses = [[line["loss"] for line in read_metrics(run)] for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    flat = [jax.tree.leaves(_params(run)) for run in (straight, resumed)]
    for a, b in zip(*flat, strict=True):
        np.testing.assert_array_equal(a, b)


def test_eight_device_mesh_gives_the_single_device_loss(pair, tmp_path):
    args = overrides(pair, tmp_path / "one", "data.batch_size=4", "sampling.temperature=0")
    single = train(load_config(None, args)).metrics
    script = textwrap.dedent(
        f"""
        import json
        from opd_jax.config import load_config
        from opd_jax.train.loop import Status, train
        args = {args!r}
        args = [a.replace("one", "eight") for a in args]
        args += ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
        print(json.dumps(train(load_config(None, args)).metrics))
        """
    )
    env = os.environ | {"XLA_FLAGS": with_devices(8)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    eight = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("loss", "grad_norm", "kept_fraction", "advantage_mean"):
        np.testing.assert_allclose(eight[key], single[key], rtol=2e-4, atol=1e-5)


def test_teacher_with_another_tokenizer_is_refused_before_training(pair, tmp_path):
    other = train_tiny_tokenizer(vocab_size=300)
    init_checkpoint(tmp_path / "other", tiny_hf_config("qwen3", **SMALL), other, seed=2)
    config = load_config(
        None, overrides(pair, tmp_path / "run", f"teacher.path={tmp_path / 'other'}")
    )
    with pytest.raises(ValueError, match="tokenizers differ"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rule.knd=full", "Did you mean 'rule.kind'"),
        ("trian.steps=3", "Did you mean 'train.steps'"),
        ("rule.kind=relase", "Did you mean 'release'"),
        ("rule.options.ratoi=0.1", "Did you mean 'rule.options.ratio'"),
        ("train.steps=three", "train.steps must be int"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("score.k=8", "margin_k=16 exceeds score.k=8"),
        ("optim.accumulate=3", "multiple of optim.accumulate"),
        ("loss.kind=kl", "loss.kind='kl' is not one of"),
        ("rule.options.eps=abc", "rule.options.eps must be float, got 'abc'"),
        ("rule.options.margin_k=2.5", "rule.options.margin_k must be int"),
        ("sampling.temperature=-1", r"sampling.temperature must be >= 0 \(0 is greedy\)"),
        ("sampling.top_p=5", r"sampling.top_p must be in \(0, 1\]"),
        ("sampling.top_k=-3", "sampling.top_k must be >= 0"),
        ("optim.learning_rate=fast", "optim.learning_rate must be float, got 'fast'"),
        ("optim.decay_steps=-1", "optim.decay_steps must be >= 0"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite='ignore' is not one of"),
        ("data.source=prompts.jsonl", "remove the data.arithmetic section"),
        ("train.steps=[1", r"--set train.steps=\[1: invalid YAML"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(pair, tmp_path, override, message):
    args = overrides(pair, tmp_path, "rule.kind=ta_opd" if "ratoi" in override else "seed=0")
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*args, override])


def test_gradient_accumulation_runs_micro_batches(pair, tmp_path):
    metrics = train(
        load_config(None, overrides(pair, tmp_path, "data.batch_size=4", "optim.accumulate=2"))
    ).metrics
    assert np.isfinite(metrics["loss"])


def test_chunked_attention_and_remat_train_like_the_plain_step(pair, tmp_path):
    plain = train(
        load_config(None, overrides(pair, tmp_path / "plain", "train.attention=xla"))
    ).metrics
    lean_settings = ("train.attention=xla", "train.attention_chunk=16", "train.remat=true")
    lean = train(load_config(None, overrides(pair, tmp_path / "lean", *lean_settings))).metrics
    for name in ("loss", "grad_norm", "kept_fraction"):
        np.testing.assert_allclose(lean[name], plain[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["cudnn", "flash"])
def test_packed_attention_trains_like_the_masked_scores(pair, tmp_path, monkeypatch, kind):
    """ "flash", and the "cudnn" path's packing run with XLA's kernel on CPU (where
    `resolve_attention` refuses "cudnn"; it is tested apart)."""
    from opd_jax import models
    from opd_jax.models import attention

    monkeypatch.setattr(attention, "_PACKED_IMPLEMENTATION", "xla")
    monkeypatch.setattr(models, "resolve_attention", lambda kind, dtypes, chunk=0: kind)
    train(load_config(None, overrides(pair, tmp_path / "plain", "train.attention=xla")))
    train(load_config(None, overrides(pair, tmp_path / kind, f"train.attention={kind}")))
    plain, packed = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / kind)
    assert [line["step"] for line in packed] == [line["step"] for line in plain] == [1, 2, 3]
    # Step 1: the same parameters and rollouts; the kernels differ in float32 summation order
    # alone (~1e-7 relative per logit), so the loss (a mean of O(1) terms) agrees to 1e-5.
    for name in ("loss", "grad_norm", "kept_fraction"):
        np.testing.assert_allclose(packed[0][name], plain[0][name], rtol=1e-5, atol=1e-5)
    # Later steps compare training, not arithmetic: Adam turns a rounding-level difference in
    # a near-zero gradient component into a step of up to the learning rate (0.01), so the
    # losses drift apart by ~1e-5 per step; 1e-3 is a tenth of the learning rate.
    for p, q in zip(plain[1:], packed[1:], strict=True):
        np.testing.assert_allclose(q["loss"], p["loss"], atol=1e-3)
        np.testing.assert_allclose(q["grad_norm"], p["grad_norm"], rtol=1e-2)


def test_a_negative_attention_chunk_is_refused(pair, tmp_path):
    with pytest.raises(ConfigError, match="train.attention_chunk must be >= 0"):
        load_config(None, overrides(pair, tmp_path, "train.attention_chunk=-1"))


def test_cudnn_attention_with_query_chunks_is_refused(pair, tmp_path):
    extra = ("train.attention=cudnn", "train.attention_chunk=16")
    with pytest.raises(
        ConfigError, match="train.attention_chunk applies to train.attention xla and flash"
    ):
        load_config(None, overrides(pair, tmp_path, *extra))


def test_cudnn_attention_off_gpu_is_refused_before_loading(pair, tmp_path):
    config = load_config(None, overrides(pair, tmp_path, "train.attention=cudnn"))
    with pytest.raises(ValueError, match="'cudnn' needs a CUDA GPU"):
        train(config)


def test_several_samples_per_prompt_train(pair, tmp_path):
    extra = ("sampling.n=3", "optim.accumulate=2", "sampling.compact_every=2")
    metrics = train(load_config(None, overrides(pair, tmp_path, *extra))).metrics
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


@pytest.mark.parametrize(
    "setting, message",
    [
        ("sampling.n=0", "sampling.n must be >= 1, got 0"),
        ("sampling.compact_every=-1", "sampling.compact_every must be >= 0"),
    ],
)
def test_bad_sample_counts_are_refused(pair, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides(pair, tmp_path, setting))


def test_each_step_offers_its_freed_memory_back_after_sampling_and_after_the_update(
    pair, tmp_path, monkeypatch
):
    from opd_jax.train import loop

    calls = []
    monkeypatch.setattr(loop, "release_unused", lambda: calls.append(1) or 0)
    train(load_config(None, overrides(pair, tmp_path, "rule.kind=full")))
    assert len(calls) == 2 * 3  # opd_jax.heap bounds the kept heap at these points
