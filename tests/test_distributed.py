"""Multi-process runs: environment handling, each process's rows of the global batch, and two
``jax.distributed`` processes training exactly like one process with two devices."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from opd_jax import data, distributed
from opd_jax.distributed import DistributedEnvError, distributed_args, initialize_from_env
from opd_jax.sharding import make_mesh
from opd_jax.train.checkpoint import Checkpointer, restore_student
from opd_jax.train.metrics import read_metrics
from opd_jax.train.session import Batches
from tests.xla_flags import FAST_COMPILE

EXPLICIT = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
}
SRUN = {
    "SLURM_JOB_ID": "77",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
}


# --- the environment -> jax.distributed.initialize arguments ---------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"},  # inside sbatch, not under srun
        SRUN | {"SLURM_STEP_NUM_TASKS": "1"},  # a one-task srun step
        EXPLICIT | {"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
        EXPLICIT | {"OPD_JAX_DISTRIBUTED": "off"},
        SRUN | {"OPD_JAX_DISTRIBUTED": "off"},
    ],
    ids=["plain", "sbatch-shell", "one-task-srun", "one-process", "off", "off-under-srun"],
)
def test_a_single_process_environment_initializes_nothing(environ):
    assert distributed_args(environ) is None


@pytest.mark.parametrize("environ", [EXPLICIT, SRUN | EXPLICIT], ids=["plain", "under-srun"])
def test_explicit_variables_connect_to_the_coordinator_with_all_local_devices(environ):
    assert distributed_args(environ) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "cluster_detection_method": "deactivate",
    }


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (SRUN, {}),
        (SRUN | {"JAX_COORDINATOR_ADDRESS": "head:9999"}, {"coordinator_address": "head:9999"}),
        ({"OPD_JAX_DISTRIBUTED": "auto"}, {}),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "w0"}, {}),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "uri"}, {}),
    ],
    ids=["srun", "srun-own-coordinator", "auto", "gke-tpu", "multislice", "openmpi"],
)
def test_a_detected_cluster_leaves_the_rest_to_jax_detection(environ, expected):
    assert distributed_args(environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "missing JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
        (EXPLICIT | {"JAX_PROCESS_ID": "4"}, r"JAX_PROCESS_ID=4 must be in \[0, "),
        (EXPLICIT | {"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID=-1 must be in"),
        (EXPLICIT | {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
        (EXPLICIT | {"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0 must be >= 1"),
        (EXPLICIT | {"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "needs a port"),
        ({"OPD_JAX_DISTRIBUTED": "yes"}, "use 'auto', 'off'"),
        (SRUN | {"JAX_PROCESS_ID": "9", "JAX_NUM_PROCESSES": "8"}, "JAX_PROCESS_ID=9"),
    ],
)
def test_inconsistent_settings_name_the_variables(environ, message):
    with pytest.raises(DistributedEnvError, match=message):
        distributed_args(environ)


@pytest.fixture
def calls(monkeypatch):
    """Records ``jax.distributed.initialize`` calls instead of connecting anywhere."""
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(recorded))
    return recorded


def test_initialize_from_env_calls_jax_once(calls):
    assert initialize_from_env(EXPLICIT) == distributed_args(EXPLICIT)
    assert initialize_from_env(EXPLICIT) is None
    assert calls == [distributed_args(EXPLICIT)]


def test_initialize_from_env_is_a_no_op_on_one_machine(calls):
    assert initialize_from_env({}) is None and calls == []


def test_initialize_from_env_refuses_before_calling_jax(calls):
    with pytest.raises(DistributedEnvError):
        initialize_from_env({"JAX_PROCESS_ID": "1"})
    assert calls == []


# --- each process's rows of the global batch -----------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    sizes = dict(train_size=8, test_size=24, test_long_size=4, test_unseen_op_size=4)
    return data.load_source("arithmetic", "test", tmp_path_factory.mktemp("data"), **sizes)


@pytest.mark.parametrize("processes", [2, 3])
def test_process_i_gets_rows_i_of_the_single_process_global_batch(source, processes):
    def batches(index, count):
        it = data.make_prompt_iterator(
            source, batch_size=6 // count, seed=5, shard_index=index, shard_count=count
        )
        return [list(next(it)["id"]) for _ in range(9)]  # over two epochs

    one = batches(0, 1)
    shards = [batches(i, processes) for i in range(processes)]
    assert [sum((s[step] for s in shards), []) for step in range(9)] == one


def test_a_process_resumes_its_rows_from_the_saved_position(source):
    kwargs = dict(batch_size=2, seed=1, shard_index=1, shard_count=3)
    it = data.make_prompt_iterator(source, **kwargs)
    [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [list(next(it)["id"]) for _ in range(4)]
    resumed = data.make_prompt_iterator(source, **kwargs)
    resumed.set_state(state)
    assert [list(next(resumed)["id"]) for _ in range(4)] == expected


def test_a_single_process_feeds_the_whole_batch_without_collectives():
    batches = Batches(make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
    assert batches.process_rows(4) == (0, 1)
    assert distributed.any_process(True) and not distributed.any_process(False)
    assert distributed.primary_first(lambda: 7) == 7


# --- two jax.distributed processes on CPU --------------------------------------------------

STEPS = 3
TIMEOUT_S = 300
CONFIG = """
run: {{progress: false, tensorboard: false}}
student: {{path: {pair}/student}}
teacher: {{path: {pair}/teacher}}
data: {{batch_size: 4, max_prompt_tokens: 96,
        arithmetic: {{train_size: 16, test_size: 4, test_long_size: 4, test_unseen_op_size: 4}}}}
