"""Host-side metrics: a durable JSON-lines log plus TensorBoard (tensorboardX, no TensorFlow).

``<run dir>/metrics.jsonl`` holds one line per :meth:`MetricsWriter.write` call::

    {"step": 10, "time": 1700000000.0, "loss": 0.25, "position_profile": [0.1, ..., 0.3]}

Scalars are floats; arrays are 1-D (e.g. a 20-bin position profile ``[20]``) stored as lists.
Each line is flushed and fsynced, so it is the record of truth. A line cut short by a crash
(no trailing newline: each record is one write ending in one) can only be the last; it is
ignored by :func:`read_metrics` (a reader may also meet a line being written) and dropped,
with a warning, by ``truncate_after`` (on resume, before the writer appends). Any other line
that is not a record raises :class:`MetricsFileError`, naming the file, the line and the fix.

TensorBoard events go to ``<run dir>/tensorboard``: scalars under their names, and each array
as per-bin scalars ``<name>/00``, ``<name>/01``, ... (a profile is a set of values over
positions, not a sample of one quantity, so a histogram would misrepresent it). They are
written synchronously, without tensorboardX's writer thread and queue (whose thread dies on a
full disk and leaves the queue to block the loop forever), and never stop a run: on any
failure the writer warns once and goes on without TensorBoard; ``metrics.jsonl`` is complete.
A failure to write ``metrics.jsonl`` raises (``OSError``), for the loop to end the run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import scalar

from opd_jax.errors import InputError
from opd_jax.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "time")


class MetricsFileError(InputError):
    """A complete line of ``metrics.jsonl`` that is not a record (naming the file and line)."""


class MetricsWriter:
    """Appends metrics of a run to ``metrics.jsonl`` and TensorBoard; a no-op when disabled.

    Args:
      run_dir: the run directory (created if needed).
      tensorboard: also write TensorBoard events.
      enabled: write anything at all; defaults to ``jax.process_index() == 0`` (evaluated
        here, after ``jax.distributed.initialize``), so other processes write nothing.
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool | None = None
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tensorboard = tensorboard and self.enabled
        self._file = None
        self._tb = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._open()

    def write(
        self,
        step: int,
        scalars: Mapping[str, float],
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Logs ``scalars`` and 1-D ``arrays`` at ``step`` (host values; no device sync here)."""
        if not self.enabled:
            return
        record = _record(step, scalars, arrays or {})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tensorboard_call(self._tb.write, step, scalars, arrays or {})

    def truncate_after(self, step: int) -> None:
        """Drops logged lines for steps ``> step`` (on resume from ``step``).

        The JSONL file is rewritten atomically; TensorBoard is told to purge its events from
        ``step + 1`` on (``purge_step``).
        """
        if not self.enabled:
            return
        self._close_files()
        lines, torn = _read_lines(self.path)
        if torn:
            warnings.warn(
                f"{self.path}: dropped its last line, cut short by a crash ({len(torn)} bytes "
                "without a newline).",
                RuntimeWarning,
                stacklevel=2,
            )
        kept = [line for line, record in lines if record["step"] <= step]
        atomic_write_text(self.path, "".join(kept))
        self._open(purge_step=step + 1)

    def close(self) -> None:
        """Flushes and closes the files."""
        self._close_files()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self, purge_step: int | None = None) -> None:
        self._file = self.path.open("a")
        if self._tensorboard:
            self._tb = self._tensorboard_call(
                EventFile, self.run_dir / TENSORBOARD_DIR, purge_step=purge_step
            )

    def _close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tensorboard_call(self._tb.close)
            self._tb = None

    def _tensorboard_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; on any error, warns once and turns TensorBoard off."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # TensorBoard is a convenience: nothing of it stops a run.
            self._tensorboard, self._tb = False, None
            warnings.warn(
                f"TensorBoard events in {self.run_dir / TENSORBOARD_DIR} could not be written "
                f"({type(error).__name__}: {error}); going on without TensorBoard "
                f"({self.path} holds every metric).",
                RuntimeWarning,
                stacklevel=3,
            )
            return None


class EventFile:
    """One TensorBoard event file under ``logdir``, written and flushed synchronously.

    ``purge_step``: TensorBoard hides the events of earlier files from this step on (a resumed
    run's restart point), as tensorboardX's ``SummaryWriter(purge_step=)`` marks it.
    """

    def __init__(self, logdir: Path, *, purge_step: int | None = None):
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(logdir / "events"))
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._writer.write_event(
                Event(wall_time=time.time(), step=purge_step, session_log=start)
            )
        self._writer.flush()

    def write(
        self, step: int, scalars: Mapping[str, float], arrays: Mapping[str, np.ndarray]
    ) -> None:
        """One event of ``step``: scalars, and each array as per-bin scalars ``<name>/<bin>``."""
        values = [
            value for name, x in _flat_scalars(scalars, arrays) for value in scalar(name, x).value
        ]
        self._writer.write_event(
            Event(wall_time=time.time(), step=step, summary=Summary(value=values))
        )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` in file order (empty if there is none).

    Raises:
      MetricsFileError: a complete line that is not a record.
    """
    return [record for _, record in _read_lines(Path(run_dir) / METRICS_FILE)[0]]


def _record(
    step: int, scalars: Mapping[str, float], arrays: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """The JSON record of one write; rejects reserved, duplicate or non-1-D entries."""
    names = [*scalars, *arrays]
    if len(set(names)) != len(names) or set(names) & set(RESERVED_KEYS):
        raise ValueError(f"Metric names must be unique and not in {RESERVED_KEYS}: {names}")
    for name, value in arrays.items():
        if np.ndim(value) != 1:
            raise ValueError(f"Array metric {name!r} must be 1-D, got shape {np.shape(value)}")
    record: dict[str, Any] = {"step": int(step), "time": time.time()}
    record |= {name: float(value) for name, value in scalars.items()}
    record |= {name: np.asarray(value, np.float64).tolist() for name, value in arrays.items()}
    return record


def _flat_scalars(
    scalars: Mapping[str, float], arrays: Mapping[str, np.ndarray]
) -> list[tuple[str, float]]:
    """``(tag, value)`` of each scalar, then of each bin ``<name>/<bin>`` of each array."""
    flat = [(name, float(value)) for name, value in scalars.items()]
    for name, values in arrays.items():
        width = len(str(len(values) - 1))
        flat += [
            (f"{name}/{i:0{width}d}", float(value))
            for i, value in enumerate(np.asarray(values, np.float64))
        ]
    return flat


def _read_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], bytes]:
    """``([(line, record), ...], torn)``: each newline-terminated line of ``path`` (blank ones
    skipped) with its record, and the bytes of a torn last line (``b""`` when none)."""
    if not path.exists():
        return [], b""
    lines = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return lines, raw  # only the last line can lack its newline
            if raw.strip():
                lines.append(_parse_line(raw, path, number))
    return lines, b""


def _parse_line(raw: bytes, path: Path, number: int) -> tuple[str, dict[str, Any]]:
    """``(line, record)`` of line ``number`` of ``path``, or :class:`MetricsFileError`."""
    try:
        line = raw.decode("utf-8")
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError("not an object with an integer 'step'")
    except ValueError as error:
        raise MetricsFileError(
            f"{path}, line {number}: not a metrics record ({error}); delete that line (only "
            "its step's logged metrics are lost, the checkpoints are unaffected) and run again."
        ) from None
    return line, record
