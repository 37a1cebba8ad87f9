"""Tests for opd_jax.train.checkpoint: round trips, pruning, fallback past corruption, SIGTERM."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opd_jax.train.checkpoint import (
    Checkpointer,
    CheckpointRestoreError,
    fingerprint,
)
from opd_jax.train.stop_signals import on_stop_signals

# A failed orbax restore leaves pending array reads and loop callbacks behind; they complain
# (as unraisable exceptions) when collected, in whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(seed: int = 0) -> dict[str, jax.Array]:
    """Random leaves big enough (> 1 KiB) to be stored in their own data files."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.normal(size=(32, 48)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(48,)), jnp.bfloat16),
        },
        "count": jnp.asarray(rng.integers(0, 1000, size=(7,)), jnp.int32),
        "key": jax.random.key(seed),
    }


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def as_bytes(x: jax.Array) -> tuple[str, bytes]:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return str(x.dtype), np.asarray(x).tobytes()


def assert_bit_exact(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert as_bytes(a) == as_bytes(e)


def save_steps(run_dir: Path, steps, *, keep: int = 5) -> None:
    with Checkpointer(run_dir, keep=keep) as ckpt:
        for step in steps:
            ckpt.save(step, make_state(step), {"position": step, "config": "abc"})


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / str(step)


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_round_trip_is_bit_exact_with_meta(tmp_path):
    state = make_state(3)
    meta = {"data": {"epoch": 1, "index": 42}, "config_hash": "f00d", "seed": 3}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.save(7, state, meta)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        step, restored, restored_meta = ckpt.restore(abstract(state))
    assert step == 7 and restored_meta == meta
    assert_bit_exact(restored, state)


def test_a_relative_run_directory_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(4.0)}
    with Checkpointer("runs/relative", keep=2) as checkpointer:
        checkpointer.save(1, state, {"data": 1})
    with Checkpointer("runs/relative", keep=2) as checkpointer:
        step, restored, meta = checkpointer.restore(jax.tree.map(jnp.zeros_like, state))
    assert step == 1 and meta == {"data": 1}
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert (tmp_path / "runs" / "relative" / "checkpoints" / "1").is_dir()


def test_keeps_only_the_last_k_steps(tmp_path):
    save_steps(tmp_path, range(5), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]


def test_async_save_is_committed_after_wait(tmp_path):
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        ckpt.save(1, make_state(1), {"position": 1})
        ckpt.wait()
        assert ckpt.latest_step() == 1
        assert (step_dir(tmp_path, 1) / "state").is_dir()


def test_restores_nnx_state_into_sharded_target(tmp_path):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def make_optimizer():
        return nnx.Optimizer(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), optax.adam(1e-3), wrt=nnx.Param)

    state = nnx.state(make_optimizer())
    with Checkpointer(tmp_path, keep=1, async_save=False) as ckpt:
        ckpt.save(0, state, {})
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            nnx.state(nnx.eval_shape(make_optimizer)),
        )
        restored = ckpt.restore(target)
    assert isinstance(restored.state, nnx.State)
    assert_bit_exact(restored.state, state)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored.state))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_corrupt_newest_array_file_falls_back_to_previous_step(tmp_path, damage):
    save_steps(tmp_path, [1, 2])
    victim = largest_file(step_dir(tmp_path, 2) / "state")
    if damage == "delete":
        victim.unlink()
    else:
        os.truncate(victim, victim.stat().st_size // 2)
    with Checkpointer(tmp_path, keep=5) as ckpt:
        with pytest.warns(UserWarning, match="step 2"):
            step, state, meta = ckpt.restore(abstract(make_state()))
        assert (step, meta["position"]) == (1, 1)
        assert_bit_exact(state, make_state(1))
        assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()
        assert ckpt.save(2, make_state(2), {"position": 2})  # The bad step no longer blocks.


def test_garbled_meta_json_falls_back_to_previous_step(tmp_path):
    save_steps(tmp_path, [1, 2])
    (step_dir(tmp_path, 2) / "meta" / "metadata").write_text('{"position": 2, "conf')
    with Checkpointer(tmp_path, keep=5) as ckpt, pytest.warns(UserWarning, match="step 2"):
        assert ckpt.restore(abstract(make_state())).step == 1


def test_leftover_temporary_directory_is_ignored(tmp_path):
    save_steps(tmp_path, [1])
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "manifest.ocdbt").write_bytes(b"\x00garbage")
    with Checkpointer(tmp_path, keep=5) as ckpt:
        assert ckpt.restore(abstract(make_state())).step == 1
        assert ckpt.save(2, make_state(2), {"position": 2})
        ckpt.wait()
        assert ckpt.restore(abstract(make_state())).step == 2


