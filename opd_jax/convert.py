"""``opd-jax convert``: Hugging Face / GGUF checkpoints <-> orbax, and a run's student -> HF.

- SRC a Hugging Face directory or ``.gguf`` file: DST becomes an orbax directory holding the
  parameters (``params/``), ``config.json`` and the tokenizer files.
- SRC such an orbax directory: DST becomes a Hugging Face directory.
- SRC a run directory (``config.yaml`` + ``checkpoints/``): its student at the last good
  checkpoint is written to DST as a Hugging Face directory (loadable by transformers, vLLM);
  a LoRA run's adapters are merged into its base (``student.path``) first.

Convert never destroys: an existing non-empty DST is replaced only with ``overwrite``, and
never when it is, holds or (existing) lies inside the source or one of a run source's models
(``student.path``, ``teacher.path``), or a run directory another process holds
(:mod:`opd_jax.run_lock`). The output is written into a temporary sibling of DST and renamed
into place once complete, so a crash leaves the old DST (or none), never a half-written one:
at worst, between the two renames that swap them, the old one waits beside it as
``.DST.*.old``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import orbax.checkpoint as ocp
import yaml
from flax import nnx

from opd_jax import models
from opd_jax.models import Decoder, ModelConfig
from opd_jax.run_lock import holder
from opd_jax.train.checkpoint import restore_student
from opd_jax.train.state import abstract_like
from opd_jax.typed_yaml import ConfigError

MARKER = "opd_jax_orbax.json"
RUN_CONFIG = "config.yaml"


def to_orbax(model: Decoder, tokenizer, dst: Path) -> None:
    """Writes ``model``'s parameters with orbax beside its config and tokenizer."""
    dst.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(
            (dst / "params").absolute(), nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True
        )
    (dst / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    tokenizer.save_pretrained(str(dst))
    (dst / MARKER).write_text(json.dumps({"format": "opd_jax orbax params", "version": 1}))


def from_orbax(src: Path) -> tuple[Decoder, object]:
    """The model and tokenizer of a directory written by :func:`to_orbax`."""
    config = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    model = Decoder(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        pure = checkpointer.restore(
            (src / "params").absolute(), abstract_like(nnx.to_pure_dict(params))
        )
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    return model, models.load_tokenizer(src)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory (``config.yaml`` and ``checkpoints/``)."""
    return (path / RUN_CONFIG).is_file() and (path / "checkpoints").is_dir()


def _protected(src: Path) -> dict[str, Path]:
    """``{what: path}`` that convert never writes into: the source and, for a run directory,
    the models its ``config.yaml`` names."""
    paths = {"the source": src}
    if is_run_dir(src):
        try:
            run = yaml.safe_load((src / RUN_CONFIG).read_text())
        except yaml.YAMLError:
            run = None  # restoring the run reports it, before anything is written
        for role in ("student", "teacher"):
            spec = run.get(role) if isinstance(run, dict) else None
            path = spec.get("path") if isinstance(spec, dict) else None
            if isinstance(path, str) and path:
                paths[f"the run's {role}.path"] = models.resolve_path(path)
    return paths


def _relation(dst: Path, path: Path) -> str | None:
    """How ``dst`` overlaps ``path`` ("is", "is inside", "contains"), or None."""
    a, b = dst.resolve(), path.resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_destination(src: Path, dst: Path, *, overwrite: bool = False) -> None:
    """Raises :class:`ConfigError` (naming DST and why) unless convert may write ``dst``.

    Always refused: ``dst`` overlapping the source or a run source's models (a new folder
    inside one is allowed: it replaces nothing), a file, a run directory held by another
    process. Refused without ``overwrite``: a non-empty ``dst``.
    """
    for what, path in _protected(src).items():
        relation = _relation(dst, path)
        if relation == "is inside" and not dst.exists():
            continue  # a new folder inside it (e.g. RUN/hf) adds to it, replacing nothing
        if relation:
            raise ConfigError(
                f"DST {dst} {relation} {what} ({path}): convert never writes over its source "
                "or a run's models, even with --overwrite; choose another DST."
            )
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"DST {dst} is a file: name a directory to write, or remove the file.")
    who = holder(dst)
    if who:
        raise ConfigError(
            f"DST {dst} is a run directory in use by {who}: choose another DST, even with "
            "--overwrite."
        )
    if not overwrite and dst.is_dir() and any(dst.iterdir()):
        raise ConfigError(
            f"DST {dst} exists and is not empty: convert leaves it untouched; pass --overwrite "
            "to replace it, or choose another DST."
        )


def _sync_tree(root: Path) -> None:
    """fsyncs every file under ``root`` and the directories holding them."""
    for directory, _, files in os.walk(root):
        for name in [*files, "."]:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def replacing(dst: Path) -> Iterator[Path]:
    """Yields a new empty sibling directory of ``dst`` to write; once the block completes, it
    replaces ``dst`` (renames, the old one removed last). On an error it is removed and
    ``dst`` is left as it was."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    stem = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}"
    tmp, old = stem.with_name(stem.name + ".tmp"), stem.with_name(stem.name + ".old")
    tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def convert(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> None:
    """Converts ``src`` to ``dst`` (see the module docstring for the directions and guards).

    Raises:
      FileNotFoundError: nothing at ``src``, or a run without a checkpoint.
      ConfigError: ``dst`` may not be written (:func:`check_destination`).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"No checkpoint or run directory at {src}.")
    check_destination(src, dst, overwrite=overwrite)
    if is_run_dir(src):
        model, tokenizer, write = *restore_student(src), models.save_hf
    elif (src / MARKER).is_file():
        model, tokenizer, write = *from_orbax(src), models.save_hf
    else:
        model, tokenizer, write = *models.load(src), to_orbax
    with replacing(dst) as out:
        write(model, tokenizer, out)
