"""Host memory on CPU: keep what malloc frees, so XLA's step buffers are not faulted in anew.

XLA:CPU allocates each execution's temporary buffer with ``malloc`` (3 GiB for the SmolLM2
OPD update at B=4, N=256). glibc serves a request that large with a fresh ``mmap`` and unmaps
it on ``free``, so every step touches its buffer's pages for the first time again: 0.9 million
page faults and 1.7 s of kernel time in a 9 s step on 2 cores, and more when another
framework shares the process. :func:`keep_freed_memory` makes glibc serve every thread from
its main heap, never ``mmap`` and never return the heap's top to the system; the buffer is
then reused from step to step: no faults, that update 8.9 -> 8.0 s alone and 83.8 -> 124.9
tokens/s alternating with PyTorch in one process (PyTorch's own 108 -> 124); at B=16 33 s
against 43 s. Kept whole, the heap would hold more than the live peak (PyTorch and opd_jax
alternating at B=16 in one process were once killed at 24 GB on a 23 GiB machine).

So it is bounded by :func:`release_unused`, called where a program's buffers have just
been freed (the training loop after its rollouts and after its update). After a new program's
first run it gives back the free pages inside the heap: a first run's buffer is left as a hole
that later runs do not reuse (it would double the peak). When the memory still available (the
machine's ``MemAvailable``, the cgroup's limit, or a given limit) is less than twice what the
heap holds free, it gives back every free page: the next program may then allocate anew as much
as was freed and still fit; the process pays the page faults the system's malloc pays, and is
not killed for memory the system's malloc would have returned. Otherwise it does nothing and no
page is faulted in again. Once a program is compiled, before its first run, every free page
goes back as well: the compiler's freed working memory lies in small pieces between live
allocations, where the program's buffers do not fit.

The command line calls :func:`keep_freed_memory` before JAX starts (threads pick their heap at
their first allocation); a script that imports opd_jax calls it the same way, before any array
is made.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import pkgutil
import sys
import time
from pathlib import Path

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
OPT_OUT = "OPD_JAX_HEAP"  # "system": leave malloc as it is
_kept = False  # whether keep_freed_memory set malloc up in this process


def _accelerator_present() -> bool:
    """Whether JAX may run on something other than the CPU here (a plugin or libtpu is
    installed and ``JAX_PLATFORMS`` does not pin the CPU): device memory is not malloc's."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        import jax_plugins  # namespace package of the CUDA/ROCm plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one heap, no ``mmap`` and no trimming, and listens to JAX's
    compilation events (see the module); returns whether it did. Does nothing (False) off
    Linux/glibc, where an accelerator may run, or with ``OPD_JAX_HEAP=system``. Call it before
    JAX starts its CPU backend."""
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return False
    libc = _libc()
    if libc is None or _accelerator_present():
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # glibc widens the int to size_t: -1 is "never trim".
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    global _kept
    _kept = all(mallopt(param, value) == 1 for param, value in settings)
    if _kept:
        _listen()
    return _kept


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _mallinfo() -> _MallInfo2 | None:
    """glibc's ``mallinfo2()``; None elsewhere and before glibc 2.33."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def free_heap_bytes() -> int:
    """Bytes malloc holds free in its heap (glibc's ``mallinfo2().fordblks``); 0 elsewhere."""
    info = _mallinfo()
    return 0 if info is None else int(info.fordblks)


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1; its own group, else the
    controller's root as a container mounts it), None where no limit is set."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 (also mounted at unified/ on hybrid systems)
            names, mounts = ("memory.max", "memory.current"), (root, root / "unified")
        elif "memory" in controllers.split(","):
            names, mounts = ("memory.limit_in_bytes", "memory.usage_in_bytes"), (root / "memory",)
        else:
            continue
        for group in [m / path.lstrip("/") for m in mounts] + list(mounts):
            try:
                limit, usage = ((group / name).read_text().strip() for name in names)
            except OSError:
                continue
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as about 2**63
                rooms.append(int(limit) - int(usage))
            break
    return min(rooms, default=None)


