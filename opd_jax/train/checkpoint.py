"""Orbax checkpoints of a training run, with fallback past corrupt steps; a run's student.

Layout: ``<run dir>/checkpoints/<step>/{state,meta}``; ``state`` is a pytree of jax arrays
(params, optimizer state, PRNG keys) saved with ``StandardSave``, ``meta`` a JSON dict (data
iterator position, config, seeds) saved with ``JsonSave``, both in one composite step.

Atomicity is orbax's: a step is written under ``<step>.orbax-checkpoint-tmp*`` and renamed into
place only once complete, so a crash mid-save leaves a temporary directory that is never listed
as a step (and is removed when the next writing manager opens the directory; a read-only one,
``read_only=True``, never writes, removes or moves anything).

Integrity: ``meta`` also holds a fingerprint of the state (:func:`fingerprint`, computed on
device, exact), checked on restore, so bytes changed on disk without changing a file's size
are caught like a truncated file: the step is skipped for an older one.

Multi-process: every process must call :meth:`Checkpointer.save` and
:meth:`Checkpointer.restore` (and ``wait``/``close``) with its own shards; orbax coordinates
the writes, the commit and the barriers. Nothing here is guarded by process rank except moving a
corrupt step aside, which the primary process does between two global barriers.

Typical loop::

    with Checkpointer(run_dir, keep=3) as ckpt, on_stop_signals() as flag:  # stop_signals
        restored = ckpt.restore(abstract_state)
        ...
        for step in range(start, num_steps):
            state = train_step(state, batch)
            if step % every == 0 or flag.requested:
                ckpt.save(step, state, {"data": it.get_state()}, force=flag.requested)
            if flag.requested:
                break
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from opd_jax.config import load_config
from opd_jax.distributed import any_process
from opd_jax.models import Decoder, Tokenizer
from opd_jax.models.lora import merge_lora, split_student
from opd_jax.run_models import load_model
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.state import abstract_state

PyTree = Any
STATE = "state"
META = "meta"
CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written
FINGERPRINT = "fingerprint"  # meta key: [dtype, sum, weighted sum] of each state leaf


class CheckpointRestoreError(RuntimeError):
    """Raised when checkpoints exist but none of them can be read."""


class FingerprintMismatch(ValueError):
    """A restored state whose bits differ from those saved (the step is corrupt)."""


class Restored(NamedTuple):
    """A restored checkpoint: its step, the state (shaped like the target) and the meta dict."""

    step: int
    state: PyTree
    meta: dict[str, Any]


class Checkpointer:
    """Saves and restores ``(state, meta)`` under ``<directory>/checkpoints``, keeping the last k.

    Args:
      directory: the run directory (local path or any ``epath`` URL).
      keep: how many of the newest checkpoints to keep (None: all).
      async_save: write arrays in a background thread after copying them off the device.
      read_only: only read: no save, no removal of temporary directories or old steps, no
        move of a corrupt step (for readers of a run that may be training, e.g. convert).
    """

    def __init__(
        self,
        directory: epath.PathLike,
        *,
        keep: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        # orbax's array store wants absolute paths; a relative run.dir is relative to the cwd.
        local = "://" not in os.fspath(directory)
        self.run_dir = epath.Path(os.path.abspath(directory) if local else directory)
        self.directory = self.run_dir / CHECKPOINTS
        self.read_only = read_only
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, max_to_keep=None, cleanup_tmp_directories=False, create=False
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, META)
        )

    def save(self, step: int, state: PyTree, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving ``state`` and ``meta`` as ``step``; returns whether a save started.

        Asynchronous when ``async_save``: the call returns once the arrays are copied to host,
        and the previous save is awaited first. Orbax skips steps not newer than the latest
        one (and, unless ``force``, steps its save policy declines).

        ``meta`` is saved with the state's :func:`fingerprint` added (key ``fingerprint``).

        Raises:
          TypeError: ``meta`` is not JSON-serialisable (checked before anything is written).
        """
        json.dumps(meta)
        meta = {**meta, FINGERPRINT: fingerprint(state)}
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state: PyTree) -> Restored | None:
        """Restores the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

        Steps are tried newest first; an unreadable one (missing or truncated array files,
        garbled JSON, a state that does not match its fingerprint) is reported with a warning
        naming it, and, once an older step has been restored, moved to
        ``<run dir>/checkpoints_corrupt/`` (unless ``read_only``) so later saves can reuse its
        step.

        Args:
          abstract_state: the target pytree, e.g. ``nnx.state(nnx.eval_shape(make))`` or
            ``jax.ShapeDtypeStruct`` leaves with ``sharding=`` set; arrays land on those
            shardings directly.

        Returns:
          ``Restored(step, state, meta)``, or None when there is no checkpoint.

        Raises:
          CheckpointRestoreError: checkpoints exist but none can be read.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        errors: dict[int, Exception] = {}
        for step in steps:
            restored, error = self._try_restore(step, abstract_state)
            if restored is not None:
                self._quarantine(sorted(errors))
                return restored
            errors[step] = error
            warnings.warn(
                f"Checkpoint step {step} in {self.directory} is unreadable "
                f"({_describe(error)}); trying an older step.",
                stacklevel=2,
            )
        details = "; ".join(f"step {s}: {_describe(e)}" for s, e in errors.items())
        raise CheckpointRestoreError(
            f"No readable checkpoint in {self.directory} ({details})."
        ) from errors[steps[0]]

    def read_meta(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, meta)`` of the newest step whose meta is readable (its state is not read),
        without the fingerprint; None when there is no such step."""
        args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = dict(self._manager.restore(step, args=args)[META])
            except Exception:  # Unreadable: restore() reports it, with the state's errors.
                continue
            meta.pop(FINGERPRINT, None)
            return step, meta
        return None

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def saved_steps(self) -> list[int]:
        """The steps complete on disk, read from the directory after pending saves end (a
        save that failed leaves its step out)."""
        with contextlib.suppress(Exception):
            self.wait()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed; raises their errors."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # The error in flight says what went wrong.
            self.close()
        if isinstance(exc, KeyboardInterrupt):
            self.remove_partial_saves()

    def remove_partial_saves(self) -> None:
        """Removes the temporary directories of saves that never completed (an interrupted
        save; orbax would remove them when a writing manager next opens the directory).
        Primary process only; nothing when ``read_only``."""
        if self.read_only or not ocp.multihost.is_primary_host(0):
            return
        for partial in self.directory.glob(f"*{TMP_SUFFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)

    def _try_restore(
        self, step: int, abstract_state: PyTree
    ) -> tuple[Restored | None, Exception | None]:
        """Restores ``step``; on failure returns the error (agreed on by all processes)."""
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        )
        try:
            result = self._manager.restore(step, args=args)
            meta = dict(result[META])
            check_fingerprint(result[STATE], meta.pop(FINGERPRINT, None))
            restored, error = Restored(step, result[STATE], meta), None
        except Exception as e:  # Corruption surfaces as many exception types.
            restored, error = None, e
        if not _all_processes_ok(restored is not None):
            error = error or RuntimeError("unreadable on another process")
            return None, error
        return restored, None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves corrupt ``steps`` out of the step directory (primary process, then barrier);
        nothing when ``read_only``."""
        if not steps or self.read_only:
            return
        target_dir = self.run_dir / CORRUPT
        if ocp.multihost.is_primary_host(0):
            target_dir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = _unused_path(target_dir / str(step))
                (self.directory / str(step)).rename(target)
                warnings.warn(f"Moved unreadable checkpoint step {step} to {target}.", stacklevel=3)
        ocp.multihost.sync_global_processes("opd_jax:checkpoint_quarantine")
        self._manager.reload()


def fingerprint(state: PyTree) -> list[list[Any]]:
    """``[dtype, sum, weighted sum]`` of each leaf of ``state``: its bits as unsigned integers
    (64-bit values as two uint32 words), summed in wrapping uint32 arithmetic plainly and
    weighted by the 1-based flat position. Exact integer sums: the same for any reduction
    order or sharding; computed on device, only ``2 x leaves`` integers come back."""
    leaves = jax.tree.leaves(state)
    if not leaves:
        return []
    sums = np.asarray(_leaf_sums(leaves)).tolist()
    return [[str(leaf.dtype), *pair] for leaf, pair in zip(leaves, sums, strict=True)]


def check_fingerprint(state: PyTree, saved: list[list[Any]] | None) -> None:
    """Raises :class:`FingerprintMismatch` naming the first leaf of ``state`` whose
    :func:`fingerprint` differs from ``saved`` (None: a checkpoint saved without one). A leaf
    restored into another dtype than it was saved in (orbax casts) is not compared."""
    if saved is None:
        return
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    if len(paths) != len(saved):
        raise FingerprintMismatch(f"{len(paths)} arrays restored, {len(saved)} saved")
    for path, now, then in zip(paths, fingerprint(state), saved, strict=True):
        if now[0] == then[0] and now != then:
            raise FingerprintMismatch(f"{path} differs from the saved fingerprint")


def _bits(x: jax.Array) -> jax.Array:
    """``x``'s bits as unsigned integers of its width (PRNG keys: their key data)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    width = min(x.dtype.itemsize, 4)  # 64-bit values become two uint32 words (last axis)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}"))


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> jax.Array:
    """``[leaves, 2]`` uint32: each leaf's plain and position-weighted wrapping sums."""
    rows = []
    for leaf in leaves:
        words = _bits(leaf).astype(jnp.uint32)
        positions = jnp.ones(words.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(words.ndim)):
            iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
            positions = positions + iota * jnp.uint32(stride % 2**32)
            stride *= words.shape[axis]
        rows.append(
            jnp.stack([words.sum(dtype=jnp.uint32), (words * positions).sum(dtype=jnp.uint32)])
        )
    return jnp.stack(rows)


