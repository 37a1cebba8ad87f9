"""User prompt sets: local JSONL or Parquet files built into TFDS array_record datasets.

Each record needs a non-empty string ``prompt``; ``answer`` is optional (a string or a number,
stored as a string, ``""`` when absent); every other field is ignored. So DeepMath, DAPO-Math
or AIME-style files load as they are. One file is one split, named by a mapping or by the file
stem (characters outside ``[A-Za-z0-9_]`` become ``_``). :func:`read_records` reads the records
of any such file (evaluation's benchmark files too).

Builds land in ``data_dir/opd_prompt_files/files-<hash>/1.0.0``, where the hash covers the
split names and the bytes of every file: editing a file gives a new directory, so the next
load rebuilds instead of reusing stale data (older builds stay on disk until removed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from opd_jax.errors import InputError

PROMPT_SUFFIXES = (".jsonl", ".parquet")
PathLike = str | os.PathLike
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class PromptFileError(InputError):
    """A prompt file that cannot be read; the message names the file, record and field."""


def read_records(
    path: PathLike, columns: Sequence[str] | None = None
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yields ``(position, where, record)`` for each record of a ``.jsonl`` or ``.parquet`` file.

    ``position`` is the 1-based line number in a ``.jsonl`` file (blank lines are skipped) or
    the 0-based row index in a ``.parquet`` file; ``where`` names it for error messages
    (``"<path>, line 3"``, ``"<path>, row 0"``). ``columns``: the Parquet columns read (those
    the file lacks are left out; ``None`` reads all); JSONL records are whole.

    Raises:
      PromptFileError: an unsupported suffix, a line not in UTF-8, invalid JSON, or a record
        that is not an object.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}, line {line_number}"
                line = _utf8(raw, where, bom=line_number == 1)
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{where}: invalid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise PromptFileError(
                        f"{where}: expected a JSON object, got {type(row).__name__}"
                    )
                yield line_number, where, row
    elif path.suffix == ".parquet":
        if columns is not None:
            columns = [c for c in columns if c in pq.read_schema(path).names]
        for row_index, row in enumerate(pq.read_table(path, columns=columns).to_pylist()):
            yield row_index, f"{path}, row {row_index}", row
    else:
        raise PromptFileError(f"{path}: unsupported suffix, expected one of {PROMPT_SUFFIXES}")


def _utf8(raw: bytes, where: str, *, bom: bool = False) -> str:
    """``raw`` decoded as UTF-8 (a leading byte-order mark dropped when ``bom``).

    Raises:
      PromptFileError: naming ``where``, the first bad byte and the fix.
    """
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(
            f"{where}: not UTF-8 (byte {e.start + 1} of the line is {raw[e.start]:#04x}); save "
            "the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _answer(value: object, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise PromptFileError(
        f"{where}: field 'answer' must be a string or a number, got {type(value).__name__}"
    )


def _record(row: dict[str, Any], where: str) -> dict[str, str]:
    if "prompt" not in row:
        raise PromptFileError(f"{where}: missing field 'prompt'")
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise PromptFileError(
            f"{where}: field 'prompt' must be a non-empty string, got {prompt!r:.60}"
        )
    return {"prompt": prompt, "answer": _answer(row.get("answer"), where)}


def read_prompt_file(path: PathLike) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields ``(position, {"prompt": str, "answer": str})`` for each record of ``path``
    (``position`` as in :func:`read_records`).

    Raises:
      PromptFileError: naming the file, line or row, and field of the first bad record.
    """
    path = Path(path)
    if path.suffix == ".parquet" and "prompt" not in (names := pq.read_schema(path).names):
        raise PromptFileError(f"{path}: missing column 'prompt' (columns: {names})")
    for position, where, row in read_records(path, columns=("prompt", "answer")):
        yield position, _record(row, where)


def split_name(path: PathLike) -> str:
    """The split a file becomes by default: its stem, with ``[^A-Za-z0-9_]`` mapped to ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", Path(path).stem)


def resolve_files(files: PathLike | Mapping[str, PathLike]) -> dict[str, Path]:
    """``{split: file}`` from a file, a directory of prompt files, or a ``{split: file}`` map;
    each file must exist, have a prompt suffix and hold at least one record."""
    if isinstance(files, Mapping):
        resolved = {split: Path(path) for split, path in files.items()}
    else:
        root = Path(files)
        paths = (
            sorted(p for p in root.iterdir() if p.suffix in PROMPT_SUFFIXES)
            if root.is_dir()
            else [root]
        )
        resolved = {}
        for path in paths:
            if split_name(path) in resolved:
                raise PromptFileError(
                    f"{path} and {resolved[split_name(path)]} both map to "
                    f"split {split_name(path)!r}: pass a {{split: file}} map"
                )
            resolved[split_name(path)] = path
    if not resolved:
        raise PromptFileError(f"no {'/'.join(PROMPT_SUFFIXES)} prompt files in {files}")
    for split, path in resolved.items():
        if not _SPLIT_NAME.match(split):
            raise PromptFileError(f"split name {split!r} for {path} must match [A-Za-z0-9_]+")
        if not path.is_file():
            raise PromptFileError(f"{path}: no such file")
        if path.suffix not in PROMPT_SUFFIXES:
            raise PromptFileError(f"{path}: unsupported suffix, expected one of {PROMPT_SUFFIXES}")
        if not _has_records(path):
            raise PromptFileError(
                f"{path}: no records; a prompt file needs at least one record with a "
                "'prompt' field (a JSON object a line, or a Parquet row)"
            )
    return resolved


def _has_records(path: Path) -> bool:
    """Whether ``path`` holds a record: a non-blank JSONL line, or a Parquet row."""
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows > 0
    with path.open("rb") as f:
        return any(line.strip() for line in f)


@dataclasses.dataclass(eq=False)
class PromptFilesConfig(tfds.core.BuilderConfig):
    """The files of a prompt set; build it with :func:`prompt_files_config`.

    Attributes:
      files: ``((split, path), ...)``, sorted by split.
    """

    files: tuple[tuple[str, str], ...] = ()


def prompt_files_config(files: PathLike | Mapping[str, PathLike]) -> PromptFilesConfig:
    """A config named ``files-<hash>`` by the split names and file contents (see module doc)."""
    resolved = sorted(resolve_files(files).items())
    digest = hashlib.sha256()
    for split, path in resolved:
        digest.update(split.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return PromptFilesConfig(
        name=f"files-{digest.hexdigest()[:16]}",
        files=tuple((split, str(path)) for split, path in resolved),
    )


class PromptFiles(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of a user prompt set: ``{"prompt", "answer", "id"}`` text features.

    ``id`` is ``"<split>-<position>"`` with the position of :func:`read_prompt_file`.
    """

    name = "opd_prompt_files"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No download checksums to find; TFDS's lookup of them also needs `importlib_resources`,
    # which it does not declare on Python >= 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "id": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Local files.
        return {
            split: self._generate_examples(split, Path(path))
            for split, path in self.builder_config.files
        }

    def _generate_examples(self, split: str, path: Path) -> Iterator[tuple[str, dict]]:
        for position, record in read_prompt_file(path):
            example_id = f"{split}-{position}"
            yield example_id, {**record, "id": example_id}


def prompt_files_builder(
    files: PathLike | Mapping[str, PathLike], data_dir: PathLike
) -> PromptFiles:
    """The :class:`PromptFiles` builder of ``files`` (see :func:`resolve_files`)."""
    return PromptFiles(data_dir=data_dir, config=prompt_files_config(files))
