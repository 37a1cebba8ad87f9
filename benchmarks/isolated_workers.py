"""Each framework of a benchmark case in a process of its own, their timed runs alternating, and
each process's peak resident memory.

For every case, :func:`measure` starts one worker per framework (``python3 -m
benchmarks.isolated_workers``: the environment of :func:`set_environment`, then
``benchmarks.common`` first, so that ``opd_jax.heap``'s malloc setting, or the
``OPD_JAX_HEAP=system`` the worker inherits, applies as in ``benchmarks.opd_step``). A worker
builds its side (``benchmarks.opd_sides``), records its resident memory (``rss_before_gib``,
``/proc/self/statm``), compiles and warms up; the workers then take one timed run each in turn,
``repeats`` times, so that a drifting load hits them alike (as ``opd_step_compare.measure``
interleaves them in one process). Each worker then reports its times, its ``info`` and its peak
resident memory ``peak_rss_gib``: the kernel's high-water mark of its own memory (``VmHWM`` in
``/proc/self/status``), the maximum of ``compile_peak_rss_gib`` (up to the step's compilation
and setup, before its first run) and ``steps_peak_rss_gib`` (warm-up and timed runs; the mark
is reset in between through ``/proc/self/clear_refs``, None where that is refused). Not
``getrusage``'s ``ru_maxrss``: after ``exec`` that keeps the high-water mark of the process
that started it (here the driver, which holds both frameworks).

Only one worker computes at a time, but both hold their memory throughout: the two peaks
together must fit in the machine (``OPD_JAX_HEAP=system`` lets each return what it frees). A
worker that raises is recorded as ``oom`` or ``failed`` (:func:`failure`), one killed by a
signal as ``oom`` (SIGKILL: the kernel's out-of-memory killer) or ``failed``, and the benchmark
goes on. This module imports neither JAX nor torch until a worker needs them.
"""

from __future__ import annotations

import os
import pickle
import signal
import statistics
import subprocess
import sys
from typing import IO, Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where ``-m`` finds us
GIB = 2**30


def set_environment() -> None:
    """The environment of a process that runs the frameworks, set before JAX and torch start."""
    # JAX would otherwise take 75% of the GPU that transformers shares.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # OpenMP threads that spin while waiting make torch 10-20x slower on a CPU shared with other
    # processes (SmolLM2 decoding on 2 busy cores: 33-74 s spinning, 5-8 s passive, 3.4 s on
    # one thread); idle threads sleep instead.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def failure(error: BaseException) -> dict[str, Any]:
    """An exception as a result: ``oom`` if it says the memory ran out, else ``failed``."""
    text = f"{type(error).__name__}: {error}"
    oom = isinstance(error, MemoryError) or any(
        s in text.lower() for s in ("resource_exhausted", "out of memory", "can't allocate")
    )
    return {"status": "oom" if oom else "failed", "error": text[:400]}


def rss_gib() -> float:
    """This process's resident memory now (``/proc/self/statm``), GiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib() -> float:
    """This process's peak resident memory since its ``exec`` (``VmHWM``), GiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024 / GIB


