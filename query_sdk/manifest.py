"""One manifest layer: a small declarative field spec that validates parsed JSON and *is* the
published JSON Schema (draft 2020-12) of the file, so the reader and the schema cannot drift.

Gallery manifests, bundle manifests and ``manifest.sig`` each declare their fields once with
these pieces (in :mod:`query_sdk.gallery_format`, :mod:`query_sdk.bundle_format`,
:mod:`query_sdk.signing`); :func:`validate` checks a parsed document against the spec and
raises the caller's error class with the file, the key path and the value; :func:`json_schema`
turns the same spec into the schema shipped in ``query_sdk/schemas/`` for app developers.
Checks that relate two values (``deleted <= count``, unique file names, shapes that agree
with ``input_spec``) are not expressible in JSON Schema; the format modules do them after
:func:`validate` and list them in the schema's description.

>>> spec = Obj({"M": Int(2, 1024)})
>>> validate(spec, {"M": 2**64}, "manifest.json", ValueError)
Traceback (most recent call last):
ValueError: manifest.json: key 'M' must be an int in [2, 1024], got 18446744073709551616

Regenerate the shipped schemas after changing a spec: ``python -m query_sdk.manifest``.
This module imports only the standard library.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "Spec",
    "Int",
    "Num",
    "Str",
    "Enum",
    "Null",
    "Nullable",
    "AnyOf",
    "Arr",
    "Map",
    "FreeObj",
    "Obj",
    "Case",
    "Versions",
    "MAX_DIM",
    "MAX_FILE_BYTES",
    "MAX_COUNT",
    "file_name",
    "SHA256",
    "UTC_TIME",
    "file_entry",
    "validate",
    "json_schema",
    "SCHEMA_DIR",
    "published_schemas",
]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_DIR = Path(__file__).with_name("schemas")
_SHOW = 80  # characters of a bad value quoted in a message


class _Invalid(Exception):
    """One problem at one key path; :func:`validate` turns it into the caller's error."""


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def _at(path: str) -> str:
    return f"key {path!r}" if path else "the top level"


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON Schema's ``const``/``enum`` define it: booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


class Spec:
    """A field's type and bounds: ``check`` validates a value, ``schema`` describes it."""

    what = "a value"
    doc: str | None = None

    def check(self, v: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _schema(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        s = self._schema()
        if self.doc:
            s["description"] = self.doc
        return s

    def accepts(self, v: Any) -> bool:
        """Whether ``check`` would accept ``v``."""
        try:
            self.check(v, "")
        except _Invalid:
            return False
        return True

    def fail(self, v: Any, path: str) -> NoReturn:
        raise _Invalid(f"{_at(path)} must be {self.what}, got {_show(v)}")


class Int(Spec):
    """A JSON integer in ``[lo, hi]`` (``16.0`` counts, as in JSON Schema; ``true`` does not)."""

    def __init__(self, lo: int, hi: int, doc: str | None = None) -> None:
        self.lo, self.hi, self.doc = lo, hi, doc
        self.what = f"an int in [{lo}, {hi}]"

    def check(self, v: Any, path: str) -> int:
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, float) and v.is_integer()
        )
        if not ok or not self.lo <= v <= self.hi:
            self.fail(v, path)
        return int(v)

    def _schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.lo, "maximum": self.hi}


class Num(Spec):
    """A finite JSON number, optionally in ``[lo, hi]`` (``gt``: strictly greater than ``lo``)."""

    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        gt: bool = False,
        doc: str | None = None,
    ) -> None:
        self.lo, self.hi, self.gt, self.doc = lo, hi, gt, doc
        if lo is None and hi is None:
            self.what = "a finite number"
        elif hi is None:
            self.what = f"a number {'>' if gt else '>='} {lo:g}"
        else:
            self.what = f"a number in {'(' if gt else '['}{lo:g}, {hi:g}]"

    def check(self, v: Any, path: str) -> float | int:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if (
            not ok
            or (self.lo is not None and (v <= self.lo if self.gt else v < self.lo))
            or (self.hi is not None and v > self.hi)
        ):
            self.fail(v, path)
        return v

    def _schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "number"}
        if self.lo is not None:
            s["exclusiveMinimum" if self.gt else "minimum"] = self.lo
        if self.hi is not None:
            s["maximum"] = self.hi
        return s


