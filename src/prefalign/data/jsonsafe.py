"""JSON values from untrusted data: what json.loads accepts but no later step can take.

A lone surrogate ("\\ud800", half of a UTF-16 pair) is valid JSON but not Unicode: tokenizers
and UTF-8 files reject it. Deep nesting is valid JSON too, but every recursive step after parsing
(encoding a rejects line, rendering a template) can run out of stack on it.
"""

from __future__ import annotations

import json
import re

MAX_DEPTH = 100  # nesting levels a row may have; real rows have a handful, a hostile one thousands
_SURROGATE = re.compile("[\ud800-\udfff]")


def type_name(value) -> str:
    """A JSON value's type as a message names it: "an object", "a list", "null"..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def json_text(value) -> str:
    """value as one line of JSON that a UTF-8 file can hold: non-ASCII text stays readable, but a lone
    surrogate is written as its \\uXXXX escape (json.loads reads it back as it was)."""
    line = json.dumps(value, ensure_ascii=False, default=str)
    return line.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(line) else line


def unusable(value) -> tuple[str | None, str] | None:
    """(field path, reason) for the first lone surrogate (in a key or a string) or nesting deeper than
    MAX_DEPTH in a parsed JSON value; None if there is none. Iterative: the value may be deep."""
    stack = [(value, None, 0, None)]  # (value, its path, its depth, the row's field it is in)
    while stack:
        v, path, depth, top = stack.pop()
        if depth > MAX_DEPTH:
            return top, f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                return path, (f"holds a lone surrogate ({ascii(m.group())[1:-1]} at character {m.start() + 1}), "
                              "which is not valid Unicode: half of a \\uXXXX escape pair; fix the text's encoding")
        elif isinstance(v, dict):
            for k, x in v.items():
                key = str(k)
                if _SURROGATE.search(key):
                    return path, f"a key holds a lone surrogate ({ascii(key)}), which is not valid Unicode"
                stack.append((x, key if path is None else f"{path}.{key}", depth + 1, top or key))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1, top) for i, x in enumerate(v))
    return None