sampling: {{max_new_tokens: 8, temperature: 1.0, n: 2, compact_every: 2}}
score: {{chunk_size: 8}}
optim: {{learning_rate: 0.01}}
mesh: {{data: 1, fsdp: 2, tensor: 1}}
train: {{steps: {steps}}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    """This environment without launcher variables, on ``devices`` CPU devices, plus ``extra``."""
    launcher = ("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "OPD_JAX_DISTRIBUTED")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    return env | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "OPD_JAX_TRACEBACK": "1"} | extra


def _run_all(jobs: dict[str, tuple[list[str], dict[str, str]]], logs) -> None:
    """Starts every ``name: (command, env)`` job at once; on a failure or timeout kills the
    rest and fails with the output of every job."""
    procs, files = {}, []
    try:
        for name, (command, env) in jobs.items():
            files.append((logs / f"{name}.log").open("w"))
            procs[name] = subprocess.Popen(
                command, env=env, stdout=files[-1], stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if any(p.poll() for p in procs.values()):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    codes = {name: p.returncode for name, p in procs.items()}
    if any(codes.values()):
        outputs = "\n".join(
            f"--- {name} (exit {code}) ---\n{(logs / f'{name}.log').read_text()[-4000:]}"
            for name, code in codes.items()
        )
        pytest.fail(f"exit codes {codes} (negative: killed after a failure or timeout)\n{outputs}")


def _two_processes(command: list[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Jobs ``process0``, ``process1``: ``command`` in a localhost ``jax.distributed`` run."""
    explicit = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    return {f"process{i}": (command, _env(1, **explicit, JAX_PROCESS_ID=f"{i}")) for i in range(2)}


CHECKPOINT_SCRIPT = """
import sys, jax, numpy as np
from opd_jax.distributed import initialize_from_env
initialize_from_env()
from jax.sharding import NamedSharding, PartitionSpec
from opd_jax.sharding import make_mesh
from opd_jax.train.checkpoint import Checkpointer
mesh = make_mesh({"fsdp": 2})
sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
x = jax.make_array_from_callback((4,), sharding, lambda index: np.arange(4.0)[index])
target = {"x": jax.ShapeDtypeStruct((4,), x.dtype, sharding=sharding)}
with jax.set_mesh(mesh):
    with Checkpointer(sys.argv[1], keep=2) as checkpointer:
        checkpointer.save(1, {"x": x}, {"data": {"next_index": 1}}, force=True)
    with Checkpointer(sys.argv[1], keep=2) as checkpointer:
        step, state, meta = checkpointer.restore(target)
shard = np.asarray(state["x"].addressable_data(0)).tolist()
print("restored", step, meta["data"], shard)
"""


def test_two_processes_save_and_restore_a_sharded_checkpoint_under_the_run_mesh(tmp_path):
    _run_all(_two_processes([sys.executable, "-c", CHECKPOINT_SCRIPT, str(tmp_path)]), tmp_path)
    for i in range(2):
        out = (tmp_path / f"process{i}.log").read_text()
        assert f"restored 1 {{'next_index': 1}} [{2.0 * i}, {2.0 * i + 1}]" in out, out


def _final_params(run_dir) -> list[np.ndarray]:
    assert Checkpointer(run_dir, keep=3).latest_step() == STEPS
    model, _ = restore_student(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _compared(line: dict) -> dict:
    """A metrics line without its timings."""
    return {k: v for k, v in line.items() if not k.startswith("time") and k != "tokens_per_s"}


def test_two_processes_train_like_one_process_with_two_devices(tiny_pair, tmp_path):
    """``opd-jax train`` in two ``jax.distributed`` processes of one CPU device each, and in
    one process with two devices, on the mesh fsdp=2 (batch rows and parameters split over
    the processes): every logged metric and the final parameters agree; process 0 alone logs.
    """
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(CONFIG.format(pair=tiny_pair, steps=STEPS))

    def command(run):
        sets = [f"run.dir={tmp_path / run}", f"data.data_dir={tmp_path / run / 'data'}"]
        train = [sys.executable, "-m", "opd_jax.cli", "train", str(config_file)]
        return train + [arg for value in sets for arg in ("--set", value)]

    _run_all(_two_processes(command("two")) | {"single": (command("one"), _env(2))}, tmp_path)

    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [line["step"] for line in two] == [line["step"] for line in one] == [1, 2, 3]
    for a, b in zip(two, one, strict=True):
        a, b = _compared(a), _compared(b)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert "done: step 3" in (tmp_path / "process0.log").read_text()
    assert "done:" not in (tmp_path / "process1.log").read_text()
    for a, b in zip(
        _final_params(tmp_path / "two"),
        _final_params(tmp_path / "one"),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