class Str(Spec):
    """A string; ``pattern`` is an ECMA-262 regex (``^...$``) that must match, ``exclude``
    lists values refused anyway. ``also`` is a further check JSON Schema cannot express
    (say it in ``doc``)."""

    def __init__(
        self,
        min_len: int = 0,
        max_len: int | None = None,
        pattern: str | None = None,
        exclude: Sequence[str] = (),
        what: str | None = None,
        also: Callable[[str], bool] | None = None,
        doc: str | None = None,
    ) -> None:
        self.min_len, self.max_len, self.pattern, self.exclude = min_len, max_len, pattern, exclude
        self.also, self.doc = also, doc
        # Python's "$" also matches before a final newline; ECMA-262's does not
        self._re = None if pattern is None else re.compile(re.sub(r"\$$", r"\\Z", pattern))
        self.what = what or ("a non-empty string" if min_len else "a string")

    def check(self, v: Any, path: str) -> str:
        if (
            not isinstance(v, str)
            or len(v) < self.min_len
            or (self.max_len is not None and len(v) > self.max_len)
            or (self._re is not None and not self._re.search(v))
            or v in self.exclude
            or (self.also is not None and not self.also(v))
        ):
            self.fail(v, path)
        return v

    def _schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string"}
        if self.min_len:
            s["minLength"] = self.min_len
        if self.max_len is not None:
            s["maxLength"] = self.max_len
        if self.pattern:
            s["pattern"] = self.pattern
        if self.exclude:
            s["not"] = {"enum": list(self.exclude)}
        return s


class Enum(Spec):
    """One of a few JSON values."""

    def __init__(self, values: Sequence[Any], doc: str | None = None) -> None:
        self.values, self.doc = tuple(values), doc
        self.what = repr(self.values[0]) if len(self.values) == 1 else f"one of {list(values)}"

    def check(self, v: Any, path: str) -> Any:
        if not any(_json_equal(v, x) for x in self.values):
            self.fail(v, path)
        return v

    def _schema(self) -> dict[str, Any]:
        return {"const": self.values[0]} if len(self.values) == 1 else {"enum": list(self.values)}


class Null(Spec):
    """JSON ``null``."""

    what = "null"

    def check(self, v: Any, path: str) -> None:
        if v is not None:
            self.fail(v, path)

    def _schema(self) -> dict[str, Any]:
        return {"type": "null"}


class AnyOf(Spec):
    """The first of ``specs`` that accepts the value."""

    def __init__(self, *specs: Spec, what: str | None = None, doc: str | None = None) -> None:
        self.specs, self.doc = specs, doc
        self.what = what or " or ".join(s.what for s in specs)

    def check(self, v: Any, path: str) -> Any:
        for s in self.specs:
            try:
                return s.check(v, path)
            except _Invalid:
                pass
        self.fail(v, path)

    def _schema(self) -> dict[str, Any]:
        return {"anyOf": [s.schema() for s in self.specs]}


def Nullable(spec: Spec, doc: str | None = None) -> AnyOf:  # noqa: N802 - reads like a type
    """``null`` or what ``spec`` accepts."""
    return AnyOf(Null(), spec, what=f"{spec.what} or null", doc=doc)


class Arr(Spec):
    """A JSON array of ``item``, ``min_items`` to ``max_items`` long."""

    def __init__(
        self, item: Spec, min_items: int = 0, max_items: int | None = None, doc: str | None = None
    ) -> None:
        self.item, self.min_items, self.max_items, self.doc = item, min_items, max_items, doc
        n = f"{min_items}..{max_items}" if max_items is not None else f"at least {min_items}"
        self.what = f"a list of {n} items" if min_items or max_items is not None else "a list"

    def check(self, v: Any, path: str) -> list:
        if not isinstance(v, list) or len(v) < self.min_items:
            self.fail(v, path)
        if self.max_items is not None and len(v) > self.max_items:
            self.fail(v, path)
        return [self.item.check(x, f"{path}[{i}]") for i, x in enumerate(v)]

    def _schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            s["minItems"] = self.min_items
        if self.max_items is not None:
            s["maxItems"] = self.max_items
        return s


