"""Command-line options derived from config dataclasses: one source for every setting.

A command's config dataclass declares each setting once, with :func:`option` (default and
help text); :func:`add_options` turns the fields into argparse options (help shows the
default), and :func:`from_args` builds the config back, so its ``__post_init__`` checks run
for the command line exactly as for the Python API.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

__all__ = ["option", "add_options", "from_args"]

T = TypeVar("T")
_MISSING: Any = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: typing.Iterable[Any] | None = None,
    positional: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with what the command line needs to show it. Lists and other
    mutable defaults are copied per instance."""
    metadata = {
        "help": help,
        "flag": flag,
        "choices": None if choices is None else list(choices),
        "positional": positional,
        "metavar": metavar,
    }
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _argument(field: dataclasses.Field, hint: Any) -> tuple[list[str], dict[str, Any]]:
    meta = field.metadata
    hint = _unwrap_optional(hint)
    default = field.default_factory() if field.default_factory is not _MISSING else field.default
    required = default is _MISSING
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if meta["choices"] is not None:
        kwargs["choices"] = meta["choices"]
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    origin = typing.get_origin(hint)
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin in (list, tuple):
        kwargs["nargs"] = "+"
        kwargs["type"] = typing.get_args(hint)[0]
    else:
        kwargs["type"] = hint
    if meta["positional"]:
        names = [field.name]
    else:
        names = [meta["flag"] or "--" + field.name.replace("_", "-")]
        if required:
            kwargs["required"] = True
    if not required:
        kwargs["default"] = default
        if hint is bool:
            shown = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) or "none"
        else:
            shown = default
        kwargs["help"] += f" (default: {shown})" if shown not in (None, "") else ""
    kwargs["help"] = kwargs["help"].replace("%", "%%")
    return names, kwargs


def add_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argparse option per field of ``config_cls`` declared with :func:`option`."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if "help" not in field.metadata:
            continue
        names, kwargs = _argument(field, hints[field.name])
        if not field.metadata["positional"]:
            kwargs["dest"] = field.name
        parser.add_argument(*names, **kwargs)


def from_args(config_cls: type[T], args: argparse.Namespace) -> T:
    """The config from parsed arguments (its ``__post_init__`` validates them)."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for field in dataclasses.fields(config_cls):
        if not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if (
            isinstance(value, list)
            and typing.get_origin(_unwrap_optional(hints[field.name])) is tuple
        ):
            value = tuple(value)
        values[field.name] = value
    return config_cls(**values)
