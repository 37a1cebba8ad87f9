"""Typed configs from YAML: dataclass trees built from a file plus dotted ``KEY=VALUE``
overrides, every key and value checked, every error naming the key at fault and the fix.

``load_tree(SomeConfig, "file.yaml", ["a.b=3"])`` builds ``SomeConfig`` (nested dataclasses
are sections, ``dict[str, Section]`` fields are named sections); an unknown key names the
nearest valid one, a value of the wrong type names the key and the type, a YAML syntax error
names the file, line and column. Floats are accepted as ints and as strings that read as
floats (YAML leaves ``1e-4`` a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import Field

from opd_jax.errors import InputError


class ConfigError(InputError):
    """A configuration that cannot run, with the key at fault and the fix."""


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass tree ``cls``, e.g. ``run.dir``."""
    keys = []
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        sub = typing.get_type_hints(cls)[field.name]
        keys.extend(all_keys(sub, key + ".") if dataclasses.is_dataclass(sub) else [key])
    return keys


# Declared constraints of config fields: each type says its range, checked by pydantic as the
# config is read (NaN and infinities refused everywhere), each error naming the key, the value
# and the range.
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Decay = Annotated[float, Field(ge=0, lt=1)]  # an exponential moving average's rate
NonEmpty = Annotated[str, Field(min_length=1)]
MeshSize = Annotated[int, Field(ge=-1, description="-1: the remaining devices")]


def note(text: str) -> Any:
    """What a field's special value means, said in its range errors: ``note("0 disables")``."""
    return Field(description=text)


_LISTED_KEYS = 20  # an unknown key's error lists the valid keys when there are at most this many


def _unknown(key: str, keys: Sequence[str]) -> ConfigError:
    """The error of an unknown ``key``, naming the nearest of the valid ``keys``."""
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if near:
        hint = f" Did you mean {near[0]!r}?"
    elif len(keys) <= _LISTED_KEYS:
        hint = f" The keys: {', '.join(keys)}."
    else:
        hint = " `opd-jax COMMAND --help` lists the keys."
    return ConfigError(f"Unknown config key {key!r}.{hint}")


def _as_float(value: Any) -> Any:
    """``value`` as a float when it is a string that reads as one (``"1e-4"``, which YAML
    leaves a string), else ``value`` unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_STRICT = pydantic.ConfigDict(strict=True, allow_inf_nan=False)


@functools.cache
def _adapter(hint: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(hint, config=_STRICT)


def _base_and_constraints(hint: Any) -> tuple[Any, list[Any]]:
    """``(int, [Ge(ge=1), FieldInfo(...)])`` of ``Annotated[int, Field(ge=1)]``; optional
    types stand for their non-None member."""
    metadata: list[Any] = []
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extra = typing.get_args(hint)
            for item in extra:
                metadata.append(item)
                metadata.extend(getattr(item, "metadata", ()))
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        else:
            return hint, metadata


_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def allowed_range(hint: Any) -> str:
    """The range an annotated number type declares: ``>= 1``, ``in (0, 1]``, ``> 0``; the
    field's description (``Field(description=...)``) follows in parentheses."""
    _, metadata = _base_and_constraints(hint)
    bounds = {}
    description = ""
    for item in metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
        description = getattr(item, "description", None) or description
    low = next(((n, bounds[n]) for n in ("ge", "gt") if n in bounds), None)
    high = next(((n, bounds[n]) for n in ("le", "lt") if n in bounds), None)
    if low and high:
        opening, closing = "[("[low[0] == "gt"], "])"[high[0] == "lt"]
        text = f"in {opening}{low[1]}, {high[1]}{closing}"
    elif low or high:
        name, bound = low or high
        text = f"{_SYMBOLS[name]} {bound}"
    else:
        text = "valid"
    return text + (f" ({description})" if description else "")


