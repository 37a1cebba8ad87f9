"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases.

A :class:`Logger` takes ``write(step, scalars, arrays)`` (host values), ``restart(step)`` (the
run goes on after ``step``, e.g. resumed from its checkpoint) and ``close(failed)``; its
class's ``title`` and ``subdir`` (in the run directory) name it in warnings. :func:`open_logger`
builds one by its ``run.loggers`` name (:data:`LOGGERS`). Both write each 1-D array as per-bin
scalars ``<name>/00``, ``<name>/01``, ... (a profile is a set of values over positions, not a
sample of one quantity, so a histogram would misrepresent it).

- ``tensorboard``: event files in ``<run dir>/tensorboard``, written synchronously, without
  tensorboardX's writer thread and queue (whose thread dies on a full disk and leaves the queue
  to block the loop forever); a restart marks ``purge_step`` so TensorBoard hides the steps
  that follow it in earlier files.
- ``wandb`` (the ``wandb`` extra, imported only here and only when asked for): one W&B run per
  run directory, named after it, with the run's config; its id is kept in
  ``<run dir>/wandb_id`` so that a resumed run continues the same W&B run (``resume="allow"``).
  It starts at the first write (a run already finished never opens it); a run that starts
  from step 0 starts a new W&B run. W&B keeps the values it has of a step: steps logged after
  the checkpoint a run resumes from keep their first values there (``metrics.jsonl`` holds the
  resumed ones). ``WANDB_MODE`` and the other ``WANDB_*`` variables apply as W&B reads them
  (``WANDB_MODE=offline``: files in ``<run dir>/wandb``, for ``wandb sync``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol

import numpy as np
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import scalar

from opd_jax.errors import InputError
from opd_jax.files import atomic_write_text

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # W&B's own directory under the one it is given
WANDB_ID_FILE = "wandb_id"
WANDB_EXTRA = 'pip install "opd_jax[wandb]"'


class Logger(Protocol):
    title: ClassVar[str]  # how warnings name it
    subdir: ClassVar[str]  # where its files are in the run directory

    def write(
        self, step: int, scalars: Mapping[str, float], arrays: Mapping[str, np.ndarray]
    ) -> None: ...

    def restart(self, step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def open_logger(
    name: str, run_dir: Path, *, project: str, config: Mapping[str, Any] | None = None
) -> Logger:
    """The logger called ``name`` in ``run.loggers`` for ``run_dir`` (``project``, ``config``:
    the W&B project and the run's config, e.g. ``Config.to_dict()``)."""
    if name == "tensorboard":
        return TensorBoardLogger(run_dir)
    if name == "wandb":
        return WandbLogger(run_dir, project=project, config=config)
    raise ValueError(f"No logger called {name!r}; there are {list(LOGGERS)}.")


def import_wandb() -> ModuleType:
    """The ``wandb`` module, or :class:`InputError` naming the extra that installs it."""
    try:
        import wandb
    except ImportError as error:
        raise InputError(
            f"run.loggers has wandb, but the wandb package cannot be imported ({error}): "
            f"{WANDB_EXTRA}, or leave wandb out of run.loggers."
        ) from None
    return wandb


class TensorBoardLogger:
    """Event files under ``<run_dir>/tensorboard``, a new one from each (re)start."""

    title: ClassVar[str] = "TensorBoard"
    subdir: ClassVar[str] = TENSORBOARD_DIR

    def __init__(self, run_dir: Path):
        self.where = Path(run_dir) / TENSORBOARD_DIR
        self._file = EventFile(self.where)

    def write(
        self, step: int, scalars: Mapping[str, float], arrays: Mapping[str, np.ndarray]
    ) -> None:
        self._file.write(step, flat_scalars(scalars, arrays))

    def restart(self, step: int) -> None:
        self._file.close()
        self._file = EventFile(self.where, purge_step=step + 1)

    def close(self, failed: bool = False) -> None:
        self._file.close()


class WandbLogger:
    """One W&B run for ``run_dir`` (see the module doc); ``resume=False``: a new W&B run
    whose id is not kept. ``name`` defaults to the directory's name."""

    title: ClassVar[str] = "W&B"
    subdir: ClassVar[str] = WANDB_DIR

    def __init__(
        self,
        run_dir: Path,
        *,
        project: str,
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        resume: bool = True,
    ):
        self._wandb = import_wandb()
        run_dir = Path(run_dir)
        config = json.loads(json.dumps(dict(config or {}), default=str))  # W&B takes JSON
        self._init = dict(
            project=project, name=name or run_dir.name, dir=str(run_dir), config=config
        )
        self._id_file = run_dir / WANDB_ID_FILE if resume else None
        self._run = None

    def write(
        self, step: int, scalars: Mapping[str, float], arrays: Mapping[str, np.ndarray]
    ) -> None:
        self._started().log(dict(flat_scalars(scalars, arrays)), step=int(step))

    def images(self, step: int, paths: Mapping[str, Path]) -> None:
        """Logs each image file of ``paths`` under its name at ``step``."""
        image = self._wandb.Image
        self._started().log({name: image(str(path)) for name, path in paths.items()}, step=step)

    def restart(self, step: int) -> None:
        if step == 0 and self._run is None and self._id_file is not None:
            self._id_file.unlink(missing_ok=True)  # nothing kept of an earlier start: a new run

    def close(self, failed: bool = False) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=1 if failed else 0)

    def _started(self) -> Any:
        if self._run is None:
            self._run = self._wandb.init(**self._init, id=self._run_id(), resume="allow")
        return self._run

    def _run_id(self) -> str:
        """The kept id, or a new one (kept when ``resume``)."""
        if self._id_file is not None and self._id_file.is_file():
            return self._id_file.read_text().strip()
        run_id = secrets.token_hex(6)
        if self._id_file is not None:
            atomic_write_text(self._id_file, run_id + "\n")
        return run_id


LOGGERS: dict[str, type[Logger]] = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


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

    def write(self, step: int, values: list[tuple[str, float]]) -> None:
        """One event of ``step`` holding the ``(tag, value)`` scalars."""
        summary = Summary(value=[v for tag, x in values for v in scalar(tag, x).value])
        self._writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def flat_scalars(
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
