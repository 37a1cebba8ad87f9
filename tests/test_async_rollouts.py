"""`train.async_rollouts`: step t+1's rollouts are sampled from step t's parameters while step
t's update runs, on the training mesh or on devices set apart (`mesh.rollout`)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from test_train import overrides as train_overrides

from opd_jax.config import load_config
from opd_jax.train import loop
from opd_jax.train.loop import train
from opd_jax.train.metrics import read_metrics
from tests.xla_flags import with_devices

ASYNC = "train.async_rollouts=true"


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair


def overrides(pair, run_dir, *extra):
    """test_train's tiny run, four steps long."""
    return train_overrides(pair, run_dir, "train.steps=4", *extra)


def fingerprint(params) -> float:
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))


def run(pair, run_dir, *extra, monkeypatch):
    """Trains; returns the metrics lines, the parameters each step's rollouts were sampled
    from and the parameters after each step (fingerprints; index 0: before training)."""
    sampled, after = {}, []
    sample = loop._Run.sample

    def recording(self, step, prompts, params=None):
        sampled[step] = fingerprint(self.session.params if params is None else params)
        return sample(self, step, prompts, params)

    monkeypatch.setattr(loop._Run, "sample", recording)
    train(
        load_config(None, overrides(pair, run_dir, *extra)),
        on_step=lambda n, session: after.append(fingerprint(session.params)),
    )
    return read_metrics(run_dir), [sampled[s] for s in sorted(sampled)], after


def test_step_t_plus_1_is_sampled_from_the_parameters_of_step_t(pair, tmp_path, monkeypatch):
    lines, sampled, after = run(pair, tmp_path / "async", ASYNC, monkeypatch=monkeypatch)
    assert [line["rollout_staleness"] for line in lines] == [0, 1, 1, 1]
    # step 0 from the initial parameters; step s >= 1 from those before step s - 1's update
    assert sampled == [after[0], after[0], after[1], after[2]]
    assert len(set(after)) == 5  # the parameters did move
    sync_lines, sync_sampled, _ = run(pair, tmp_path / "sync", monkeypatch=monkeypatch)
    assert [line["rollout_staleness"] for line in sync_lines] == [0, 0, 0, 0]
    assert sync_lines[0]["loss"] == lines[0]["loss"]  # the same first step
    assert sync_lines[1]["loss"] != lines[1]["loss"]  # then one step off-policy


def test_at_learning_rate_zero_async_rollouts_equal_synchronous_ones(pair, tmp_path, monkeypatch):
    lr0 = "optim.learning_rate=0"
    async_lines, *_ = run(pair, tmp_path / "async", ASYNC, lr0, monkeypatch=monkeypatch)
    sync_lines, *_ = run(pair, tmp_path / "sync", lr0, monkeypatch=monkeypatch)
    for a, s in zip(async_lines, sync_lines, strict=True):
        for key in ("loss", "grad_norm", "kept_fraction", "response_tokens"):
            assert a[key] == s[key], (key, a["step"])


def test_an_async_run_resumes_with_the_prompts_it_had_not_trained_on(pair, tmp_path):
    whole = tmp_path / "whole"
    train(load_config(None, overrides(pair, whole, ASYNC, "optim.learning_rate=0")))
    parts = tmp_path / "parts"
    config = load_config(None, overrides(pair, parts, ASYNC, "optim.learning_rate=0"))
    assert train(config, stop_after=2).status is loop.Status.STOPPED
    train(config)
    # the prefetched (unused) prompts of step 3 are drawn again after the resume
    a, b = read_metrics(whole), read_metrics(parts)
    assert [line["loss"] for line in a] == [line["loss"] for line in b]
    assert [line["rollout_staleness"] for line in b] == [0, 1, 0, 1]


def test_rollouts_on_devices_set_apart_train_like_synchronous_ones(pair, tmp_path):
    """8 CPU devices: training on 4 (fsdp), rollouts on the other 4 (rows over them), with
    and without async rollouts; at learning rate 0 the metrics equal a synchronous run on all
    8 (fsdp 4 x tensor 2)."""
    args = overrides(pair, tmp_path / "apart", "optim.learning_rate=0", "data.batch_size=4")
    script = textwrap.dedent(
        f"""
        import json, jax
        from opd_jax.config import load_config
        from opd_jax.train.loop import train
        from opd_jax.train.metrics import read_metrics
        from opd_jax.train.session import mesh_from_config, rollout_mesh_from_config
        args = {args!r}
        config = load_config(None, args + ["train.async_rollouts=true", "mesh.rollout=4"])
        mesh = mesh_from_config(config)
        rollout = rollout_mesh_from_config(config, mesh)
        assert not set(mesh.devices.flat) & set(rollout.devices.flat)
        assert mesh.devices.size == rollout.devices.size == 4
        train(config)
        apart = read_metrics(config.run.dir)
        sync = load_config(None, [a.replace("apart", "sync") for a in args] + ["mesh.tensor=2"])
        train(sync)
        set_apart = [a.replace("apart", "set_apart") for a in args]
        set_apart = load_config(None, set_apart + ["mesh.rollout=4"])
        train(set_apart)
        print(json.dumps([apart, read_metrics(sync.run.dir), read_metrics(set_apart.run.dir)]))
        """
    )
    env = os.environ | {"XLA_FLAGS": with_devices(8)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    apart, sync, set_apart = json.loads(out.stdout.strip().splitlines()[-1])
    assert [line["rollout_staleness"] for line in apart] == [0, 1, 1, 1]
    assert [line["rollout_staleness"] for line in set_apart] == [0, 0, 0, 0]
    for a, s in [*zip(apart, sync, strict=True), *zip(set_apart, sync, strict=True)]:
        # the same samples; the loss summed over 4 devices instead of 8 (float32 order)
        assert a["response_tokens"] == s["response_tokens"]
        np.testing.assert_allclose(a["loss"], s["loss"], rtol=1e-5, atol=1e-6)
