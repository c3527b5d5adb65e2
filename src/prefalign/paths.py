"""Telling a mistyped local path from a hub name before anything asks the network.

A name the hub cannot hold (`prefs.jsonll`, `./tinyy`, `a/b/c`) or a bare word given as a model
(`tinyy`: hub models are `owner/name`) is a local path that does not exist: the user hears so at
once, with the nearest entry of that directory, instead of after half a minute of hub retries.
"""

from __future__ import annotations

import difflib
import os
import re

# A file extension, not a version suffix: letters only ("Qwen2.5-0.5B" and "model.v2" are hub names).
_EXTENSION = re.compile(r"\.[A-Za-z]{2,8}$")
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or its datasets/transformers twins) set: no hub request is ever made."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_local(name: str) -> bool:
    """True for a name only a local path can have: it starts with . / ~, has a file extension,
    holds more separators than owner/name, or starts with a directory that exists here (data/x)."""
    path = os.path.expanduser(name)
    if name.startswith((".", "~", os.sep)) or _EXTENSION.search(path) or path.count(os.sep) > 1:
        return True
    return os.sep in path and os.path.isdir(path.split(os.sep)[0])


def near_miss(name: str, dirs_only: bool = False) -> str:
    """The entry of `name`'s directory closest to its last part, spelled as the user would type it
    ("" when none is close)."""
    path = os.path.expanduser(name).rstrip(os.sep)
    parent, base = os.path.split(path)
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return ""
    if dirs_only:
        entries = [e for e in entries if os.path.isdir(os.path.join(parent or ".", e))]
    match = difflib.get_close_matches(base, entries, n=1, cutoff=0.75)
    if not match:
        return ""
    head = name.rstrip(os.sep)[:len(name.rstrip(os.sep)) - len(base)]  # the user's own spelling of the folder
    return head + match[0]


def did_you_mean(name: str, dirs_only: bool = False) -> str:
    match = near_miss(name, dirs_only)
    return f"; did you mean {match}?" if match else ""


def in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model is in the local cache (what an offline run can load). No network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id, an old huggingface_hub: not loadable offline either way
        return False
