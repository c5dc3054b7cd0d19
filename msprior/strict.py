"""Strict dataclasses from YAML mappings: what msprior.config (and the sweep file) are read with.

An unknown key, a mistyped value or a value outside its choices fails at once with one line naming
the file and the dotted key (`ConfigError`), with a did-you-mean for a misspelt key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, List, Sequence

from msprior.errors import UserError


class ConfigError(UserError):
    """A config problem, phrased as a one-line message for the user."""


def choice(where: str, key: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(repr, options))}, got {value!r}")


def suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def build(cls, data: Any, where: str, prefix: str):
    """`cls(**data)`, nested dataclasses included, every key known and every value of its field's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {prefix + str(key)!r}{suggest(str(key), list(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, where, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = check_value(value, hint, where, prefix + key)
    return cls(**kwargs)


def number(value: Any) -> Any:
    """PyYAML reads YAML 1.1, where `1e-4` (no dot) is a string: the number a user means; any other
    value as it is. The one place such strings become numbers (config files, overrides, sweeps)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_value(value: Any, hint: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint in (int, float) and isinstance(value, str):
        value = number(value)
    if origin in (list, List):
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [check_value(v, item_type, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf would pass every range check below
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML reads true/false as booleans: choices spell them as words
            return "true" if value else "false"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {hint}")  # pragma: no cover
