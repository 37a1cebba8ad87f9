"""Multi-process runs: ``jax.distributed.initialize`` from the environment, and process roles.

JAX runs one program per process (multi-controller). One process driving every accelerator
of its host is the normal setup; a run over several hosts (or one process per GPU) starts
the same command in every process, and :func:`initialize_from_env` connects them before
any JAX computation. The environment decides, first match wins:

- ``OPD_JAX_DISTRIBUTED=off``: never initialize (a single-process run).
- ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES=N``, ``JAX_PROCESS_ID=i``, all
  three: explicit (JAX reads the first itself; the other two are named after
  ``jax.distributed.initialize``'s arguments). Cluster detection is off, so a process sees
  all its host's devices unless JAX's own ``JAX_LOCAL_DEVICE_IDS=0,1`` restricts them.
- ``OPD_JAX_DISTRIBUTED=auto``: ``jax.distributed.initialize()`` with JAX's cluster
  detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes); ``launch/tpu_pod.sh`` sets it.
- detected: an ``srun`` step of several tasks (``SLURM_STEP_NUM_TASKS > 1``; JAX gives each
  task the GPU ``SLURM_LOCALID``), an Open MPI job of several ranks, or a multi-host TPU slice
  on GKE (``TPU_WORKER_HOSTNAMES``) or multislice (``MEGASCALE_COORDINATOR_ADDRESS``).
  Some of the explicit variables beside a cluster override what JAX detects.
- some of the explicit variables and no cluster: an error naming the missing ones.
- nothing: a single process, nothing to do.

Process roles: every process loads the models, samples and scores its rows of the global
batch and calls the (collective) checkpoint save and restore; only process 0 writes
``config.yaml``, ``metrics.jsonl``, TensorBoard events and the progress bar.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from opd_jax.errors import InputError

T = TypeVar("T")

MODE = "OPD_JAX_DISTRIBUTED"
COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
# The explicit variables and the jax.distributed.initialize argument each one sets.
ARGUMENT = {
    COORDINATOR: "coordinator_address",
    NUM_PROCESSES: "num_processes",
    PROCESS_ID: "process_id",
}
EXPLICIT = tuple(ARGUMENT)
MODES = ("auto", "off")


class DistributedEnvError(InputError):
    """The environment asks for a multi-process run but its settings are inconsistent."""


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedEnvError(f"{name}={value!r} is not an integer.") from None


def _cluster_detected(environ: Mapping[str, str]) -> bool:
    """Whether JAX's cluster detection should run: asked for, or a multi-process srun step,
    Open MPI job or multi-host Cloud TPU slice."""
    srun = (_int(environ, "SLURM_STEP_NUM_TASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in environ
    mpi = (_int(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1 and "OMPI_MCA_orte_hnp_uri" in environ
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    tpu = "," in hosts or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
    return environ.get(MODE) == "auto" or srun or mpi or tpu


def distributed_args(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments of ``jax.distributed.initialize`` that ``environ`` asks for.

    Returns None for a single-process run. Pure: reads only ``environ`` (default
    ``os.environ``); see the module docstring for the variables.

    Raises:
      DistributedEnvError: an unknown ``OPD_JAX_DISTRIBUTED``, some but not all of the
        explicit variables, a non-integer, ``JAX_PROCESS_ID`` outside ``[0, N)``, or a
        coordinator without a port.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get(MODE, "")
    if mode and mode not in MODES:
        raise DistributedEnvError(f"{MODE}={mode!r}: use 'auto', 'off', or leave it unset.")
    if mode == "off":
        return None
    address = environ.get(COORDINATOR) or None
    count, index = _int(environ, NUM_PROCESSES), _int(environ, PROCESS_ID)
    if count is not None and count < 1:
        raise DistributedEnvError(f"{NUM_PROCESSES}={count} must be >= 1.")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise DistributedEnvError(
            f"{PROCESS_ID}={index} must be in [0, {NUM_PROCESSES}={count}): process ids "
            "run from 0 to the process count - 1."
        )
    if address is not None and ":" not in address:
        raise DistributedEnvError(
            f"{COORDINATOR}={address!r} needs a port: host:port of process 0, e.g. "
            "10.0.0.1:1234, the same in every process."
        )
    given = {COORDINATOR: address, NUM_PROCESSES: count, PROCESS_ID: index}
    if all(v is not None for v in given.values()):
        if count == 1:
            return None
        return {ARGUMENT[k]: v for k, v in given.items()} | {
            "cluster_detection_method": "deactivate"
        }
    if _cluster_detected(environ):
        return {ARGUMENT[k]: v for k, v in given.items() if v is not None}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    raise DistributedEnvError(
        f"a multi-process run needs all of {', '.join(EXPLICIT)}; missing {', '.join(missing)}"
        f" (set {COORDINATOR} to host:port of process 0, {NUM_PROCESSES} to the process "
        f"count and {PROCESS_ID} to this process's index), or unset them all for one process."
    )


def initialize_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Calls ``jax.distributed.initialize`` when the environment asks for several processes.

    Must run before any JAX computation (the CLI calls it first thing in ``train``, ``eval``
    and ``plan``). Idempotent: a no-op once JAX's distributed system is initialized, and on
    a plain single machine. On CPU, cross-process collectives use gloo (JAX's default, set
    here if it was cleared). Returns the arguments passed, or None when nothing was done.
    """
    if jax.distributed.is_initialized():
        return None
    args = distributed_args(environ)
    if args is None:
        return None
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    return args


def is_primary() -> bool:
    """Whether this is process 0: the one that logs and writes run files."""
    return jax.process_index() == 0


def primary_first(fn: Callable[[], T]) -> T:
    """``fn()`` on process 0, then, after a barrier, on the others.

    For work on a disk shared by all processes that must happen once, e.g. building a
    dataset: the other processes find it built.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if is_primary() else None
    multihost_utils.sync_global_devices("opd_jax.primary_first")
    return result if is_primary() else fn()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
