"""Logical-axis rules, and sharded runs on 8 fake CPU devices equal single-device runs.

The 8-device checks run this file as a script in a subprocess, because the device count
is fixed when jax starts (`XLA_FLAGS=--xla_force_host_platform_device_count=8`).
"""

import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from opd_jax import sharding
from opd_jax.models import Decoder, ModelConfig, testing


def test_rules_map_logical_axes_to_mesh_axes():
    rules = sharding.ShardingRules()
    assert rules.spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    assert rules.spec(("batch", None)) == PartitionSpec(("data", "fsdp"), None)
    assert sharding.ShardingRules(mlp=None).spec(("embed", "mlp")) == PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match="Unknown logical axis 'heads'"):
        rules.spec(("heads",))


def test_make_mesh_has_the_three_axes():
    mesh = sharding.make_mesh({"data": 1})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        sharding.make_mesh({"model": 1})


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_every_parameter_names_its_axes(model_type):
    config = ModelConfig.from_hf(testing.tiny_hf_config(model_type))
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    axes = sharding.logical_axes(params)
    for (path, var), (_, names) in zip(
        nnx.to_flat_state(params), nnx.to_flat_state(axes), strict=True
    ):
        assert names is not None and len(names) == var.ndim, path
    shardings = sharding.param_shardings(model, sharding.make_mesh({}))
    assert shardings["layers"][0]["mlp"]["down_proj"].spec == PartitionSpec("tensor", "fsdp")
    assert shardings["embed"].spec == PartitionSpec("tensor", "fsdp")


def test_sharded_runs_on_8_devices_equal_single_device():
    from tests.xla_flags import with_devices

    env = dict(os.environ, XLA_FLAGS=with_devices(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "SHARDED OK" in proc.stdout


def _sharded_checks() -> None:
    """Loads a checkpoint straight into a (2, 2, 2) mesh; forward and sampler as on 1 device."""
    from opd_jax import models, sampling

    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with tempfile.TemporaryDirectory() as tmp:
        path = testing.write_tiny_checkpoint(
            tmp,
            testing.tiny_hf_config("qwen2"),
            scale=4.0,
            tokenizer=testing.train_tiny_tokenizer(),
        )
        single, _ = models.load(path)
        sharded, _ = models.load(path, mesh=mesh)

    q_proj = sharded.layers[0].attn.q_proj[...]
    assert q_proj.sharding.spec == PartitionSpec("fsdp", "tensor", None), q_proj.sharding
    assert q_proj.addressable_shards[0].data.shape == (16, 2, 16)
    assert sharded.embed[...].addressable_shards[0].data.shape == (160, 16)

    tokens = np.random.RandomState(0).randint(0, 320, (4, 16)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0
    batch = sharding.DEFAULT_RULES.sharding(mesh, ("batch", None))
    forward = nnx.jit(lambda m, t, a: m(t, attention_mask=a))
    with jax.set_mesh(mesh):  # activates the model's activation sharding constraints
        logits = forward(sharded, *jax.device_put((jnp.asarray(tokens), jnp.asarray(mask)), batch))
    expected = forward(single, jnp.asarray(tokens), jnp.asarray(mask))
    # sums split over devices are reassociated: float32 rounding, |logits| up to ~10 here
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=5e-4)
    assert logits.sharding.spec[0] == ("data", "fsdp"), logits.sharding

    for method in (sampling.TopP(0.9),):  # stochastic: keys and noise must agree too
        kwargs = dict(key=jax.random.key(0), max_new_tokens=8, method=method, eos_ids=(1,))
        got = sampling.sample(sharded, tokens[:, :8], mask[:, :8], mesh=mesh, **kwargs)
        want = sampling.sample(single, tokens[:, :8], mask[:, :8], **kwargs)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.response_mask, want.response_mask)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=5e-4)
        assert len(got.tokens.sharding.device_set) == 8

    # finished rows dropped from the sharded loop (16 rows -> 8 -> 4 over 4 batch shards)
    rows = np.random.RandomState(1).randint(0, 320, (16, 8)).astype(np.int32)
    kwargs = dict(key=jax.random.key(2), max_new_tokens=8, eos_ids=tuple(range(0, 320, 2)))
    kwargs["method"] = sampling.Temperature(1.0)
    got = sampling.sample(sharded, rows, mesh=mesh, compact_every=1, **kwargs)
    want = sampling.sample(single, rows, compact_every=0, **kwargs)
    assert 1 < len(set(np.asarray(want.lengths).tolist())), want.lengths
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.response_mask, want.response_mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=5e-4)

    # release-aware sampling on the mesh: the teacher's margins as on one device, its cache
    # still split over the batch after rows were dropped
    def watch(teacher):
        return sampling.ReleaseWatch(
            teacher, None, max_new_tokens=8, segments=("fixed", 2), rule_options={},
            min_gain=1e30,
        )  # fmt: skip

    on_mesh, alone = watch(sharded), watch(single)
    got = sampling.sample(sharded, rows, mesh=mesh, compact_every=2, watcher=on_mesh, **kwargs)
    want = sampling.sample(single, rows, compact_every=2, watcher=alone, **kwargs)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(on_mesh.margin, alone.margin, atol=1e-3)
    assert on_mesh.cache.k[0].shape[0] < 16, "no row was dropped"
    assert not on_mesh.cache.k[0].sharding.is_fully_replicated, on_mesh.cache.k[0].sharding

    class StopEven:  # stops the even result rows at the first look (the loop decoded on)
        k, looked = 0, False

        def start(self, *args):
            pass

        def look(self, seen, prompt_len, made):
            stop = ~self.looked & (np.asarray(seen.rows_R) % 2 == 0) & ~np.asarray(seen.done_R)
            self.looked = True
            return stop

        def take(self, index, seen):
            pass

    got = sampling.sample(sharded, rows, mesh=mesh, compact_every=2, watcher=StopEven(), **kwargs)
    want = sampling.sample(single, rows, compact_every=2, watcher=StopEven(), **kwargs)
    assert (np.asarray(want.lengths)[::2] <= 3).all(), want.lengths  # the prefill's token + 2
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.response_mask, want.response_mask)

    model = sharding.shard_model(Decoder(single.config, rngs=nnx.Rngs(1)), mesh)
    assert model.lm_head[...].sharding.spec == PartitionSpec("fsdp", "tensor")
    print("SHARDED OK")


if __name__ == "__main__":
    _sharded_checks()
