"""One typed definition per option: a config dataclass field carries its type, default, range, choices and help.

Everything else is derived from that field: the value checks of the config class, the typed reader of a
TOML `--config` file (a value of the wrong type is refused naming the key), the command-line options of
the command that builds the config, and the option tables in docs/options.md. Adding an option is one
field (with `option(...)`) and its use.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from vlmcache.errors import VlmcacheError


@dataclass(frozen=True)
class Option:
    """What a config field means to a user: help, bounds, choices and how it looks on the command line."""

    help: str
    low: int | float | None = None
    high: int | float | None = None
    open_low: bool = False  # the low bound itself is not allowed (lr > 0)
    choices: tuple[str, ...] = ()
    flag: str | None = None  # a switch with no --no- form, e.g. "--stream"
    parse: Callable[[Any], Any] | None = None  # command-line/TOML text -> value (e.g. "32x40" -> (32, 40))
    cli_type: Any = None  # the command-line type when it differs from the field's (e.g. str for a grid)
    cli: bool = True  # False: settable from Python and TOML only


def option(default: Any, help: str, **meaning: Any) -> Any:
    """A dataclass field with its Option (see Option for the keywords)."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **meaning)})


def option_like(cls: type, name: str, default: Any, **changes: Any) -> Any:
    """A dataclass field that is option `name` of the config class `cls` — its type checks, range and choices —
    with another default; `changes` replace parts of its Option (help, a bound). For an option two configs share."""
    meaning = next(meaning for field, meaning, _ in option_fields(cls) if field.name == name)
    return dataclasses.field(default=default, metadata={"option": dataclasses.replace(meaning, **changes)})


def option_fields(cls: type) -> list[tuple[dataclasses.Field, Option, Any]]:
    """(field, its Option, its resolved type) of every option of a config class, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["option"], hints[f.name]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        return (members[0] if len(members) == 1 else hint), len(members) < len(typing.get_args(hint))
    return hint, False


def _type_error(hint: Any, value: Any) -> str | None:
    """Why `value` is not of the option type `hint` (None if it is)."""
    base, nullable = _optional(hint)
    if value is None:
        return None if nullable else "must be given (not empty)"
    if isinstance(base, types.UnionType):  # e.g. str | list[int]: a comma-separated string or a TOML list
        reasons = [_type_error(member, value) for member in typing.get_args(base)]
        return None if None in reasons else " or ".join(dict.fromkeys(reasons))
    if base is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if base is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if base is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if base is str:
        return None if isinstance(value, str) else "must be a string"
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        if not isinstance(value, list | tuple):
            return "must be a list"
        return next((f"item {item!r} {why}" for item in value if (why := _type_error(args[0], item))), None)
    return None


def check_options(config: Any) -> None:
    """Refuse an option value of the wrong type, outside its range or not among its choices (one line, naming
    the option). Values an option parses (grids) are parsed first."""
    for field, meaning, hint in option_fields(type(config)):
        value = getattr(config, field.name)
        if meaning.parse is not None and value is not None:
            value = meaning.parse(value)
            setattr(config, field.name, value)
        why = _type_error(hint, value)
        if why:
            raise VlmcacheError(f"{flag_name(field.name)} {value!r}: {why}")
        if value is None:
            continue
        if meaning.choices and value not in meaning.choices:
            raise VlmcacheError(f"{flag_name(field.name)} {value}: use one of {', '.join(meaning.choices)}")
        if meaning.low is not None or meaning.high is not None:
            low = -math.inf if meaning.low is None else meaning.low
            high = math.inf if meaning.high is None else meaning.high
            if not math.isfinite(value) or value < low or value > high or (meaning.open_low and value == low):
                bound = f"> {low}" if meaning.open_low else f"≥ {low}"
                raise VlmcacheError(f"{flag_name(field.name)} {value}: must be a finite number {bound} and ≤ {high}")


def read_toml(path: str | Path) -> dict:
    """The keys of a TOML config file, dashes turned into underscores; unreadable files in one line."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmcacheError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as error:
        raise VlmcacheError(f"--config {path}: not a readable TOML file ({error})") from None
    return {key.replace("-", "_"): value for key, value in values.items()}


