"""The one reader of config YAML files: strict, so a file means one thing.

PyYAML's safe_load takes the last of two equal keys (a typo'd copy silently wins), expands
anchors and aliases (nine lines of "billion laughs" exhaust memory), and builds keys of any
type (`1: x`, `[a]: b`). A config file needs none of that: this loader refuses duplicate keys,
anchors/aliases (at the parser's events, before anything is built), merge keys (`<<`) and
non-string keys, each with its line number.
"""

from __future__ import annotations

import os

import yaml

from prefalign.errors import UserError

_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"


class _Refused(Exception):
    def __init__(self, mark, msg: str):
        super().__init__(f"line {mark.line + 1}: {msg}")


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        event = self.peek_event()
        # Refused here, at the first `&` or `*`, so an alias bomb is never expanded or even composed.
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(event.start_mark, f"YAML alias *{event.anchor} is not allowed in a config file")
        if getattr(event, "anchor", None) is not None:
            raise _Refused(event.start_mark, f"YAML anchor &{event.anchor} is not allowed in a config file")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                raise _Refused(key_node.start_mark, "merge keys (<<) are not allowed in a config file")
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"({key_node.id})"
                raise _Refused(key_node.start_mark, f"key {shown!s} is not a string (quote it, or fix the indentation)")
            if key_node.value in seen:
                raise _Refused(key_node.start_mark, f"duplicate key '{key_node.value}' (first on line "
                                                    f"{seen[key_node.value]})")
            seen[key_node.value] = line
        return super().construct_mapping(node, deep)




def loads(text: str, name: str = "<yaml>"):
    """The document in `text`, read strictly; a UserError naming `name` and the line otherwise."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as e:
        raise UserError(f"{name}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{name}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise UserError(f"{name}: nested too deeply to be a config file") from None
    finally:
        loader.dispose()


def load_mapping(path: str, what: str = "config file") -> dict:
    """A config file: a mapping of string keys to values ({} for an empty file)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}" if not os.path.exists(path) else f"{path}: not a file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid YAML (not UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror})") from None
    data = loads(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # never write the anchors this module's loader refuses
        return True


def dumps(data: dict) -> str:
    """YAML text that load_mapping reads back: no anchors even where two values are the same object."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True)
