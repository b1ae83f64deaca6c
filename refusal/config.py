"""Config fields that carry their meaning: every stage's config dataclass declares each field once, with
its default and a one-line help, and the CLI's options and the README's config tables are built from or
checked against them (so a default cannot drift)."""
from __future__ import annotations

import dataclasses
from typing import Any

from .errors import RefusalLabError


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its default (or a factory for a mutable default) and its meaning."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_info(cls, name: str) -> tuple[Any, str]:
    """(default, help) of a config class's field."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            return default, f.metadata.get("help", "")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def config_rows(cls) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every field, in declaration order (the README's config tables)."""
    return [(f.name, *field_info(cls, f.name)) for f in dataclasses.fields(cls)]


def as_dict(config) -> dict:
    """A config as a JSON-able dict (the records written beside each artifact)."""
    return dataclasses.asdict(config)


def require_positive(config, *names: str) -> None:
    """A one-line error for the first of the config's fields `names` below 1 (counts and sizes)."""
    for name in names:
        value = getattr(config, name)
        if int(value) < 1:
            raise RefusalLabError(f"{name.replace('_', '-')} must be >= 1, got {value}")