def typed_values(path: str | Path, values: dict, types_by_key: dict[str, Any], what: str) -> dict:
    """`values` of a config file checked against the known keys and their types: an unknown key, or a value of
    the wrong type (a string "false" where true/false is meant), is refused naming the file and the key."""
    for key, value in values.items():
        if key not in types_by_key:
            raise VlmcacheError(f"--config {path}: unknown key {key!r}; use the option names of {what}")
        hint, parse = types_by_key[key]
        if parse is not None and isinstance(value, str):
            continue  # parsed and checked with the option itself
        why = _type_error(hint, value)
        if why:
            raise VlmcacheError(f"--config {path}: key {key!r} = {value!r} {why}")
    return values


def toml_types(cls: type) -> dict[str, tuple[Any, Any]]:
    """{key: (type, parser)} of a config class's options, for typed_values."""
    return {field.name: (hint, meaning.parse) for field, meaning, hint in option_fields(cls)}


def _cli_parameter(field: dataclasses.Field, meaning: Option, hint: Any) -> inspect.Parameter:
    import typer

    cli_type = meaning.cli_type or hint
    if meaning.cli_type is not None and _optional(hint)[1]:
        cli_type = cli_type | None
    declared = (meaning.flag,) if meaning.flag else ()
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(default, tuple) and meaning.cli_type is str:
        default = "x".join(map(str, default))
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[cli_type, typer.Option(*declared, help=meaning.help)])


def with_options(cls: type, skip: tuple[str, ...] = ()) -> Callable:
    """Decorate a typer command so that every command-line option of `cls` (except `skip`) is one of its
    options; the command receives them as one dict `options` (only those the user could set)."""

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)
        kept = [parameter.replace(annotation=hints.get(parameter.name, parameter.annotation))
                for parameter in own.parameters.values() if parameter.name != "options"]
        added = [_cli_parameter(field, meaning, hint) for field, meaning, hint in option_fields(cls)
                 if meaning.cli and field.name not in skip]
        names = [parameter.name for parameter in added]

        @functools.wraps(command)
        def wrapper(**given: Any) -> Any:
            return command(**{key: value for key, value in given.items() if key not in names},
                           options={name: given[name] for name in names})

        parameters = [p for p in kept if p.default is inspect.Parameter.empty]
        parameters += [p for p in kept if p.default is not inspect.Parameter.empty] + added
        wrapper.__signature__ = own.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__  # typer must read the new signature, not the command's
        return wrapper

    return decorate


def markdown_table(cls: type) -> str:
    """The options of a config class as a Markdown table (docs/options.md is made of these)."""
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for field, meaning, hint in option_fields(cls):
        base, nullable = _optional(meaning.cli_type or hint)
        name = getattr(base, "__name__", str(base)).replace("typing.", "")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, tuple) and meaning.cli_type is str:
            default = "x".join(map(str, default))
        where = "" if meaning.cli else " (config file / Python only)"
        listed = all(choice in meaning.help for choice in meaning.choices)  # the help text already names them
        choices = f" One of: {', '.join(meaning.choices)}." if meaning.choices and not listed else ""
        bounds = ""
        if meaning.low is not None or meaning.high is not None:
            bounds = f" Range: {'>' if meaning.open_low else '≥'} {meaning.low}, ≤ {meaning.high}."
        text = (meaning.help + choices + bounds + where).replace("|", "\\|")
        shown = "—" if default is None else f"`{default}`"
        rows.append(f"| `{meaning.flag or flag_name(field.name)}` | {name}{' or none' if nullable else ''} | {shown} | {text} |")
    return "\n".join(rows) + "\n"
