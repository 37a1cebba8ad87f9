"""Stop signals: SIGTERM (a scheduler) and SIGINT (Ctrl-C) end a run after the step in flight.

The loop enters :func:`on_stop_signals`, checks ``flag.requested`` after each step, saves with
``force=True`` and exits cleanly (see :mod:`opd_jax.train.checkpoint` for the loop's shape).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType


@dataclass
class PreemptionFlag:
    """Set by the handler of :func:`on_stop_signals`; the loop checks ``requested``."""

    requested: bool = False
    signum: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C again: abandon the step in flight
        self.requested, self.signum = True, signum

    @property
    def interrupted(self) -> bool:
        """Whether the stop came from the keyboard (SIGINT) rather than a scheduler."""
        return self.signum == signal.SIGINT


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def on_stop_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[PreemptionFlag]:
    """Records the first of ``signums`` (SIGTERM from a scheduler, SIGINT from Ctrl-C) in a
    :class:`PreemptionFlag` instead of dying; restores the old handlers.

    Must be entered in the main thread (a Python signal-handling rule). The loop checks
    ``flag.requested`` after each step, saves with ``force=True`` and exits cleanly. A second
    SIGINT raises ``KeyboardInterrupt`` at once (the step in flight is abandoned; the
    :class:`Checkpointer` then removes the partial save it leaves, see ``__exit__``).
    """
    flag = PreemptionFlag()
    previous = {signum: signal.signal(signum, flag._handle) for signum in signums}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
