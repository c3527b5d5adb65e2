"""One config system for every command: a dataclass whose fields carry their flag's help.

A command's settings are a dataclass. Each field is made with `option(default, help, choices)`;
the class may hold, besides its fields,
    RANGES    field -> validation.Range spec ("> 0", "[0, 1)"): shown in the help, checked for flags and YAML
    ALIASES   another tool's name -> field (GRPO's `beta`, TRL's name for kl_coef): an unlisted flag and a YAML key
    PATHS     fields holding user paths (`~` expanded)
    REQUIRED  fields the command cannot run without (a flag or a --config key)
`add_flags` turns the class into flags (--max-new-tokens for max_new_tokens, help with its real default,
choices and range); `from_flags` builds an instance from the class defaults < a strict --config YAML
file < the flags given. Import-light (no torch): `prefalign --help` builds every parser from these.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import typing
from typing import Any, Callable

from prefalign import validation
from prefalign.errors import UserError


ALIAS = "alias__"  # the argparse dest prefix of an alias flag


def option(default, help: str, choices=None, **meta) -> dataclasses.Field:
    """A field with its flag's help and choices (meta: "flag"/"metavar" for a mapping field's repeatable flag)."""
    metadata = {"help": help, "choices": choices, **meta}
    if isinstance(default, (list, dict)):  # a fresh copy per instance
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def settings(cls):
    """`@dataclass` for a command's settings class, whose RANGES, PATHS, ALIASES and REQUIRED also hold
    those of the field groups it inherits (prefalign.field_groups), its own entries winning."""
    cls = dataclasses.dataclass(cls)
    for name, empty in (("RANGES", {}), ("ALIASES", {}), ("PATHS", ()), ("REQUIRED", ())):
        parts = [vars(k)[name] for k in reversed(cls.__mro__) if name in vars(k)]
        if isinstance(empty, dict):
            setattr(cls, name, {k: v for part in parts for k, v in part.items()})
        else:
            setattr(cls, name, tuple(dict.fromkeys(x for part in parts for x in part)))
    return cls


def sections(cls) -> list[tuple[str | None, list[dataclasses.Field]]]:
    """The fields of `cls` in the order its help shows them: the class's own first (no heading), then
    each inherited group's under the group's docstring. A field a class redeclares (another default)
    stays in the group that declares it first."""
    home = {}
    for klass in reversed(cls.__mro__):  # the most basic declaration wins
        for name in vars(klass).get("__annotations__", {}):
            home.setdefault(name, klass)
    out = []
    for klass in [cls] + [k for k in cls.__mro__[1:] if dataclasses.is_dataclass(k)]:
        group = [cls.__dataclass_fields__[name] for name in vars(klass).get("__annotations__", {})
                 if home[name] is klass]
        if group:
            out.append((None if klass is cls else klass.__doc__.strip(), group))
    return out


def ordered(cls, values: dict) -> dict:
    """`values` (e.g. dataclasses.asdict of an instance) in the help's order, for a readable config.yaml."""
    names = [f.name for _, group in sections(cls) for f in group]
    return {**{n: values[n] for n in names if n in values}, **values}


def as_dict(obj) -> dict:
    """dataclasses.asdict of a settings instance in the help's order: config.yaml reads like `--help`."""
    return ordered(type(obj), dataclasses.asdict(obj))


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check(obj, where: str) -> None:
    """Raise a UserError (prefixed `where`) for the first field of a settings instance outside its
    RANGES entry or its field's choices."""
    validation.check_table(obj, getattr(obj, "RANGES", {}), where)
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise UserError(f"{where}: {f.name} must be one of {', '.join(choices)}; got {getattr(obj, f.name)!r}")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    """A settings class's resolved annotations, once: get_type_hints evaluates every string
    annotation of the class on each call, which was 90% of building all the parsers."""
    return typing.get_type_hints(cls)


def field_type(cls, name: str) -> tuple[type, type | None, bool]:
    """(base type, list element type or None, optional) of a field: `float | None` -> (float, None, True),
    `list[float]` -> (list, float, False)."""
    hint = _hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args and len(args) == 2
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return origin, (typing.get_args(hint) or (None,))[0], optional
    return hint, None, optional


