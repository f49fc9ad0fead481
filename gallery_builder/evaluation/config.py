"""Config files onto dataclasses: TOML or JSON, every key a field, every value checked.

The reader knows no keys of its own: it walks the fields of the target dataclass and reads each
value by the field's type annotation (``int``, ``float``, ``bool``, ``str``, ``Path``, ``X |
None``, ``tuple[X, ...]``, ``list[X]``, ``dict`` and nested dataclasses, which are tables). A
file's values are laid over a base object: a table given for a nested dataclass changes only
the keys it names; a list replaces the base's list, and an element of a list of dataclasses
with a ``name`` field starts from the base's element of that name (else from the class
defaults). An optional setting is unset with the string ``"none"`` (TOML has no null).

Errors are :class:`ConfigError`, one line naming the file and the key path
(``gallery_models[1].train.epochs``): an unknown key lists the known ones with a did-you-mean;
a wrong type names the expected one; a value the dataclass refuses (its ``__post_init__``
raises ValueError) is pinned to the key its message names or, failing that, to the key that
alone makes it refuse. A field whose metadata has ``"cli"`` (the option that sets it) cannot
be set from a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from query_sdk.errors import DataError
from query_sdk.fileio import parse_json, read_regular_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as a package for Python 3.10
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "MAX_CONFIG_BYTES",
    "preset_files",
    "read_config_file",
    "from_mapping",
]

#: Largest config file read (a line-up of a few models takes a few kilobytes).
MAX_CONFIG_BYTES = 1 << 20
T = TypeVar("T")


class ConfigError(DataError):
    """A config file that cannot be used: unreadable, an unknown key, a wrong type or value."""


def preset_files() -> dict[str, Path]:
    """The shipped presets by name: ``gallery_builder/evaluation/presets/<name>.toml`` (config
    files like any other; importing this module imports no torch, for ``--help``)."""
    folder = Path(__file__).with_name("presets")
    return {f.stem: f for f in sorted(folder.glob("*.toml"))}


def read_config_file(path: Path) -> dict:
    """The top-level table of a ``.toml`` or ``.json`` config file."""
    path = Path(path)
    data = read_regular_file(path, MAX_CONFIG_BYTES, "config file", ConfigError)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            values = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    elif suffix == ".json":
        values = parse_json(data, str(path), ConfigError)
    else:
        raise ConfigError(f"{path}: a config file must end in .toml or .json, not {suffix!r}")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config must be a table (a JSON object), not a list")
    return values


def from_mapping(cls: type[T], values: Mapping, base: T | None, where: str) -> T:
    """An instance of dataclass ``cls``: ``values`` (a file's table) laid over ``base`` (None:
    the class defaults). ``where`` names the file in errors."""
    return _Reader(where).dataclass(cls, values, base, "")


class _Reader:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(
            f"{self.where}: {path}: {problem}" if path else f"{self.where}: {problem}"
        )

    def dataclass(self, cls: type[T], values: Any, base: T | None, path: str) -> T:
        if not isinstance(values, Mapping):
            raise self.fail(
                path, f"expected a table of {cls.__name__} settings, got {_kind(values)}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in fields:
                settable = [n for n, f in fields.items() if "cli" not in f.metadata]
                close = difflib.get_close_matches(str(key), settable, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "."
                raise self.fail(
                    _join(path, key), f"unknown key{hint} Known keys: {', '.join(settable)}"
                )
            if "cli" in fields[key].metadata:
                raise self.fail(
                    _join(path, key),
                    f"set on the command line ({fields[key].metadata['cli']}), not in a file",
                )
        if base is None:
            with contextlib.suppress(TypeError, ValueError):  # class defaults, if complete
                base = cls()
        start = {n: getattr(base, n) for n in fields} if base is not None else {}
        given = {
            key: self.value(hints[key], value, start.get(key), _join(path, key))
            for key, value in values.items()
        }
        try:
            return cls(**{**start, **given})
        except TypeError as e:  # required fields missing (no base to take them from)
            missing = [n for n, f in fields.items() if _required(f) and n not in given]
            if missing:
                raise self.fail(path, f"missing key(s): {', '.join(missing)}") from None
            raise self.fail(path, str(e)) from None
        except ValueError as e:
            raise self._culprit(cls, start, given, path, e) from None

    def _culprit(
        self, cls: type, start: dict, given: dict, path: str, error: ValueError
    ) -> ConfigError:
        """The error pinned to its key: the given key the message starts with (``key must``,
        ``key: ...``, ``key.sub: ...``), else the first given key that alone makes ``cls``
        refuse ``start``, else the table."""
        message = str(error)
        for key in given:
            if message.startswith(f"{key} "):
                return self.fail(_join(path, key), message)
            if message.startswith((f"{key}:", f"{key}.")) and ": " in message:
                sub, rest = message.split(": ", 1)
                return self.fail(_join(path, sub), rest)
        if start:
            for key, value in given.items():
                try:
                    cls(**{**start, key: value})
                except ValueError as e:
                    return self.fail(_join(path, key), str(e))
                except TypeError:
                    break
        return self.fail(path, message)

    def value(self, tp: Any, value: Any, base: Any, path: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if type(None) in args and value == "none":
                return None
            arms = [a for a in args if a is not type(None)]
            errors = []
            for arm in arms:
                try:
                    return self.value(arm, value, base, path)
                except ConfigError as e:
                    errors.append(e)
            if len(arms) == 1:
                raise errors[0]
            names = " or ".join(_name(a) for a in arms)
            raise self.fail(path, f"expected {names}, got {_kind(value)}")
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, value, base if isinstance(base, tp) else None, path)
        if origin in (list, tuple):
            if not isinstance(value, list):
                raise self.fail(path, f"expected a list, got {_kind(value)}")
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise self.fail(path, f"expected a list of {len(args)}, got {len(value)}")
                return tuple(
                    self.value(a, v, None, f"{path}[{i}]")
                    for i, (a, v) in enumerate(zip(args, value, strict=True))
                )
            item = args[0] if args else Any
            named = {}
            if dataclasses.is_dataclass(item) and isinstance(base, (list, tuple)):
                named = {getattr(b, "name", None): b for b in base}
            items = [
                self.value(
                    item,
                    v,
                    named.get(v.get("name")) if isinstance(v, Mapping) else None,
                    f"{path}[{i}]",
                )
                for i, v in enumerate(value)
            ]
            return tuple(items) if origin is tuple else items
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise self.fail(path, f"expected a table, got {_kind(value)}")
            return dict(value)
        if tp is Any:
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif tp is str:
            if isinstance(value, str):
                return value
        elif tp is Path:
            if isinstance(value, str):
                return Path(value)
        else:
            raise self.fail(path, f"cannot be set from a file (type {_name(tp)})")
        raise self.fail(path, f"expected {_name(tp)}, got {_kind(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if tp is Path:
        return "a path (string)"
    if dataclasses.is_dataclass(tp):
        return f"a table of {tp.__name__} settings"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, (dict, Mapping)):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"
