"""One vocabulary for the values every command accepts: documented numeric ranges, field types, user paths.

A range is a short spec, written once beside its field or flag and shown in its help:
"> 0", ">= 1", "[0, 1)", "(0, 1]", "finite". Every range refuses nan and inf: no option of
prefalign means anything at a non-finite value, and a NaN that reaches the optimizer turns
every weight into NaN without a single non-finite loss to warn about.
"""

from __future__ import annotations

import argparse
import math
import os
import re

from prefalign.errors import UserError

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,]+),\s*([^\])]+)([\])])$")


def _number(text: str) -> float:
    base, _, power = text.strip().partition("**")  # "2**32" reads better in help than 4294967296
    return float(base) ** float(power) if power else float(base)


class Range:
    """A documented range of numbers; `ok(v)` is False for nan and inf whatever the bounds."""

    def __init__(self, spec: str):
        self.spec = spec.strip()
        self.lo, self.hi, self.lo_open, self.hi_open = -math.inf, math.inf, True, True
        if self.spec == "finite":
            return
        m = _BOUND.match(self.spec)
        if m:
            op, value = m.group(1), _number(m.group(2))
            if op.startswith(">"):
                self.lo, self.lo_open = value, op == ">"
            else:
                self.hi, self.hi_open = value, op == "<"
            return
        m = _INTERVAL.match(self.spec)
        if not m:
            raise ValueError(f"not a range spec: {spec!r}")
        self.lo, self.hi = _number(m.group(2)), _number(m.group(3))
        self.lo_open, self.hi_open = m.group(1) == "(", m.group(4) == ")"

    def ok(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    @property
    def text(self) -> str:
        """How the range reads in a message: "> 0", "in [0, 1)", "finite"."""
        return f"in {self.spec}" if self.spec[0] in "[(" else self.spec


# The ranges of the losses' numeric parameters, whether set through their config shorthand
# (--beta) or through loss_params (--loss-param beta=...): one table for both ways in. A numeric
# parameter not listed must still be finite (label_smoothing's bound depends on the loss: each
# loss that has one checks it itself; its config shorthand keeps the common [0, 0.5)).
LOSS_PARAM_RANGES = {"beta": "> 0", "gamma": "finite", "rpo_alpha": ">= 0",
                     "desirable_weight": "> 0", "undesirable_weight": "> 0", "discopop_tau": "> 0"}


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def problem(name: str, value, spec: str | None) -> str | None:
    """Why `value` is outside `spec` (one clause naming `name` and the value), or None.

    None values (a default filled in later) pass; a list is checked element by element."""
    if spec is None or value is None:
        return None
    if isinstance(value, (list, tuple)):
        odd = [v for v in value if isinstance(v, bool) or not isinstance(v, (int, float))]
        if odd:
            return f"{name} must be numbers {Range(spec).text}; got {_shown(odd[0])}"
        return next((p for p in (problem(name, v, spec) for v in value) if p), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # a type problem, reported by coerce()
    r = Range(spec)
    return None if r.ok(value) else f"{name} must be {r.text}; got {_shown(value)}"


def check_table(obj, table: dict[str, str], where: str) -> None:
    """Raise a UserError for the first field of `obj` outside its range in `table` (name -> spec)."""
    for name, spec in table.items():
        msg = problem(name, getattr(obj, name), spec)
        if msg:
            raise UserError(f"{where}: {msg}")


def help_suffix(spec: str | None) -> str:
    return f"; range {Range(spec).text}" if spec else ""


def expand(path: str) -> str:
    """`~` and `~user` at the start of a user path, as a shell would (YAML values and `--x=~/y` skip the shell)."""
    return os.path.expanduser(path) if isinstance(path, str) else path


# ------------------------------------------------------------------------------------------- types


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "a mapping"}


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return _shown(value)


def coerce(name: str, value, typ: type, where: str, spec: str | None = None):
    """`value` (from YAML, a flag string or Python) as `typ`, or a UserError naming `where`, `name` and the value.

    A mapping or list is never stringified into a string field (a run written into `./{'a': 1}`),
    and a YAML boolean is no string either (`output: no` is a mistake, not a folder named False)."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, (bool, list, dict)) or value is None:
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                value = value.strip()
                return int(value) if re.fullmatch(r"[+-]?\d+", value) else _int_of_float(value)
            return int(value)
        if typ is float:
            if isinstance(value, (bool, list, dict)) or value is None:
                raise ValueError
            return float(value)
        if typ is str:
            if value is None or isinstance(value, (bool, list, dict, tuple)):
                raise ValueError
            return str(value)
        if typ is list:
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)) or any(isinstance(v, (list, dict)) for v in value):
                raise ValueError
            return list(value)
        if typ is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        return value
    except (TypeError, ValueError, OverflowError):
        word = {int: "int", float: "float"}.get(typ, _TYPE_WORDS.get(typ, typ.__name__))
        rng = f" {Range(spec).text}" if spec and typ in (int, float) else ""
        raise UserError(f"{where}: {name} must be {word}{rng}; got {_kind(value)}") from None


def _int_of_float(text: str) -> int:
    """'1e3' -> 1000 (a whole number written as a float); '1e23' keeps its size, for the range to refuse."""
    v = float(text)
    if not math.isfinite(v) or not v.is_integer() or abs(v) > 2**53:  # beyond 2**53 a float is no exact int
        raise ValueError
    return int(v)


# ------------------------------------------------------------------------------------------- flags


def arg(typ: type, spec: str):
    """An argparse `type=` that also checks the range: `--samples -1` -> "argument --samples: must be >= 0; got -1"."""

    def convert(text: str):
        try:
            value = typ(text) if typ is float else coerce("value", text, typ, "", None)
        except (ValueError, UserError):
            raise argparse.ArgumentTypeError(f"invalid {typ.__name__} value: {text!r}") from None
        msg = problem("value", value, spec)
        if msg:
            raise argparse.ArgumentTypeError(msg.replace("value must be", "must be"))
        return value

    convert.__name__ = typ.__name__
    return convert


def add_ranged(parser: argparse.ArgumentParser, flag: str, typ: type, spec: str, help: str = "", **kw):
    """parser.add_argument with a range-checked type, and its default and range in the help text."""
    shown = f"default: {kw['default']!r}" if kw.get("default") is not None else ""
    notes = (shown + help_suffix(spec)).lstrip("; ")
    return parser.add_argument(flag, type=arg(typ, spec), help=f"{help} ({notes})".lstrip(), **kw)


def path_arg(text: str) -> str:
    """argparse `type=` for a path flag: `--output=~/x` gets no shell expansion."""
    return expand(text)


# ------------------------------------------------------------------------------------------- paths


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_output_file(path: str, flag: str) -> None:
    """Before the work: a file flag (--json, --output) must not name a directory, nor sit under a file."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a directory (give a file name)")
    anc = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(anc):
        raise UserError(f"{flag} {path}: {anc} is a file, not a directory")


def check_output_dir(path: str, flag: str) -> None:
    """Before the work: a folder flag (--output, --cache-dir) must not name a file, nor sit under a file."""
    if not path:
        return
    anc = _nearest_existing(path)
    if not os.path.isdir(anc):
        where = "" if os.path.abspath(anc) == os.path.abspath(path) else f" ({anc} is a file)"
        raise UserError(f"{flag} {path}: exists and is not a directory{where}" if not where
                        else f"{flag} {path}: cannot be a directory{where}")
