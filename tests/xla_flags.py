"""XLA flags of the test processes.

The tests' models are tiny: compiling their programs, not running them, is most of the suite's
time. Both flags shorten XLA:CPU's LLVM code generation (opt level 0, its costliest passes
off): the programs' HLO is the same, only their machine code differs. On 2 cores,
test_stop_at_release.py and test_train.py took 210 s with them, 300 s without (one after the
other, the same hour). ``tests/conftest.py`` puts them in front of
``XLA_FLAGS`` (a caller's own flags come later and win); a test that starts a process on
several devices passes :func:`with_devices` on.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_devices(count: int) -> str:
    """This process's ``XLA_FLAGS`` with ``count`` host-platform (CPU) devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
