"""Data sources and the deterministic, checkpointable prompt iterator (grain over TFDS).

Pipeline of :func:`prompt_dataset`, all index-based so any position can be resumed:

    record indices -> shuffle(seed, reshuffled every epoch) -> repeat(num_epochs) ->
    global batch of ``B x shard_count`` indices (drop_remainder) -> this process's rows
    ``[shard_index * B, (shard_index + 1) * B)`` -> read and decode bytes to str

so the global batch of a step is the same whatever the process count, and each process
reads only its own records. A batch of size ``B`` is a dict: text features map to
``list[str]`` of length ``B``, numeric ones to NumPy arrays ``[B]`` (e.g. the arithmetic
task's ``num_steps``, int32). Tokenisation happens downstream.

A damaged build (an unreadable ``dataset_info.json``, a truncated or garbled
``.array_record`` shard, e.g. after a crash or a full disk) raises :class:`DataBuildError`
when the source is opened, naming the build directory to delete: the next load rebuilds it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from opd_jax.data.arithmetic import Arithmetic, arithmetic_builder, arithmetic_config
from opd_jax.data.prompts import PathLike, PromptFiles, prompt_files_builder, prompt_files_config
from opd_jax.errors import InputError

ARITHMETIC = "arithmetic"
Record = dict[str, Any]
Source = grain.sources.RandomAccessDataSource[Record]
Batch = dict[str, list[str] | np.ndarray]


class DataBuildError(InputError):
    """A dataset build on disk that cannot be read; the message names the directory to delete."""


def _damaged(directory: PathLike, error: Exception) -> DataBuildError:
    return DataBuildError(
        f"the dataset build in {directory} is damaged ({type(error).__name__}: {error}); "
        f"delete {directory} and run again to rebuild it."
    )


def build_dir(
    name_or_path: PathLike | Mapping[str, PathLike], data_dir: PathLike, **config: int
) -> Path:
    """Where :func:`build` writes a dataset: ``data_dir/<builder>/<config name>/<version>``."""
    if isinstance(name_or_path, str) and name_or_path == ARITHMETIC:
        cls, name = Arithmetic, arithmetic_config(**config).name
    else:
        cls, name = PromptFiles, prompt_files_config(name_or_path).name
    return Path(data_dir) / cls.name / name / str(cls.VERSION)


def build(
    name_or_path: PathLike | Mapping[str, PathLike], data_dir: PathLike, **config: int
) -> tfds.core.DatasetBuilder:
    """Builds (once; later calls reuse the build) and returns the TFDS builder of a dataset.

    Args:
      name_or_path: ``"arithmetic"`` for the synthetic task; otherwise a prompt file, a
        directory of prompt files, or a ``{split: file}`` map (see :mod:`opd_jax.data.prompts`).
      data_dir: where builds are written and looked up.
      **config: :class:`~opd_jax.data.arithmetic.ArithmeticConfig` fields (arithmetic only).
    """
    if isinstance(name_or_path, str) and name_or_path == ARITHMETIC:
        make = functools.partial(arithmetic_builder, data_dir, **config)
    elif config:
        raise TypeError(f"config fields {sorted(config)} apply only to {ARITHMETIC!r}")
    else:
        make = functools.partial(prompt_files_builder, name_or_path, data_dir)
    try:
        builder = make()  # reads an existing build's dataset_info.json
    except Exception as error:
        # An error of the arguments (e.g. a bad prompt file) recurs in build_dir and is raised.
        directory = build_dir(name_or_path, data_dir, **config)
        if not (directory / "dataset_info.json").exists():
            raise
        raise _damaged(directory, error) from error
    builder.download_and_prepare(file_format="array_record")
    return builder


def load_source(
    name_or_path: PathLike | Mapping[str, PathLike], split: str, data_dir: PathLike, **config: int
) -> Source:
    """The random-access source of one split, building the dataset first if needed.

    Records are dicts of NumPy scalars and ``bytes`` (TFDS ``as_data_source`` decoding);
    :func:`prompt_dataset` turns the bytes into ``str``. Arguments as for :func:`build`.
    """
    builder = build(name_or_path, data_dir, **config)
    if not builder.info.splits:
        raise _damaged(builder.data_dir, ValueError("dataset_info.json lists no splits"))
    if split not in builder.info.splits:
        raise InputError(
            f"no split {split!r} in {builder.info.full_name}; splits: {sorted(builder.info.splits)}"
        )
    source = builder.as_data_source(split=split)
    _check_shards(source, builder.info.splits[split].shard_lengths, builder.data_dir)
    return source


def _check_shards(source: Source, shard_lengths: Sequence[int], directory: PathLike) -> None:
    """Reads the first record of every shard and the last record (a truncated or garbled
    ``.array_record`` file fails at any read, or yields empty features), or raises
    :class:`DataBuildError`."""
    firsts = [0, *itertools.accumulate(shard_lengths)][:-1]
    for index in sorted(i for i in {*firsts, len(source) - 1} if 0 <= i < len(source)):
        try:
            record = source[index]
            if any(value is None for value in record.values()):
                raise ValueError(f"record {index} has empty features")
        except (RuntimeError, ValueError, OSError) as error:
            raise _damaged(directory, error) from None


def _decode(record: Record) -> Record:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


def _read_rows(source: Source, rows: slice, indices: np.ndarray) -> Batch:
    """This process's ``rows`` of a global batch of record ``indices``, read and collated."""
    return _collate([_decode(source[int(i)]) for i in indices[rows]])


def _collate(records: Sequence[Record]) -> Batch:
    return {
        k: [r[k] for r in records]
        if isinstance(records[0][k], str)
        else np.stack([r[k] for r in records])
        for k in records[0]
    }


def prompt_dataset(
    source: Source,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.MapDataset:
    """The batched ``grain.MapDataset`` of this process's shard of ``source``.

    Args:
      source: a random-access source, e.g. from :func:`load_source`.
      batch_size: records per batch ``B`` on this process; the global batch holds
        ``B x shard_count`` records and its last partial batch is dropped.
      seed: shuffle seed in ``[0, 2**32)``; epoch ``e`` is shuffled with ``seed + e``.
      num_epochs: passes over the source; ``None`` repeats forever.
      shard_index, shard_count: this process's block of rows of each global batch; default
        ``jax.process_index()`` and ``jax.process_count()``. Shard ``i`` of ``n`` yields rows
        ``[i B, (i + 1) B)`` of the batches that one process with ``batch_size = n B`` would
        see, so every shard yields the same number of batches and they are disjoint.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(source) < shard_count:
        raise InputError(f"{len(source)} records cannot fill {shard_count} shards")
    rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
    return (
        grain.MapDataset.range(len(source))
        .shuffle(seed=seed)
        .repeat(num_epochs)
        .batch(batch_size * shard_count, drop_remainder=True)
        .map(functools.partial(_read_rows, source, rows))
    )


def make_prompt_iterator(
    source: Source,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DatasetIterator:
    """An iterator of batches (see module doc) over :func:`prompt_dataset`.

    The iterator's ``get_state()`` is a small JSON-serialisable dict; ``set_state(state)`` on
    a fresh iterator built with the same arguments resumes at exactly the same next batch.
    """
    dataset = prompt_dataset(
        source,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return iter(dataset.to_iter_dataset())
