"""Host-side metrics: a durable JSON-lines log, fanned out to the configured loggers.

``<run dir>/metrics.jsonl`` holds one line per :meth:`MetricsWriter.write` call::

    {"step": 10, "time": 1700000000.0, "loss": 0.25, "position_profile": [0.1, ..., 0.3]}

Scalars are floats; arrays are 1-D (e.g. a 20-bin position profile ``[20]``) stored as lists.
Each line is flushed and fsynced, so it is the record of truth. A line cut short by a crash
(no trailing newline: each record is one write ending in one) can only be the last; it is
ignored by :func:`read_metrics` (a reader may also meet a line being written) and dropped,
with a warning, by ``truncate_after`` (on resume, before the writer appends). Any other line
that is not a record raises :class:`MetricsFileError`, naming the file, the line and the fix.

Each record also goes to the loggers of ``run.loggers`` (:mod:`opd_jax.train.loggers`:
TensorBoard events in ``<run dir>/tensorboard``, a Weights & Biases run). They never stop a
run: on any failure a logger warns once and the writer goes on without it; ``metrics.jsonl``
is complete. A failure to write ``metrics.jsonl`` raises (``OSError``), for the loop to end
the run; so does asking for a logger whose package is missing (:class:`InputError`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from opd_jax.errors import InputError
from opd_jax.files import atomic_write_text
from opd_jax.train.loggers import LOGGERS, Logger, open_logger

if TYPE_CHECKING:
    from opd_jax.config import Config

METRICS_FILE = "metrics.jsonl"
RESERVED_KEYS = ("step", "time")


class MetricsFileError(InputError):
    """A complete line of ``metrics.jsonl`` that is not a record (naming the file and line)."""


class MetricsWriter:
    """Appends metrics of a run to ``metrics.jsonl`` and its loggers; a no-op when disabled.

    Args:
      run_dir: the run directory (created if needed).
      loggers: names of :mod:`opd_jax.train.loggers` to write to as well (``run.loggers``).
      project: the W&B project (``run.wandb_project``).
      config: the run's config (``Config.to_dict()``), for W&B.
      enabled: write anything at all; defaults to ``jax.process_index() == 0`` (evaluated
        here, after ``jax.distributed.initialize``), so other processes write nothing.

    Raises:
      InputError: a logger's package is missing (``wandb``: the ``wandb`` extra).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        loggers: Sequence[str] = ("tensorboard",),
        *,
        project: str = "opd_jax",
        config: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file = None
        self._loggers: dict[str, Logger] = {}
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        for name in dict.fromkeys(loggers):
            self._guarded(name, self._open_logger, name, project, config)

    @classmethod
    def for_run(cls, config: Config) -> MetricsWriter:
        """The writer of a run of ``config``: its ``run.dir``, ``run.loggers`` and project."""
        run = config.run
        return cls(run.dir, run.loggers, project=run.wandb_project, config=config.to_dict())

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
        for name, logger in list(self._loggers.items()):
            self._guarded(name, logger.write, step, scalars, arrays or {})

    def truncate_after(self, step: int) -> None:
        """Drops logged lines for steps ``> step`` (on resume from ``step``).

        The JSONL file is rewritten atomically; each logger is restarted after ``step``
        (TensorBoard purges its events from ``step + 1`` on).
        """
        if not self.enabled:
            return
        self._file.close()
        self._file = None
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
        self._file = self.path.open("a")
        for name, logger in list(self._loggers.items()):
            self._guarded(name, logger.restart, step)

    def close(self, failed: bool = False) -> None:
        """Flushes and closes the file and the loggers (``failed``: the run ended by an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        loggers, self._loggers = self._loggers, {}
        for name, logger in loggers.items():
            self._guarded(name, logger.close, failed)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    def _open_logger(self, name: str, project: str, config: Mapping[str, Any] | None) -> None:
        self._loggers[name] = open_logger(name, self.run_dir, project=project, config=config)

    def _guarded(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` of logger ``name``; on an error other than bad input, warns once and
        goes on without that logger."""
        try:
            fn(*args)
        except InputError:
            raise
        except Exception as error:  # A logger is a convenience: nothing of it stops a run.
            self._loggers.pop(name, None)
            kind = LOGGERS[name]
            warnings.warn(
                f"{kind.title} in {self.run_dir / kind.subdir} could not be written "
                f"({type(error).__name__}: {error}); going on without {kind.title} "
                f"({self.path} holds every metric).",
                RuntimeWarning,
                stacklevel=3,
            )


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