_TYPE_ERRORS = ("_type", "_parsing", "int_from_float")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field type ``hint`` by pydantic (strict types, NaN and
    infinities refused, the ranges an ``Annotated`` hint declares), floats also read from
    strings (YAML leaves ``1e-4`` a string). Raises :class:`ConfigError` naming ``key``, the
    value and what is allowed."""
    base, _ = _base_and_constraints(hint)
    if base is float:
        value = _as_float(value)
    try:
        return _adapter(hint).validate_python(value)
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
    kind = problem["type"]
    got = problem.get("input", value)
    if kind == "finite_number":
        raise ConfigError(f"{key} must be a finite number, got {got!r}.") from None
    if kind.startswith(("greater", "less")):
        raise ConfigError(f"{key} must be {allowed_range(hint)}, got {got!r}.") from None
    if kind == "string_too_short":
        raise ConfigError(f"{key} must not be empty.") from None
    if problem["loc"] or not kind.endswith(_TYPE_ERRORS):
        where = "".join(f"[{part!r}]" for part in problem["loc"])
        raise ConfigError(f"{key}{where}: {problem['msg']}, got {got!r}.") from None
    name = getattr(base, "__name__", str(base))
    raise ConfigError(f"{key} must be {name}, got {value!r}.") from None


def _named_section(hint: Any) -> type | None:
    """``S`` when ``hint`` is ``dict[str, S]`` with ``S`` a config dataclass, else ``None``."""
    if typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
        return typing.get_args(hint)[1]
    return None


def _build_named(section: type, data: Any, key: str) -> dict[Any, Any]:
    """``{name: section}`` of a ``dict[str, section]`` field: each value is built like a
    nested section, its keys named ``key.<name>.<field>``; a bare (non-mapping) value sets
    the section's first field (``benchmarks: {aime: aime.jsonl}`` is ``{source: aime.jsonl}``).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key} must be a mapping of names to {section.__name__}, got {data!r}.")
    first = dataclasses.fields(section)[0].name
    built = {}
    for name, value in data.items():
        fields = value if isinstance(value, Mapping) else {first: value}
        built[name] = build_tree(section, fields, f"{key}.{name}.")
    return built


def build_tree(cls: type, data: Any, prefix: str = "", keys: Sequence[str] | None = None) -> Any:
    """``cls(**data)``, every value checked against its field's type: a dataclass field is
    built as a nested section, a ``dict[str, Section]`` field by :func:`_build_named`.

    An unknown key fails naming the nearest of ``keys`` (default: every key of ``cls`` under
    ``prefix``; nested sections get their parent's, so a hint may name any section's key).
    """
    keys = all_keys(cls, prefix) if keys is None else keys
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown(key, keys)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_tree(hint, {} if value is None else value, key + ".", keys)
        elif section := _named_section(hint):
            kwargs[name] = _build_named(section, value, key)
        else:
            kwargs[name] = coerce(key, value, hint)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or an empty section in the file
            child = node[part] = {}
        if not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            if section in all_keys(cls):  # a value, not a section: its key has no sub-keys
                raise _unknown(key, all_keys(cls))
            raise ConfigError(f"{section} must be a mapping, got {child!r}.")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"rule.kind=full"`` -> ``("rule.kind", "full")``; values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"Override {text!r} must look like KEY=VALUE, e.g. train.steps=10.")
    return key.strip(), _read_yaml(raw, f"the value of --set {text}") if raw.strip() else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (YAML lets the last win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key {key!r} appears twice (first at line {seen[key] + 1}): keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, source: str) -> Any:
    """``yaml.load(text)`` (safe, no repeated keys); an error names ``source`` and the line
    and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{source}: invalid YAML, {_yaml_problem(error)}; fix it there."
        ) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``line L, column C: <problem> (<context> at line L', column C')`` of a YAML error."""
    mark, context = getattr(error, "problem_mark", None), getattr(error, "context", None)
    if mark is None:
        return str(error)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if context and (start := getattr(error, "context_mark", None)):
        text += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return text


def load_tree(
    cls: type,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Any:
    """Any config dataclass ``cls`` from a YAML file (or its defaults) plus ``KEY=VALUE``
    overrides; unknown keys and wrong types raise :class:`ConfigError` naming the fix.
    ``upgrade`` rewrites an older layout's keys (file and overrides) before the checks."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"No config file at {path}: pass a YAML file, e.g. configs/smollm2_layers.yaml."
            )
        tree = _read_yaml(path.read_text(), str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of config sections.")
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(key, all_keys(cls))
        _set_dotted(tree, key, value, cls)
    return build_tree(cls, tree if upgrade is None else upgrade(tree))