class Map(Spec):
    """A JSON object used as a map: every key matches ``keys``, every value ``values``."""

    def __init__(
        self,
        keys: Str,
        values: Spec,
        min_items: int = 0,
        max_items: int | None = None,
        doc: str | None = None,
    ) -> None:
        self.keys, self.values, self.min_items, self.max_items = keys, values, min_items, max_items
        self.doc = doc
        self.what = "an object"

    def check(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(v, path)
        if len(v) < self.min_items or (self.max_items is not None and len(v) > self.max_items):
            if self.max_items is None:
                n = f"at least {self.min_items}"
            elif self.min_items == self.max_items:
                n = str(self.min_items)
            else:
                n = f"{self.min_items} to {self.max_items}"
            raise _Invalid(f"{_at(path)} must have {n} entries, got {len(v)}")
        out = {}
        for k, x in v.items():
            try:
                self.keys.check(k, path)
            except _Invalid:
                raise _Invalid(
                    f"{_at(path)}: entry name {_show(k)} is not {self.keys.what}"
                ) from None
            out[k] = self.values.check(x, f"{path}[{json.dumps(k)}]")
        return out

    def _schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "type": "object",
            "propertyNames": self.keys.schema(),
            "additionalProperties": self.values.schema(),
        }
        if self.min_items:
            s["minProperties"] = self.min_items
        if self.max_items is not None:
            s["maxProperties"] = self.max_items
        return s


class FreeObj(Spec):
    """Any JSON object (free-form: ``extra``, ``heads``)."""

    what = "an object"

    def __init__(self, doc: str | None = None) -> None:
        self.doc = doc

    def check(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(v, path)
        return dict(v)

    def _schema(self) -> dict[str, Any]:
        return {"type": "object"}


@dataclass
class Case:
    """A constraint on other fields when ``key`` holds ``value`` (``then``), or does not
    (``otherwise``); JSON Schema's ``if``/``then``/``else``. Fields absent from the object are
    not checked, except those named in ``then_required``/``otherwise_required``. As in JSON
    Schema, an absent ``key`` counts as holding ``value``."""

    key: str
    value: Any
    then: Mapping[str, Spec] = field(default_factory=dict)
    otherwise: Mapping[str, Spec] = field(default_factory=dict)
    then_required: Sequence[str] = ()
    otherwise_required: Sequence[str] = ()

    def check(self, d: dict, path: str) -> None:
        holds = self.key not in d or _json_equal(d[self.key], self.value)
        specs, required = (
            (self.then, self.then_required) if holds else (self.otherwise, self.otherwise_required)
        )
        for k in required:
            if k not in d:
                when = "is" if holds else "is not"
                raise _Invalid(
                    f"missing key {_join(path, k)!r} (needed when {self.key!r} {when} "
                    f"{_show(self.value)})"
                )
        for k, s in specs.items():
            if k in d:
                s.check(d[k], _join(path, k))

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"if": {"properties": {self.key: {"const": self.value}}}}
        for name, specs, required in (
            ("then", self.then, self.then_required),
            ("else", self.otherwise, self.otherwise_required),
        ):
            if specs or required:
                part: dict[str, Any] = {}
                if specs:
                    part["properties"] = {k: v.schema() for k, v in specs.items()}
                if required:
                    part["required"] = list(required)
                s[name] = part
        return s


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Obj(Spec):
    """A JSON object with the given ``fields`` (all required except ``optional``); unknown
    keys are refused unless ``open``. ``cases`` add constraints that depend on a value."""

    what = "an object"

    def __init__(
        self,
        fields: Mapping[str, Spec],
        optional: Sequence[str] = (),
        open: bool = False,
        cases: Sequence[Case] = (),
        doc: str | None = None,
    ) -> None:
        self.fields, self.optional, self.open, self.cases = dict(fields), optional, open, cases
        self.doc = doc

    def check(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(v, path)
        for k in self.fields:
            if k not in v and k not in self.optional:
                raise _Invalid(f"missing key {_join(path, k)!r}")
        unknown = sorted(str(k) for k in set(v) - set(self.fields))
        if unknown and not self.open:
            raise _Invalid(
                f"unknown key(s) {unknown} in {_at(path)} (known: {sorted(self.fields)}; "
                "additions go into 'extra' or a new format_version)"
            )
        out = dict(v)
        for k, s in self.fields.items():
            if k in v:
                out[k] = s.check(v[k], _join(path, k))
        for case in self.cases:
            case.check(v, path)
        return out

    def _schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "type": "object",
            "properties": {k: f.schema() for k, f in self.fields.items()},
            "required": [k for k in self.fields if k not in self.optional],
        }
        if not self.open:
            s["additionalProperties"] = False
        if self.cases:
            s["allOf"] = [c.schema() for c in self.cases]
        return s