def memory_room(limit: int | None = None) -> int:
    """Bytes this process may still take: the machine's ``MemAvailable``, less where its
    cgroup's limit or ``limit`` (bytes of resident memory for this process) is closer."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    available = next(
        int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")
    )
    rooms = [available, _cgroup_room(), None if limit is None else limit - resident_bytes()]
    return min(room for room in rooms if room is not None)


_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # a new executable (cached too)
_COMPILED = "/jax/core/compile/backend_compile_duration"  # compiled (or read from the cache)
_new_program = True  # since the last release_unused; True until it first runs
_SETTLE_S, _SETTLE_POLLS = 0.01, 50  # after a new program: wait until the free heap is still
_listening = False


def _note_program(event: str, duration: float, **kwargs: object) -> None:
    """JAX's compilation events: a new program is noted for :func:`release_unused`; once it is
    compiled, and before it first runs, every free page goes back (:func:`_trim`). The
    compiler frees what it used in small pieces between the live ones, where the program's
    buffers do not fit: kept, they added to the first run's peak (the SmolLM2 update at B=1,
    N=256: 0.38 GiB given back, peak RSS 4.37 -> 4.14-4.24 GiB)."""
    global _new_program
    if event == _LOWERED:
        _new_program = True
    elif event == _COMPILED and _kept:
        _trim(0)


def _listen() -> None:
    """Listens to JAX's compilation events (once), from before its first program."""
    global _listening
    if not _listening:
        from jax import monitoring  # malloc is set up: JAX's own threads use the one heap

        monitoring.register_event_duration_secs_listener(_note_program)
        _listening = True


def _trim(keep: int) -> int:
    """``malloc_trim(keep)``: every free page of the heap back, but the top ``keep`` bytes;
    returns the bytes of resident memory that released."""
    before = resident_bytes()
    trim = _libc().malloc_trim
    trim.argtypes = (ctypes.c_size_t,)
    trim(keep)
    return max(before - resident_bytes(), 0)


def release_unused(limit: int | None = None) -> int:
    """Gives the kept heap's unused pages back to the system, where a program's buffers have
    just been freed; returns the bytes of resident memory that released. Does nothing where
    :func:`keep_freed_memory` did not set malloc up.

    - All free pages (``malloc_trim(0)``) when less memory is left than twice what the heap
      holds free (:func:`memory_room`, ``limit`` as there): near the limit.
    - Else, after a new program ran (JAX lowered one since the last call, or this is the first
      call), the free pages *inside* the heap, keeping its top (``malloc_trim(top)``): a
      program's first run leaves its buffer free below allocations made after it, where the
      next run's buffer, once bitten by a small allocation, no longer fits and grows the heap
      by as much again (the SmolLM2 update at N=1,024: peak RSS 7.2 GiB, 5.45 with this).
      The runs after it reuse the top: no page faults.
    - Else nothing.

    XLA frees a run's buffers just after its results are ready: after a new program, or where
    the room left is less than twice the resident memory, this first waits (at most 0.5 s)
    until the heap's free bytes hold still."""
    global _new_program
    if not _kept:
        return 0
    info, room = _mallinfo(), memory_room(limit)
    if info is None:  # glibc < 2.33: nothing tells what the heap holds free
        return 0
    # XLA frees a run's buffers just after its results are ready: wait for them where it
    # matters (a new program's hole; memory that could run short: free may reach resident).
    if _new_program or room < 2 * resident_bytes():
        for _ in range(_SETTLE_POLLS):
            time.sleep(_SETTLE_S)
            last, info = info, _mallinfo()
            if info.fordblks == last.fordblks:
                break
    if room < 2 * info.fordblks:
        keep = 0
    elif _new_program:
        keep = info.keepcost
    else:
        return 0
    _new_program = False
    return _trim(keep)
