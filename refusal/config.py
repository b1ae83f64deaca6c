"""Config fields that carry their meaning: every stage's config dataclass declares each field once, with
its default, a one-line help and its bounds or choices, and the validation (`check_fields`), the CLI's
options and the config tables (docs/configs.md) are all built from them (so nothing is written twice).

A field's value is checked against its type annotation (int, float, str, bool, `X | None`, `tuple[X,
...]`, dict, a nested config) and its `ge`/`gt`/`le`/`lt` bounds or `choices`; a tuple field's bounds and
choices hold for each of its values. A config's own `validate()` calls check_fields and adds only the
checks that relate fields to each other."""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from typing import Any

from .errors import RefusalLabError

_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           choices: tuple | None = None) -> Any:
    """A dataclass field with its default (or a factory for a mutable default), its meaning, and the bounds
    (ge: >=, gt: >, le: <=, lt: <) or choices its value (each value, for a tuple) must keep."""
    meta = {"help": help, **{k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """A field's command-line option: search_width -> --search-width."""
    return "--" + name.replace("_", "-")


def field_info(cls, name: str) -> tuple[Any, str]:
    """(default, help) of a config class's field."""
    f = _field(cls, name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return default, f.metadata.get("help", "")


def field_limits(cls, name: str) -> dict:
    """The declared bounds ({"ge": 1, ...}) and choices ({"choices": (...)}) of a field (empty if none)."""
    return {k: v for k, v in _field(cls, name).metadata.items() if k != "help"}


def limits_text(limits: dict) -> str:
    """Bounds and choices as the docs and messages write them: '>= 1', '> 0, <= 1', 'one of a, b'."""
    parts = [f"{op} {limits[k]:g}" if isinstance(limits[k], float) else f"{op} {limits[k]}"
             for k, op, _ in _BOUNDS if k in limits]
    if "choices" in limits:
        parts.append("one of " + ", ".join(str(c) for c in limits["choices"]))
    return ", ".join(parts)


def config_rows(cls) -> list[tuple[str, Any, str, str]]:
    """(name, default, limits as text, help) of every field, in declaration order (docs/configs.md's tables)."""
    return [(f.name, field_info(cls, f.name)[0], limits_text(field_limits(cls, f.name)), f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)]


def as_dict(config) -> dict:
    """A config as a JSON-able dict (the records written beside each artifact): tuples as lists, as JSON
    reads them back, so that a record compares equal to its file."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def from_dict(cls, values: dict, where: str = "the config", key: str = ""):
    """A config of `cls` from a dict of its fields (as as_dict or a TOML table writes it): a nested config
    from its own dict, the same way; an unknown key is a one-line error naming the keys. The values are
    not checked here (check_fields does)."""
    known = {f.name for f in dataclasses.fields(cls)}
    bad = set(values) - known
    if bad:
        raise RefusalLabError(f"{where}: unknown {key + ' ' if key else ''}key {sorted(bad)[0]!r}; the keys are "
                              f"{', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    out = {}
    for name, value in values.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, where, f"{key}.{name}" if key else name)
        out[name] = value
    return cls(**out)


def check_fields(config, where: str | None = None, prefix: str = "") -> None:
    """A one-line error for the first field of `config` whose value does not have its declared type or breaks
    its bounds or choices, then for a combination its `checks()` method (where it has one) refuses; nested
    configs are checked the same way, once. Fields are named as options (--search-width), or as the keys
    of a file (`where`: search_width) when `where` names one."""
    hints = typing.get_type_hints(type(config), vars(sys.modules[type(config).__module__]))
    for f in dataclasses.fields(config):
        key = prefix + f.name
        _check_value(key, getattr(config, f.name), hints.get(f.name, Any), f.metadata, where)
    checks = getattr(config, "checks", None)
    if callable(checks):
        checks()


def _field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _check_value(key: str, value, hint, meta, where: str | None) -> None:
    """key: the field's (dotted) name; messages name it as an option, or as a key of the file `where`."""
    name = flag(key) if where is None else f"{where}: {key}"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise RefusalLabError(f"{name} must be a list of values, e.g. ({value!r},), got {value!r}")
        for v in value:
            _check_value(key, v, args[0] if args else Any, meta, where)
        return
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise RefusalLabError(f"{name} must be a {hint.__name__}, got {value!r}")
        check_fields(value, where, prefix=f"{key}." if where is not None else "")
        return
    if hint is bool and not isinstance(value, bool):
        raise RefusalLabError(f"{name} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RefusalLabError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RefusalLabError(f"{name} must be a finite number, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise RefusalLabError(f"{name} must be a string, got {value!r}")
    if hint is dict and not isinstance(value, dict):
        raise RefusalLabError(f"{name} must be a mapping, got {value!r}")
    for bound, _, ok in _BOUNDS:
        if bound in meta and not ok(value, meta[bound]):
            limits = {k: meta[k] for k, _, _ in _BOUNDS if k in meta}
            raise RefusalLabError(f"{name} must be {limits_text(limits).replace(', ', ' and ')}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise RefusalLabError(f"unknown {name} {value!r}; use one of {', '.join(map(str, meta['choices']))}")
