"""What :func:`opd_jax.train.loop.train` checks before it loads any model: a writable
``run.dir``, a resume that keeps the training trajectory (or is allowed to change it), model
directories with one tokenizer, and a data source that opens with records. Each failure names
the key or file at fault and the fix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
import yaml

from opd_jax import data, models
from opd_jax.config import Config, ConfigError
from opd_jax.data.loader import Source
from opd_jax.distributed import primary_first
from opd_jax.train.loggers import import_wandb
from opd_jax.trajectory import HORIZON, trajectory_changes

CONFIG_FILE = "config.yaml"  # the run's config in its directory, written once it starts


def check_writable(run_dir: Path) -> Path:
    """Creates ``run_dir`` and a file in it (returns ``run_dir``), or raises
    :class:`ConfigError`."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise ConfigError(
            f"run.dir={run_dir} is not writable ({error.strerror or error}): choose a "
            "directory you can write to."
        ) from None
    return run_dir


def check_resume(
    config: Config, latest: tuple[int, dict[str, Any]] | None, run_dir: Path
) -> dict[str, list[Any]]:
    """The trajectory keys of ``config`` that differ from the latest checkpoint's run,
    ``{key: [old, new]}``, when ``run.allow_changes`` allows them.

    The checkpoint's meta holds its run's config; older checkpoints, without it, are compared
    with ``config.yaml``.

    Raises:
      ConfigError: keys differ and ``run.allow_changes`` is false.
    """
    if latest is None:
        return {}
    step, meta = latest
    old = meta.get("config") or _read_yaml(run_dir / CONFIG_FILE)
    changes = trajectory_changes(old, config.to_dict()) if old else {}
    if not changes:
        return {}
    if config.run.allow_changes:
        return {key: list(pair) for key, pair in changes.items()}
    horizon = ""
    if HORIZON in changes and changes[HORIZON][0]:
        horizon = (
            f" To change train.steps and keep the schedule, set {HORIZON}="
            f"{changes[HORIZON][0]}, the cosine's horizon so far."
        )
    raise ConfigError(
        f"{run_dir} holds a run at step {step} made with other values of keys that change "
        f"the training trajectory ({listed_changes(changes)}).{horizon} Choose a new run.dir "
        "for the new values, or set run.allow_changes=true to continue this run with them "
        "(recorded in its checkpoints)."
    )


def listed_changes(changes: dict[str, Any]) -> str:
    """``key: old -> new; ...``"""
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def _read_yaml(path: Path) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def check_loggers(config: Config) -> None:
    """The packages of ``run.loggers`` import (``wandb`` is an extra), or
    :class:`opd_jax.errors.InputError` naming the extra."""
    if "wandb" in config.run.loggers:
        import_wandb()


def check_models(config: Config) -> None:
    """Each model path exists, and the checkpoint directories hold one and the same tokenizer
    (read before any weights are)."""
    tokenizers = []
    for role in ("student", "teacher"):
        spec = getattr(config, role)
        path = models.resolve_path(spec.path)
        if not path.exists():
            raise FileNotFoundError(
                f"{role}.path={spec.path}: nothing there; point it at a local Hugging Face "
                "checkpoint directory or a .gguf file."
            )
        if path.is_dir():
            try:
                tokenizers.append(models.load_tokenizer(path))
            except FileNotFoundError as error:
                raise FileNotFoundError(f"{role}.path: {error}") from None
    if len(tokenizers) == 2:
        models.check_same_tokenizer(*tokenizers)


def open_data(config: Config) -> Source:
    """The configured split's source, built first if needed (process 0 first)."""
    tfds.disable_progress_bar()
    c = config.data
    return primary_first(lambda: data.load_source(c.source, c.split, c.data_dir, **c.arithmetic))