def reset_peak_rss() -> bool:
    """Sets this process's ``VmHWM`` to its resident memory now; whether the kernel did."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _died(code: int) -> dict[str, Any]:
    if code < 0:
        name = signal.Signals(-code).name
        oom = -code == signal.SIGKILL
        why = " (the kernel's out-of-memory killer?)" if oom else ""
        return {"status": "oom" if oom else "failed", "error": f"worker killed by {name}{why}"}
    return {"status": "failed", "error": f"worker exited with status {code}"}


class Worker:
    """A worker process; :meth:`ask` sends a message (first ``{"side": make_side's arguments,
    "case": case}``, then ``run`` or ``done``) and returns the reply, or the worker's death as a
    result."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.isolated_workers"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip

    def ask(self, message: Any) -> dict[str, Any]:
        try:
            pickle.dump(message, self.process.stdin)
            self.process.stdin.flush()
            return pickle.load(self.process.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            return _died(self.process.wait())

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=120)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def measure(specs: dict[str, dict[str, Any]], cases: list[dict], repeats: int):
    """``{case name: {framework: result}}`` as ``opd_step_compare.measure`` returns, each
    result also with ``peak_rss_gib``, ``rss_before_gib`` and ``malloc``. ``specs``: framework
    -> keyword arguments of ``opd_sides.make_side`` (in the order the workers start and
    run); a case has ``name``, ``kind``, ``host``, ``prompt`` and ``response``."""
    results: dict[str, dict[str, Any]] = {case["name"]: {} for case in cases}
    for case in cases:
        done, workers = results[case["name"]], {}
        try:
            for name, spec in specs.items():  # one at a time: compile times are not shared
                worker = Worker()
                reply = worker.ask({"side": spec, "case": case})
                if reply["status"] == "ready":
                    workers[name] = worker
                else:
                    done[name] = reply
                    worker.close()
            times: dict[str, list[float]] = {name: [] for name in workers}
            for _ in range(repeats):
                for name, worker in list(workers.items()):
                    reply = worker.ask("run")
                    if "seconds" in reply:
                        times[name].append(reply["seconds"])
                    else:
                        done[name] = reply
                        workers.pop(name).close()
            for name, worker in workers.items():
                reply = worker.ask("done")
                if reply["status"] == "ok":
                    reply |= {"seconds": statistics.median(times[name]), "times": times[name]}
                done[name] = reply
        finally:
            for worker in workers.values():
                worker.close()
        print(f"done {case['name']} ({', '.join(specs)}, one process each)", flush=True)
    return results


def _serve(read: IO[bytes], write: IO[bytes]) -> None:
    """A worker: builds the side, warms up, then answers ``run`` (one timed run) until
    ``done`` (its result, memory included); an exception ends it with its failure."""
    from benchmarks import common  # first: it sets malloc up before any thread allocates

    # isort: split
    from benchmarks.opd_sides import make_side
    from opd_jax.heap import release_unused

    def send(message: dict[str, Any]) -> None:
        pickle.dump(message, write)
        write.flush()

    def memory() -> dict[str, Any]:  # the peaks so far, ``stage`` and ``reset`` as they are
        peak, out = peak_rss_gib(), {"malloc": common.MALLOC}
        if "compile_peak_rss_gib" not in stage:
            return out | {"peak_rss_gib": peak}
        steps = peak if reset else None
        return out | {"peak_rss_gib": max(peak, stage["compile_peak_rss_gib"]),
                      "steps_peak_rss_gib": steps}  # fmt: skip

    message = pickle.load(read)
    case, stage, reset = message["case"], {}, False
    try:
        side = make_side(**message["side"])
        release_unused()  # what loading freed (as the training loop's first release does)
        stage["rss_before_gib"] = rss_gib()
        run, info = getattr(side, case["kind"])(case["host"], case["prompt"], case["response"])
        stage["compile_peak_rss_gib"] = peak_rss_gib()
        reset = reset_peak_rss()
        common.wall_times(run, 2 if getattr(side, "compile", False) else 1)
        release_unused()
        send({"status": "ready"})
        while (command := pickle.load(read)) == "run":
            (seconds,) = common.wall_times(run, 1)
            # The other worker runs next: the kept heap goes back if memory is short (as the
            # training loop does between its programs, opd_jax.heap).
            release_unused()
            send({"seconds": seconds})
        assert command == "done", command
    except Exception as error:  # noqa: BLE001 - a size may not fit: recorded, not fatal
        send(failure(error) | stage | memory())
        return
    result = {"status": "ok", **info, **getattr(side, "info", dict)(), **stage, **memory()}
    send(result | {"loadavg_1m": os.getloadavg()[0]})


if __name__ == "__main__":
    set_environment()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the libraries print goes to stderr, not into the replies
    _serve(sys.stdin.buffer, replies)