def _all_processes_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every process, so all of them fall back to the same step.

    Not orbax's ``global_max``: its ``shard_map`` fails under the loop's ``jax.set_mesh``.
    """
    return not any_process(not ok)


def _unused_path(path: epath.Path) -> epath.Path:
    """``path``, or ``path.1``, ``path.2``, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _describe(error: BaseException) -> str:
    """The exception's type and the first line of its message, at most 200 characters."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def restore_student(run_dir: str | Path) -> tuple[Decoder, Tokenizer]:
    """A run's student at its last good checkpoint, and its tokenizer. A LoRA run's
    checkpoints hold its adapters alone: they are restored onto its base (``student.path``)
    and merged into it (:func:`~opd_jax.models.lora.merge_lora`), a plain Decoder.

    The run is only read, so this is safe while it trains: its checkpoints are opened
    read-only (no removal of the temporary directory of a save in progress, no move of a
    corrupt step).

    Raises:
      FileNotFoundError: the run has no checkpoint yet.
      CheckpointRestoreError: it has checkpoints, none of them readable.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    model, tokenizer = load_model(config.student)  # with its adapters (student.lora)
    _, trained, _ = split_student(model)
    target = abstract_state(make_optimizer(config.optim, config.train.steps), trained)
    with Checkpointer(run_dir, read_only=True) as checkpointer:
        restored = checkpointer.restore(target._asdict())
    if restored is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet: train first, then convert.")
    nnx.update(model, restored.state["params"])
    return merge_lora(model), tokenizer