def test_save_killed_midway_keeps_last_good_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from tests.test_checkpoint import make_state
        from opd_jax.train.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r}, keep=5)
        for step in (1, 2):
            ckpt.save(step, make_state(step), {{"position": step}})
        os.kill(os.getpid(), signal.SIGKILL)  # Step 2 is still being written.
        """
    )
    root = Path(__file__).parent.parent  # where `tests` is importable
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=False, cwd=root
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with Checkpointer(tmp_path, keep=5) as ckpt:
        step, state, meta = ckpt.restore(abstract(make_state()))
    assert step in (1, 2) and meta == {"position": step}
    assert_bit_exact(state, make_state(step))


def test_unserialisable_meta_raises_before_writing(tmp_path):
    with Checkpointer(tmp_path, keep=1) as ckpt, pytest.raises(TypeError):
        ckpt.save(1, make_state(), {"iterator": object()})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_no_checkpoint_restores_none(tmp_path):
    with Checkpointer(tmp_path, keep=1) as ckpt:
        assert ckpt.restore(abstract(make_state())) is None


def test_every_checkpoint_corrupt_raises_and_moves_nothing(tmp_path):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (step_dir(tmp_path, step) / "meta" / "metadata").write_text("not json")
    with Checkpointer(tmp_path, keep=5) as ckpt, pytest.warns(UserWarning):
        with pytest.raises(CheckpointRestoreError, match="step 2: .*step 1: "):
            ckpt.restore(abstract(make_state()))
    assert step_dir(tmp_path, 2).is_dir() and not (tmp_path / "checkpoints_corrupt").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_sets_the_flag_and_the_previous_handler_comes_back(signum):
    def previous(signum, frame):
        del signum, frame

    original = signal.signal(signum, previous)
    try:
        with on_stop_signals() as flag:
            assert not flag.requested
            os.kill(os.getpid(), signum)
            assert flag.requested and flag.signum == signum
            assert flag.interrupted == (signum == signal.SIGINT)
        assert signal.getsignal(signum) is previous
    finally:
        signal.signal(signum, original)


def test_a_second_ctrl_c_abandons_the_step_in_flight():
    with on_stop_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_save_leaves_no_temporary_directory(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Checkpointer(tmp_path, keep=5, async_save=False) as ckpt:
            ckpt.save(1, make_state(), {"data": 1})
            partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123"
            partial.mkdir()
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def flip_bytes(path: Path, count: int = 64) -> None:
    """Inverts ``count`` bytes in the middle of ``path``, keeping its size."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 - count // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_an_array_file_fall_back_to_the_previous_step(tmp_path):
    save_steps(tmp_path, [1, 2])
    victim = largest_file(step_dir(tmp_path, 2) / "state")
    size = victim.stat().st_size
    flip_bytes(victim)
    assert victim.stat().st_size == size
    # Where the flip lands depends on the data file's layout: in compressed bytes the read
    # fails, in raw ones the values change and only the fingerprint sees it. Both fall back.
    with Checkpointer(tmp_path, keep=5) as ckpt:
        with pytest.warns(UserWarning, match="step 2 .*(fingerprint|unreadable)"):
            step, state, meta = ckpt.restore(abstract(make_state()))
    assert (step, meta) == (1, {"position": 1, "config": "abc"})
    assert_bit_exact(state, make_state(1))
    assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()


def test_readable_arrays_that_differ_from_the_fingerprint_fall_back(tmp_path):
    save_steps(tmp_path, [1, 2, 3])
    # Step 3's arrays replaced by step 2's: every file reads, only the values are wrong.
    shutil.rmtree(step_dir(tmp_path, 3) / "state")
    shutil.copytree(step_dir(tmp_path, 2) / "state", step_dir(tmp_path, 3) / "state")
    with Checkpointer(tmp_path, keep=5) as ckpt:
        with pytest.warns(UserWarning, match="step 3 .*fingerprint"):
            step, state, meta = ckpt.restore(abstract(make_state()))
    assert (step, meta) == (2, {"position": 2, "config": "abc"})
    assert_bit_exact(state, make_state(2))
    assert (tmp_path / "checkpoints_corrupt" / "3").is_dir()


def test_fingerprint_is_exact_and_sees_one_changed_bit():
    state = make_state(4)
    assert fingerprint(state) == fingerprint(jax.tree.map(jnp.copy, state))
    w = np.asarray(state["params"]["w"]).copy()
    w.view(np.uint32)[3, 5] ^= 1
    changed = fingerprint(state | {"params": state["params"] | {"w": jnp.asarray(w)}})
    assert changed != fingerprint(state)
    # Swapping two values keeps the plain sum; the position-weighted one tells them apart.
    swapped = np.asarray(state["params"]["w"]).copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    moved = fingerprint(state | {"params": state["params"] | {"w": jnp.asarray(swapped)}})
    (_, plain, weighted), (_, plain_0, weighted_0) = moved[-1], fingerprint(state)[-1]
    assert plain == plain_0 and weighted != weighted_0


def test_read_only_restore_keeps_temporary_and_corrupt_steps_in_place(tmp_path):
    save_steps(tmp_path, [1, 2])
    flip_bytes(largest_file(step_dir(tmp_path, 2) / "state"))
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
    partial.mkdir()
    with Checkpointer(tmp_path, read_only=True) as ckpt, pytest.warns(UserWarning, match="step 2"):
        assert ckpt.restore(abstract(make_state())).step == 1
    assert partial.is_dir() and step_dir(tmp_path, 2).is_dir()
    assert not (tmp_path / "checkpoints_corrupt").exists()


def test_read_meta_reads_the_newest_readable_meta_alone(tmp_path):
    save_steps(tmp_path, [1, 2, 3])
    (step_dir(tmp_path, 3) / "meta" / "metadata").write_text("not json")
    largest_file(step_dir(tmp_path, 2) / "state").unlink()  # The state is not read.
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.read_meta() == (2, {"position": 2, "config": "abc"})
