"""One run directory, one run: an OS file lock on ``RUN_DIR/.lock``.

:func:`hold` takes a non-blocking ``flock`` on the lock file before anything else is written
to the directory, so a second ``opd-jax train`` (or ``experiment``) on the same ``run.dir``
fails at once with :class:`RunDirLocked` instead of interleaving checkpoints and metrics. The
kernel releases the lock when its process ends, however it ends: a crash or ``kill -9`` never
leaves a stale lock behind. The file records its holder (PID, host name, command) for the
error message; it is written after the lock is taken and never deleted (deleting it would let
a second process lock a new file of the same name while the first still holds the old one).

Readers (``eval``, ``sample``, ``convert`` of a run still training) take no lock;
:func:`holder` says who holds one, e.g. to refuse writing into a locked directory. In a
multi-process JAX run only process 0 holds it (``hold(..., primary=is_primary())``). This
module does not import JAX.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from opd_jax.typed_yaml import ConfigError

LOCK_FILE = ".lock"


class RunDirLocked(ConfigError):
    """The run directory is held by another process (or another ``hold`` in this one)."""


def _describe(text: str) -> str:
    """`` `COMMAND` (PID p on host h)`` from the lock file's JSON; a vaguer phrase when the
    holder has not written it yet (it writes just after taking the lock)."""
    try:
        info = json.loads(text)
        return f"`{info['command']}` (PID {info['pid']} on host {info['host']})"
    except (ValueError, TypeError, KeyError):
        return "another process"


def holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds ``run_dir``'s lock now (e.g. `` `opd-jax train` (PID 1234 on host h)``), or
    None when nobody does (no lock file, or an unlocked one). Takes no lock of its own beyond
    an instant's shared probe; writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        f = path.open("rb")
    except (FileNotFoundError, NotADirectoryError):
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(f.read().decode("utf-8", "replace"))
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def _open_lock_file(run_dir: Path):
    """Creates ``run_dir`` and opens its lock file for writing, or raises :class:`ConfigError`
    naming the directory and the fix."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is a file, not a directory: choose another run.dir, or move the file."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return (run_dir / LOCK_FILE).open("a+b")
    except OSError as error:
        raise ConfigError(
            f"{run_dir} is not writable ({error.strerror or error}): choose a directory you "
            "can write to."
        ) from None


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike, command: str, *, primary: bool = True) -> Iterator[Path]:
    """Holds ``run_dir`` (created if needed) for this process while the block runs.

    Args:
      run_dir: the run directory.
      command: what holds it, for the message another process gets, e.g. ``"opd-jax train"``.
      primary: whether this process takes the lock; pass ``is_primary()`` so that only
        process 0 of a multi-process run does (the others yield at once).

    Yields:
      ``run_dir`` as a :class:`Path`.

    Raises:
      RunDirLocked: another process (or another ``hold`` here) holds it; the message names the
        holder's command, PID and host.
      ConfigError: ``run_dir`` is a file or cannot be created or written.
    """
    run_dir = Path(run_dir)
    if not primary:
        yield run_dir
        return
    with _open_lock_file(run_dir) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = _describe(f.read().decode("utf-8", "replace"))
            raise RunDirLocked(
                f"{run_dir} is in use by {who}: wait for it to finish, or choose another run.dir."
            ) from None
        try:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
            f.truncate(0)  # append mode: the write lands at the (new) end, offset 0
            f.write(json.dumps(info).encode() + b"\n")
            f.flush()
            yield run_dir
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
