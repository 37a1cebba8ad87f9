"""`opd_jax.run_lock`: one run directory, one process; a dead holder leaves no stale lock."""

import json
import socket
import subprocess
import sys

import pytest

from opd_jax.run_lock import LOCK_FILE, RunDirLocked, hold, holder
from opd_jax.typed_yaml import ConfigError

HOLD_AND_SLEEP = """
import sys, time
from opd_jax.run_lock import hold
with hold(sys.argv[1], "opd-jax train"):
    print("held", flush=True)
    time.sleep(120)
"""

TRY_TO_HOLD = """
import sys
from opd_jax.run_lock import RunDirLocked, hold
try:
    with hold(sys.argv[1], "opd-jax experiment"):
        print("held")
except RunDirLocked as error:
    print(error)
"""


@pytest.fixture
def holding_process(tmp_path):
    """A separate process holding ``tmp_path / "run"``; killed (SIGKILL) at teardown."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_SLEEP, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc, run
    proc.kill()
    proc.wait()


def test_a_second_holder_is_refused_with_the_holders_pid_and_host(holding_process):
    proc, run = holding_process
    who = f"`opd-jax train` (PID {proc.pid} on host {socket.gethostname()})"
    with pytest.raises(RunDirLocked, match="wait for it to finish") as refused:
        with hold(run, "opd-jax train"):
            pytest.fail("took a lock held by another process")
    assert str(refused.value).startswith(f"{run} is in use by {who}")
    assert isinstance(refused.value, ConfigError)  # the command line's bad-input exit, 2
    assert holder(run) == who


def test_a_killed_holder_leaves_no_stale_lock(holding_process):
    proc, run = holding_process
    proc.kill()
    proc.wait()
    assert (run / LOCK_FILE).is_file() and holder(run) is None
    with hold(run, "opd-jax train"):
        assert holder(run) is not None


def test_another_process_is_refused_while_this_one_holds(tmp_path):
    run = tmp_path / "run"
    with hold(run, "opd-jax train"):
        info = json.loads((run / LOCK_FILE).read_text())
        assert info["command"] == "opd-jax train" and info["host"] == socket.gethostname()
        out = subprocess.run(
            [sys.executable, "-c", TRY_TO_HOLD, str(run)], capture_output=True, text=True
        ).stdout
        assert f"is in use by `opd-jax train` (PID {info['pid']} on host" in out
    out = subprocess.run(
        [sys.executable, "-c", TRY_TO_HOLD, str(run)], capture_output=True, text=True
    ).stdout
    assert out.strip() == "held"


def test_the_same_process_takes_it_again_after_release_but_not_twice_at_once(tmp_path):
    run = tmp_path / "run"
    assert holder(run) is None  # no directory yet: nobody holds it
    with hold(run, "opd-jax train") as held:
        assert held == run and run.is_dir()
        with pytest.raises(RunDirLocked), hold(run, "opd-jax experiment"):
            pass
    assert holder(run) is None
    with hold(run, "opd-jax experiment"):
        assert "opd-jax experiment" in holder(run)


def test_only_the_primary_process_holds_it(tmp_path):
    run = tmp_path / "run"
    with hold(run, "opd-jax train", primary=False):
        assert not (run / LOCK_FILE).exists()
    with hold(run, "opd-jax train"), hold(run, "opd-jax train", primary=False):
        pass  # a non-primary process of the same run is not refused


def test_a_file_where_the_directory_should_be_is_a_config_error(tmp_path):
    run = tmp_path / "run"
    run.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"{run} is a file, not a directory"):
        with hold(run, "opd-jax train"):
            pass
