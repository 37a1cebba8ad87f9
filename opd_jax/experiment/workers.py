"""Where the experiment's independent jobs run: in this process, or in a pool of
``experiment.workers`` processes at once.

The models of the experiment are tiny, so a job (a model's fine-tuning, an OPD run) is bound
by the per-operation overhead of one Python thread, not by the cores: two processes on two
cores finish two jobs in little more than the time of one. Each job computes exactly what it
would alone (its keys and data derive from its own seed), so the results do not depend on
``workers``.

Worker processes are spawned (never forked from a process that has started JAX), keep freed
memory as the command line does (:mod:`opd_jax.heap`) and share the run's XLA compilation
cache. A SIGTERM to the experiment is passed on to the workers, whose runs save and stop; a
Ctrl-C reaches them from the terminal. Jobs not yet started are then not started.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from opd_jax.config import Config
from opd_jax.heap import release_unused


def _start_worker(compilation_cache: str) -> None:
    """A worker's set-up, before it imports JAX: the command line's heap, the compilation
    cache, and the log filters of the experiment."""
    from opd_jax.heap import keep_freed_memory

    keep_freed_memory()
    from absl import logging as absl_logging

    from opd_jax.compilation_cache import use_compilation_cache

    use_compilation_cache(compilation_cache)
    absl_logging.set_verbosity(absl_logging.ERROR)
    # A stop reaches a worker's run through its training loop's handlers; between runs, and
    # while one evaluates, the worker finishes what it does (the pool starts nothing new).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args)
    release_unused()  # the job's programs are done (opd_jax.heap bounds what it keeps)
    return result, time.perf_counter() - start


class Pool:
    """Runs jobs ``fn(*args)`` here (``experiment.workers`` 1) or over worker processes."""

    def __init__(self, config: Config) -> None:
        self.config, self.workers = config, config.experiment.workers
        self.executor: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> Pool:
        if self.workers > 1:
            self.executor = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self.config.run.compilation_cache,),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def run(
        self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]
    ) -> Iterator[tuple[tuple[Any, ...], Any, float]]:
        """``(args, fn(*args), seconds)`` of each job, in the order they finish (here: in
        order). ``fn`` must be importable by name (a module-level function)."""
        if self.executor is None:
            for args in jobs:
                yield (args, *_timed(fn, *args))
            return
        futures = {self.executor.submit(_timed, fn, *args): args for args in jobs}
        with _passing_on_sigterm(self.executor, list(futures)):
            for future in concurrent.futures.as_completed(futures):
                if not future.cancelled():
                    yield (futures[future], *future.result())


@contextlib.contextmanager
def _passing_on_sigterm(
    executor: concurrent.futures.ProcessPoolExecutor, futures: list[concurrent.futures.Future]
) -> Iterator[None]:
    """While jobs run: a SIGTERM (or SIGINT, which the terminal also sends the workers) cancels
    the jobs not yet started and a SIGTERM is passed on to the workers, which save and stop."""

    def stop(signum: int, frame: object) -> None:
        del frame
        for future in futures:
            future.cancel()
        if signum == signal.SIGTERM:
            for process in list(getattr(executor, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
