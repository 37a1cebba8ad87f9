"""opd_jax.heap: XLA:CPU's temporary buffers are reused from run to run, not faulted in anew."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from opd_jax import heap

# A jitted product through a 4096 x 4096 float matrix: a 64 MiB temporary buffer per run. Runs
# are spaced, as a training step's host work spaces them; back to back, a run may allocate
# before XLA has freed the last one's buffer, and the heap grows (faults) until it holds both.
PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    from opd_jax.heap import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    import jax, jax.numpy as jnp
    run = jax.jit(lambda x: (jnp.sin(jnp.outer(x, x)) @ x).sum())  # the matrix: a dot operand
    x = jnp.arange(4096, dtype=jnp.float32)
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        time.sleep(0.5)  # XLA frees the buffer just after the result is ready: let it, also
        # on a loaded machine (0.2 s once let a run start before the last one's buffer was free)
    print(json.dumps({"kept": kept, "faults": faults}))
    """
)
BUFFER_PAGES = 64 * 2**20 // 4096


def _probe(mode: str) -> dict:
    env = {name: value for name, value in os.environ.items() if name != heap.OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_heap_stops_faulting_the_step_buffer_in_anew():
    system, kept = _probe("system"), _probe("keep")
    assert kept["kept"] and not system["kept"]
    # glibc maps each run's buffer afresh: every run faults all its pages in.
    assert min(system["faults"][2:]) >= BUFFER_PAGES
    # Kept: once the heap has grown to the runs' pattern, they fault (almost) nothing.
    assert sorted(kept["faults"][2:])[2] < BUFFER_PAGES // 10, kept["faults"]


def test_opt_out_and_accelerators_leave_malloc_alone(monkeypatch):
    monkeypatch.setenv(heap.OPT_OUT, "system")
    assert heap.keep_freed_memory() is False
    monkeypatch.delenv(heap.OPT_OUT)  # conftest's
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert heap._accelerator_present() and heap.keep_freed_memory() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not heap._accelerator_present()


# One program frees a buffer of X bytes that a pinned allocation keeps below the heap's top;
# the next asks for 1.5 X. The system's malloc unmaps the first: the process peaks near 1.5 X.
# The kept heap holds both unless it gives the free pages back: 2.5 X. The process's memory
# limit lies between, at 2.25 X above its start, as a machine or cgroup nearly full would.
TWO_PROGRAMS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from opd_jax import heap
    mode = sys.argv[1]
    kept = heap.keep_freed_memory() if mode != "system" else False
    import jax.monitoring  # as where JAX runs
    X = 256 * 2**20
    start = heap.resident_bytes()
    limit = start + 9 * X // 4
    first = np.ones(X // 8)
    pin = np.ones(2**20 // 8)
    assert kept is False or pin.ctypes.data > first.ctypes.data  # the hole lies below
    del first
    released = heap.release_unused(limit) if mode == "guarded" else 0
    second = np.ones(3 * X // 16)
    # VmHWM, not ru_maxrss: after exec, that keeps the high-water mark of the test's process.
    status = open("/proc/self/status").read().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"kept": kept, "released": released, "peak": peak, "limit": limit, "X": X}))
    """
)


def _two_programs(mode: str) -> dict:
    env = {name: value for name, value in os.environ.items() if name != heap.OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", TWO_PROGRAMS, mode], capture_output=True, text=True, check=True,
        env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_heap_gives_its_free_pages_back_near_the_memory_limit():
    system, kept, guarded = (_two_programs(m) for m in ("system", "kept", "guarded"))
    assert kept["kept"] and guarded["kept"] and not system["kept"]
    # The case is real: with the heap kept whole, the process would pass its limit (be killed)
    # where the system's malloc stays under it.
    assert kept["peak"] > kept["limit"] and system["peak"] < system["limit"]
    # The guard saw the room left (1.25 X) short of twice the free heap (X) and gave the hole
    # back, all of it: the second program then fits, as under the system's malloc.
    X = guarded["X"]
    assert guarded["released"] >= X
    assert guarded["peak"] < guarded["limit"]


# A program's first run frees its buffer of X bytes below an allocation made after it; a small
# allocation bites the hole, so the next run's buffer no longer fits there and the heap grows
# by X again: the kept heap would hold 2 X where the system's malloc holds X.
FIRST_RUN_HOLE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from opd_jax import heap
    assert heap.keep_freed_memory()
    import jax.monitoring  # as where JAX runs
    X = 256 * 2**20

    def peak():
        status = open("/proc/self/status").read().splitlines()
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

    start = heap.resident_bytes()
    first = np.ones(X // 8)
    pin = np.ones(2**20 // 8)
    del first
    released = heap.release_unused() if sys.argv[1] == "release" else 0
    bite = np.ones(2**23 // 8)  # larger than any other free chunk
    second = np.ones(X // 8)  # the next run's buffer
    grown = peak() - start
    del second  # its run ends: the heap's top is free now, and no new program ran since
    again = heap.release_unused() if sys.argv[1] == "release" else 0
    print(json.dumps({"X": X, "released": released, "grown": grown, "again": again}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_heap_gives_back_a_first_runs_hole_and_then_keeps_its_top():
    def run(mode: str) -> dict:
        env = {name: value for name, value in os.environ.items() if name != heap.OPT_OUT}
        out = subprocess.run(
            [sys.executable, "-c", FIRST_RUN_HOLE, mode], capture_output=True, text=True,
            check=True, env=env,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    kept, released = run("keep"), run("release")
    X = kept["X"]
    assert kept["grown"] > 1.9 * X  # the hole and the second buffer, both resident
    assert released["released"] > 0.99 * X and released["grown"] < 1.1 * X
    # Far from the memory limit and with no new program, the top stays: the next run of the
    # same program reuses it without faulting its pages in again.
    assert released["again"] == 0
    assert heap.release_unused(limit=0) == 0  # this process did not keep its heap


# What the compiler frees lies in small pieces between live ones, where a program's buffers do
# not fit: a freed 256 MiB array held below a pinned allocation stands in for it here.
COMPILED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from opd_jax import heap
    assert heap.keep_freed_memory()
    import jax, jax.numpy as jnp
    X = 256 * 2**20
    first = np.ones(X // 8)
    pin = np.ones(2**20 // 8)
    del first
    before = heap.resident_bytes()
    jax.jit(lambda x: x * 2 + 1)(jnp.ones(8)).block_until_ready()  # compiled, then run
    print(json.dumps({"X": X, "given_back": before - heap.resident_bytes()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_heap_gives_its_free_pages_back_once_a_program_is_compiled():
    env = {name: value for name, value in os.environ.items() if name != heap.OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", COMPILED], capture_output=True, text=True, check=True, env=env
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Before the program first runs, the heap's free pages went back: its run's buffers
    # start from what is live, not on top of what was freed.
    assert result["given_back"] > result["X"] // 2, result