def describe(value) -> str:
    """A default as the help shows it."""
    if value == "":
        return "empty"
    return "none" if value is None or value == [] or value == {} else repr(value)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
              shown: Callable[[str], str | None] | None = None) -> None:
    """One flag per field of `cls`. Its help: the field's help, then the default the command really uses
    (shown(name), where it says more than the field's default: sft's own lr, the demo task's values)
    and the range. Choices show as {a,b,c}. The argparse defaults stay None, so the flags given are
    known, and values stay text: from_flags types and checks flags and YAML values the same way."""
    ranges, required = getattr(cls, "RANGES", {}), getattr(cls, "REQUIRED", ())
    for title, group in sections(cls):
        target = parser if title is None else parser.add_argument_group(title)
        for f in group:
            if f.name not in skip:
                _add_flag(target, cls, f, ranges, required, shown)
    for alias, name in getattr(cls, "ALIASES", {}).items():  # unlisted, as train's TRL names are (docs/trl.md)
        choices = cls.__dataclass_fields__[name].metadata.get("choices")
        parser.add_argument(flag_of(alias), dest=ALIAS + alias, default=None, choices=choices, help=argparse.SUPPRESS)


def _add_flag(parser, cls, f: dataclasses.Field, ranges: dict, required, shown) -> None:
    typ, elem, _ = field_type(cls, f.name)
    text = (shown(f.name) if shown else None) or describe(default_of(f))
    notes = "required" if f.name in required else f"default: {text}{validation.help_suffix(ranges.get(f.name))}"
    kw = dict(dest=f.name, default=None, help=f"{f.metadata['help']} ({notes})".replace("%", "%%"))
    choices = f.metadata.get("choices")
    if typ is dict:
        if "flag" in f.metadata:  # KEY=VALUE, repeatable
            parser.add_argument(f.metadata["flag"], action="append", metavar=f.metadata.get("metavar"), **kw)
    elif typ is bool:
        parser.add_argument(flag_of(f.name), action=argparse.BooleanOptionalAction, **kw)
    elif typ is list:
        parser.add_argument(flag_of(f.name), nargs="+", type=elem or str, metavar=f.name.upper(), **kw)
    else:  # a metavar would hide the choices
        parser.add_argument(flag_of(f.name), metavar=None if choices else f.name.upper(), choices=choices, **kw)


def coerce(cls, name: str, value: Any, where: str) -> Any:
    """A flag's text or a YAML value as the field's type, inside its range, `~` expanded for a path;
    otherwise a UserError naming `where` (the flag or the file), the key and the value."""
    typ, _, optional = field_type(cls, name)
    if value is None and optional:
        return None
    spec = getattr(cls, "RANGES", {}).get(name)
    value = validation.coerce(name, value, typ, where, spec)
    msg = validation.problem(name, value, spec)
    if msg:
        raise UserError(f"{where}: {msg}")
    return validation.expand(value) if name in getattr(cls, "PATHS", ()) else value


def hinted(key: str, names) -> str:
    """'key' (did you mean 'name'?) for an unknown key."""
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
    return f"'{key}' (did you mean '{close[0]}'?)" if close else f"'{key}'"


def refuse_unknown(keys, names, where: str, hint: Callable[[str], str] | None = None) -> None:
    """All the unknown keys of a file in one line: a file written for another tool has several."""
    unknown = [(hint or (lambda k: hinted(k, names)))(k) for k in keys if k.replace("-", "_") not in names]
    if unknown:
        raise UserError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")


def from_yaml(cls, path: str) -> dict:
    """The typed, checked values of a --config file for `cls`."""
    from prefalign.yamlio import load_mapping

    mapping, names = load_mapping(path), {f.name for f in dataclasses.fields(cls)}
    aliases = getattr(cls, "ALIASES", {})
    if aliases:  # unknown keys all at once; an alias becomes its field; a field set under both names is refused
        from prefalign.trl_keys import translate

        mapping = translate(mapping, names, path, aliases)
    refuse_unknown(mapping, names, path)
    return {key.replace("-", "_"): coerce(cls, key.replace("-", "_"), value, path) for key, value in mapping.items()}


def given_flags(cls, args: argparse.Namespace) -> dict:
    """The fields of `cls` set by a flag (or an alias flag: --beta), typed and checked (a refusal names the flag)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    aliases = getattr(cls, "ALIASES", {})
    given.update({a: getattr(args, ALIAS + a) for a in aliases if getattr(args, ALIAS + a, None) is not None})
    if aliases:
        from prefalign.trl_keys import translate

        given = translate(given, given, "flags", aliases)  # a field set under both names is refused
    return {name: coerce(cls, name, value, flag_of(name)) for name, value in given.items()}


def from_flags(cls, args: argparse.Namespace, config_path: str = "", extra: dict | None = None):
    """An instance of `cls` from its defaults < the YAML file < the flags given < extra."""
    values = from_yaml(cls, validation.expand(config_path)) if config_path else {}
    values.update(given_flags(cls, args))
    values.update(extra or {})
    missing = [flag_of(n) for n in getattr(cls, "REQUIRED", ()) if values.get(n) in (None, "")]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (a flag, or a key of --config)")
    try:
        return cls(**values)
    except TypeError as e:  # a value of the wrong type reaching a check in the class
        raise UserError(f"{config_path or 'flags'}: {e}") from None
