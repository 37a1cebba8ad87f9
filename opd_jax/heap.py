"""Host memory on CPU: keep what malloc frees, so XLA's step buffers are not faulted in anew.

XLA:CPU allocates each execution's temporary buffer with ``malloc`` (3 GiB for the SmolLM2
OPD update at B=4, N=256). glibc serves a request that large with a fresh ``mmap`` and unmaps
it on ``free``, so every step touches its buffer's pages for the first time again: 0.9 million
page faults and 1.7 s of kernel time in a 9 s step on 2 cores, and more when another
framework shares the process. :func:`keep_freed_memory` makes glibc serve every thread from
its main heap, never ``mmap`` and never return the heap's top to the system; the buffer is
then reused from step to step: no faults, that update 8.9 -> 8.0 s alone and 83.8 -> 124.9
tokens/s alternating with PyTorch in one process (PyTorch's own 108 -> 124); at B=16 33 s
against 43 s. The price: the process keeps its heap until it exits. One JAX program's steps
reuse it (the SmolLM2 update's peak RSS 13.2 GiB at B=16, 13.5 with the system's malloc); a
process that mixes programs of other shapes or another framework may hold more than its live
peak (PyTorch and opd_jax alternating at B=16 in one process were killed at 24 GB on a 23 GiB
machine): run such a process with ``OPD_JAX_HEAP=system``.

The command line calls it before JAX starts (threads pick their heap at their first
allocation); a script that imports opd_jax calls it the same way, before any array is made.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
OPT_OUT = "OPD_JAX_HEAP"  # "system": leave malloc as it is


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


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one heap, no ``mmap`` and no trimming (see the module); returns
    whether it did. Does nothing (False) off Linux/glibc, where an accelerator may run, or
    with ``OPD_JAX_HEAP=system``. Call it before JAX starts its CPU backend."""
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return False
    if not sys.platform.startswith("linux") or _accelerator_present():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # glibc widens the int to size_t: -1 is "never trim".
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
