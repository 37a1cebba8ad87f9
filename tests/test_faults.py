"""What a run guarantees under faults and bad input (README, "What a run guarantees"), on the
tiny pair: non-finite steps, checkpoints read while training, full disks, resumes with changed
keys, and bad input that must be a message before any model is loaded."""

import errno
import os
import re
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import overrides

from opd_jax import cli
from opd_jax.config import ConfigError, load_config
from opd_jax.convert import convert
from opd_jax.data import PromptFileError
from opd_jax.train.checkpoint import Checkpointer
from opd_jax.train.loop import RunFailed, Status, train
from opd_jax.train.metrics import MetricsWriter, read_metrics
from opd_jax.train.session import Session

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
HUGE_LR = "optim.learning_rate=1.0e+38"  # step 1 is finite, its parameters ~1e38: step 2 is NaN
EVERY_STEP = "run.checkpoint_every=1"


def config(pair, run_dir, *extra):
    return load_config(None, overrides(pair, run_dir, *extra))


def saved_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def saved_arrays(run_dir, step: int) -> list[np.ndarray]:
    """Every array of checkpoint ``step`` (parameters, optimizer moments and counts)."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(run_dir / "checkpoints", options=options)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return [np.asarray(x) for x in jax.tree.leaves(manager.restore(step, args=args)["state"])]


def cli_train(pair, run_dir, *extra) -> int:
    """``opd-jax train`` of the tiny run (no compilation cache)."""
    (run_dir.parent / "empty.yaml").write_text("{}")
    sets = overrides(pair, run_dir, *extra, "run.compilation_cache=")
    return cli.main(["train", str(run_dir.parent / "empty.yaml"), *(f"--set={s}" for s in sets)])


def no_models(monkeypatch):
    """Loading a model fails the test: what it checks must come first."""

    def build(config):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Session, "build", build)


@pytest.fixture(scope="module")
def finished(tiny_pair, tmp_path_factory):
    """A finished 2-step run (cosine schedule, horizon train.steps), a checkpoint a step."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(config(tiny_pair, run, "train.steps=2", EVERY_STEP))
    return run


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run, for a test to resume or damage."""
    return shutil.copytree(finished, tmp_path / "run")


# 1. Non-finite steps.


def test_a_non_finite_step_stops_the_run_before_it_is_saved(tiny_pair, tmp_path, capsys):
    run = tmp_path / "run"
    extra = (HUGE_LR, "train.steps=4", EVERY_STEP, "run.keep_checkpoints=3")
    assert cli_train(tiny_pair, run, *extra) == cli.EXIT_FAILED
    assert re.search(r"step 2: .*not finite.*step 1 in .* is intact", capsys.readouterr().err)
    assert saved_steps(run) == [1]
    assert all(np.isfinite(x).all() for x in saved_arrays(run, 1))
    assert [line["step"] for line in read_metrics(run)] == [1, 2]  # The bad step is logged.


def test_skipped_non_finite_steps_leave_parameters_and_optimizer_state(tiny_pair, tmp_path):
    extra = (HUGE_LR, "train.on_nonfinite=skip", EVERY_STEP, "run.keep_checkpoints=5")
    result = train(config(tiny_pair, tmp_path, *extra))
    assert (result.status, result.step, result.skipped_steps) == (Status.FINISHED, 3, 2)
    assert [line["skipped_steps"] for line in read_metrics(tmp_path)] == [0, 1, 2]
    for a, b in zip(saved_arrays(tmp_path, 1), saved_arrays(tmp_path, 3), strict=True):
        np.testing.assert_array_equal(a, b)  # Adam's moments and step count included.
    with Checkpointer(tmp_path, read_only=True) as checkpointer:
        assert checkpointer.read_meta()[1]["skipped_steps"] == 2


# 2. Reading a run never writes to it.


def test_convert_leaves_a_save_in_progress_alone(run_copy, tmp_path):
    in_progress = run_copy / "checkpoints" / "3.orbax-checkpoint-tmp" / "state"
    in_progress.mkdir(parents=True)
    (in_progress / "manifest.ocdbt").write_bytes(b"being written")
    before = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))
    convert(run_copy, tmp_path / "hf")
    assert (in_progress / "manifest.ocdbt").read_bytes() == b"being written"
    assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == before


# 4. Full disks.


def test_a_failing_tensorboard_never_stops_the_run(tiny_pair, tmp_path, monkeypatch):
    from tensorboardX import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config(tiny_pair, tmp_path, "run.loggers=[tensorboard]"))
    assert result.status is Status.FINISHED
    assert [line["step"] for line in read_metrics(tmp_path)] == [1, 2, 3]
    assert sum("TensorBoard" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("target", ["metrics", "checkpoint"])
def test_a_full_disk_ends_the_run_with_the_last_checkpoint_intact(
    tiny_pair, tmp_path, monkeypatch, target
):
    cls, method = (MetricsWriter, "write") if target == "metrics" else (Checkpointer, "save")
    original = getattr(cls, method)

    def fails_at_step_2(self, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(cls, method, fails_at_step_2)
    with pytest.raises(RunFailed, match=r"step 2: .*No space left on device.*step 1 in .* intact"):
        train(config(tiny_pair, tmp_path, EVERY_STEP))
    monkeypatch.undo()
    assert saved_steps(tmp_path) == [1]
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "hf")]) == 0


# 5. Resuming: the trajectory keys must not change, unless allowed.


def test_raising_train_steps_on_the_default_cosine_horizon_is_refused(
    tiny_pair, run_copy, monkeypatch
):
    no_models(monkeypatch)
    before = (run_copy / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"optim.decay_steps: 2 -> 4.*set optim.decay_steps=2"):
        train(config(tiny_pair, run_copy, "train.steps=4"))
    assert (run_copy / "config.yaml").read_bytes() == before


def test_raising_train_steps_with_a_fixed_horizon_continues_the_same_run(
    tiny_pair, run_copy, tmp_path
):
    fixed = ("train.steps=4", "optim.decay_steps=2", EVERY_STEP)
    resumed = train(config(tiny_pair, run_copy, *fixed))
    straight = train(config(tiny_pair, tmp_path / "straight", *fixed))
    assert resumed.status is straight.status is Status.FINISHED
    losses = [[line["loss"] for line in read_metrics(r)] for r in (run_copy, tmp_path / "straight")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    for a, b in zip(saved_arrays(run_copy, 4), saved_arrays(tmp_path / "straight", 4), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        ("optim.learning_rate=0.001", "optim.learning_rate: 0.01 -> 0.001"),
        ("rule.kind=full", "rule.kind: 'release' -> 'full'"),
        ("loss.kind=forward_kl", "loss.kind: 'sampled_reverse_kl' -> 'forward_kl'"),
    ],
)
def test_a_resume_that_changes_the_trajectory_is_refused_before_loading(
    tiny_pair, run_copy, monkeypatch, change, listed
):
    no_models(monkeypatch)
    before = (run_copy / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=f"step 2 .*{listed}.*run.allow_changes=true"):
        train(config(tiny_pair, run_copy, "train.steps=2", change))
    assert (run_copy / "config.yaml").read_bytes() == before


def test_allowed_changes_warn_and_are_recorded(tiny_pair, run_copy):
    changed = ("train.steps=3", "optim.decay_steps=2", "optim.learning_rate=0.001")
    with pytest.warns(UserWarning, match="optim.learning_rate: 0.01 -> 0.001"):
        train(config(tiny_pair, run_copy, *changed, "run.allow_changes=true"))
    with Checkpointer(run_copy, read_only=True) as checkpointer:
        step, meta = checkpointer.read_meta()
    assert step == 3 and meta["config"]["optim"]["learning_rate"] == 0.001
    assert meta["config_changes"] == [
        {"step": 2, "changes": {"optim.learning_rate": [0.01, 0.001]}}
    ]
    assert load_config(run_copy / "config.yaml").optim.learning_rate == 0.001


def test_an_allowed_change_of_the_optimizer_structure_keeps_the_parameters(tiny_pair, run_copy):
    """clip_norm 1 -> 0 drops the clipping stage from the optimizer state: the parameters,
    step and data position are restored, the optimizer state starts fresh, said once."""
    changed = ("train.steps=3", "optim.decay_steps=2", "optim.clip_norm=0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config(tiny_pair, run_copy, *changed, "run.allow_changes=true"))
    said = " ".join(str(w.message) for w in caught)
    assert "optimizer state (moments, schedule count) starts fresh" in said
    assert "unreadable" not in said
    assert result.status is Status.FINISHED and result.step == 3
    assert [line["step"] for line in read_metrics(run_copy)] == [1, 2, 3]


def test_a_bug_is_reported_as_a_failure_not_as_bad_input(tiny_pair, tmp_path, monkeypatch, capsys):
    def build(config):
        raise KeyError("params")

    monkeypatch.setattr(Session, "build", build)
    assert cli_train(tiny_pair, tmp_path / "run") == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("opd-jax train: failed: KeyError: 'params' (not a problem with the input")


def test_keys_that_keep_the_trajectory_may_change(tiny_pair, run_copy):
    free = (
        "train.steps=2", "run.log_every=2", "run.keep_checkpoints=5", "train.attention=xla",
        "train.remat=true", "score.chunk_size=4", "train.on_nonfinite=skip",
    )  # fmt: skip
    assert train(config(tiny_pair, run_copy, *free)).status is Status.UP_TO_DATE


def test_nothing_to_do_says_how_to_continue_on_the_same_schedule(tiny_pair, finished, capsys):
    assert cli_train(tiny_pair, finished, "train.steps=2", EVERY_STEP) == 0
    out = capsys.readouterr().out
    assert "already at step 2" in out and "set optim.decay_steps=2" in out


# 6. config.yaml is written only for a run that can start.


def test_an_invalid_config_leaves_config_yaml_and_convert_working(
    tiny_pair, run_copy, tmp_path, monkeypatch
):
    import dataclasses

    from opd_jax.config import ModelSpec

    before = (run_copy / "config.yaml").read_bytes()
    good = config(tiny_pair, run_copy, "train.steps=2")
    with pytest.raises(ConfigError, match="student.path and teacher.path"):
        train(dataclasses.replace(good, student=ModelSpec(path="")))
    no_models(monkeypatch)
    moved = config(
        tiny_pair, run_copy, "train.steps=2", "run.allow_changes=true", "student.path=gone"
    )
    with pytest.raises(FileNotFoundError, match="student.path=gone: nothing there"):
        train(moved)
    assert (run_copy / "config.yaml").read_bytes() == before
    monkeypatch.undo()
    convert(run_copy, tmp_path / "hf")


# Bad input: a message naming the problem and the fix, before any model is loaded.


def test_an_empty_prompt_file_fails_before_any_model_loads(tiny_pair, tmp_path, monkeypatch):
    no_models(monkeypatch)
    (tmp_path / "prompts.jsonl").write_text("\n")
    source = (f"data.source={tmp_path / 'prompts.jsonl'}", "data.split=prompts")
    args = [a for a in overrides(tiny_pair, tmp_path / "run", *source) if "arithmetic" not in a]
    with pytest.raises(PromptFileError, match="prompts.jsonl: no records"):
        train(load_config(None, args))


def test_a_model_directory_without_tokenizer_fails_before_any_model_loads(
    tiny_pair, tmp_path, monkeypatch
):
    no_models(monkeypatch)
    teacher = shutil.copytree(tiny_pair / "teacher", tmp_path / "teacher")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"teacher.path: .* holds no tokenizer"):
        train(config(tiny_pair, tmp_path / "run", f"teacher.path={teacher}"))


def test_an_unwritable_run_dir_is_a_config_error(tiny_pair, tmp_path, monkeypatch):
    no_models(monkeypatch)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="run.dir=.*file/run is not writable"):
        train(config(tiny_pair, tmp_path / "file" / "run"))