class Versions(Spec):
    """The spec of a document per ``format_version`` (each spec pins the versions it is for,
    e.g. ``Enum([1, 2])``; versions may share one spec); an unknown version is refused with
    the versions this reader knows."""

    what = "a JSON object"

    def __init__(self, specs: Mapping[int, Spec], key: str = "format_version") -> None:
        self.specs, self.key = dict(specs), key

    def check(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            raise _Invalid(f"{_at(path)} must be a JSON object, got {type(v).__name__}")
        if self.key not in v:
            raise _Invalid(f"missing key {self.key!r}")
        version = v[self.key]
        spec = next((s for n, s in self.specs.items() if _json_equal(version, n)), None)
        if spec is None:
            known = ", ".join(map(str, self.specs))
            raise _Invalid(
                f"unknown {self.key} {_show(version)}; this reader supports {self.key} {known} "
                "(a newer cmce wrote it? upgrade the reader)"
            )
        return spec.check(v, path)

    def _schema(self) -> dict[str, Any]:
        distinct = list({id(s): s for s in self.specs.values()}.values())
        return (
            distinct[0].schema()
            if len(distinct) == 1
            else {"oneOf": [s.schema() for s in distinct]}
        )


# --------------------------------------------------------------------------- shared fields

#: largest embedding dim a reader accepts
MAX_DIM = 1 << 16
#: largest file (or .mlpackage folder) a manifest may describe: 1 TiB
MAX_FILE_BYTES = 1 << 40
#: largest count of anything (items, images): int32, so every SDK can hold it
MAX_COUNT = 2**31 - 1
_PLAIN = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}"


def file_name(exclude: Sequence[str] = (), subfolder: bool = False) -> Str:
    """A plain file name inside the folder: letters, digits, ``_.+-``, no leading dot (so no
    ``.``/``..``), no path; with ``subfolder`` at most one sub-folder level
    (``raw/part-00000.npz``). ``exclude``: names refused anyway (the manifest itself)."""
    if subfolder:
        return Str(
            pattern=f"^{_PLAIN}(/{_PLAIN})?$",
            exclude=exclude,
            what="a relative file name with at most one sub-folder level (raw/part-00000.npz)",
        )
    return Str(
        pattern=f"^{_PLAIN}$",
        exclude=exclude,
        what="a plain file name (letters, digits, '_.+-', not starting with '.', no path)",
    )


SHA256 = Str(pattern="^[0-9a-f]{64}$", what="a hex sha256 (64 lowercase hex digits)")


def _real_utc_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


UTC_TIME = Str(
    pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3])"
    r":[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|\+00:00)$",
    what="an ISO 8601 UTC time like 2024-05-01T12:00:00Z",
    also=_real_utc_time,
    doc="ISO 8601, UTC ('Z' or '+00:00'); readers also refuse dates that do not exist (2024-02-30)",
)


def file_entry(doc: str | None = None) -> Obj:
    """``{"bytes", "sha256"}`` of one file."""
    return Obj({"bytes": Int(0, MAX_FILE_BYTES), "sha256": SHA256}, doc=doc)


def validate(spec: Spec, value: Any, where: str, error: Callable[[str], Exception]) -> Any:
    """``value`` checked against ``spec`` (ints normalised); ``error("<where>: <problem>")``
    naming the key path and the value otherwise."""
    try:
        return spec.check(value, "")
    except _Invalid as exc:
        raise error(f"{where}: {exc}") from None


def json_schema(spec: Spec, *, name: str, title: str, description: str) -> dict[str, Any]:
    """The JSON Schema document (draft 2020-12) of ``spec``, ``$id`` ``name``."""
    return {
        "$schema": DRAFT,
        "$id": name,
        "title": title,
        "description": description,
        **spec.schema(),
    }


def published_schemas() -> dict[str, dict[str, Any]]:
    """``{file name: schema}`` of every file format an app developer may read."""
    from . import bundle_format, gallery_format, signing

    schemas = (
        gallery_format.MANIFEST_SCHEMA,
        bundle_format.MANIFEST_SCHEMA,
        signing.SIGNATURE_SCHEMA,
    )
    return {s["$id"]: s for s in schemas}


def _write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    from .fileio import write_bytes_atomic

    folder.mkdir(exist_ok=True)
    written = []
    for name, schema in published_schemas().items():
        path = folder / name
        write_bytes_atomic(path, (json.dumps(schema, indent=2) + "\n").encode("utf-8"))
        written.append(path)
    return written


if __name__ == "__main__":  # python -m query_sdk.manifest
    for p in _write_schemas():
        print(p, file=sys.stderr)
