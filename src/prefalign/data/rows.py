"""One record -> one example: the row formats and the rules a row must follow.

Formats, detected per row from its fields (kind="auto"), or forced with kind=...:

    paired    chosen + rejected (+ prompt)  -> PairExample
    unpaired  completion + label (+ prompt) -> UnpairedExample   (KTO)
    prompt    prompt only, the rest kept    -> PromptExample     (GRPO, iterative DPO)

Each text field is either a string or a conversation: a list of {role, content} messages with
role in system/user/assistant/tool. Conversations are rendered by the tokenizer's chat template
later (data.tokenize); here they are only checked.

Paired rows with no prompt field carry the prompt inside chosen and rejected ("implicit prompt"):
  - conversations: the prompt is the messages both share from the start; the rest of each is
    its completion, which must start with an assistant message;
  - text: the prompt is the longest common prefix, cut back to just before its last run of
    whitespace, so the completions start with that whitespace (" Paris" / " Lyon"). Byte-level BPE
    tokenizers attach a space to the word after it, so this cut keeps the prompt's tokens a prefix
    of the whole text's tokens. A common prefix with no whitespace at all is a bad row.
A string prompt next to conversational chosen/rejected (UltraFeedback-binarized style) is read the
same way: the conversations already hold the prompt. A conversational prompt that chosen and
rejected both repeat at their start is stripped from them.

KTO labels must be booleans (JSON true/false, a Parquet bool). CSV has no types, so there the
strings "true"/"false" (any case) are accepted. Anything else ("yes", 1, 1.0, a score) is a bad
row: guessing what 1 or "y" means is how a dataset's labels silently flip.

A row that breaks a rule raises BadRow (its field and reason); data.formats adds the row's place
and raises or skips it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from prefalign.data.jsonsafe import type_name
from prefalign.data.records import Record

ROLES = ("system", "user", "assistant", "tool")
# Names other datasets use for our fields; only ever used to suggest a rename, never to guess.
_ALIASES = {
    "question": "prompt", "instruction": "prompt", "query": "prompt", "input": "prompt", "context": "prompt",
    "accepted": "chosen", "preferred": "chosen", "winner": "chosen", "response_j": "chosen", "good": "chosen",
    "dispreferred": "rejected", "loser": "rejected", "response_k": "rejected", "bad": "rejected",
    "response": "completion", "output": "completion", "answer_text": "completion",
    "desirable": "label", "is_desirable": "label", "kto_label": "label",
}
_MISSING = object()  # "no prompt field", as opposed to a null one
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}


@dataclass
class PairExample:
    prompt: str | list[dict]
    chosen: str | list[dict]      # completion only: the prompt is never repeated here
    rejected: str | list[dict]
    source: str = ""
    row: int = 0


@dataclass
class UnpairedExample:
    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool                   # True = desirable
    source: str = ""
    row: int = 0


@dataclass
class PromptExample:
    prompt: str | list[dict]
    source: str = ""
    row: int = 0
    extra: dict = field(default_factory=dict)  # every other field of the row, e.g. {"answer": "42"}


class BadRow(Exception):
    """One row is wrong; the caller adds its place and raises or skips (see RejectsWriter)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def suggest_rename(missing: str, keys) -> str:
    """' (did you mean 'choosen'? rename it to 'chosen')' when the row has a near-miss of `missing`."""
    for k in keys:
        if _ALIASES.get(str(k).lower()) == missing:
            return f" (found '{k}': rename it to '{missing}')"
    close = difflib.get_close_matches(missing, [str(k) for k in keys], n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'? rename it to '{missing}')" if close else ""


def detect_kind(data: dict) -> str | None:
    if "chosen" in data or "rejected" in data:
        return "paired"
    if "completion" in data or "label" in data:
        return "unpaired"
    if "prompt" in data:
        return "prompt"
    return None


def _require(data: dict, name: str):
    if name not in data:
        raise BadRow(name, f"missing field '{name}'{suggest_rename(name, data.keys())}; the row has "
                           f"{', '.join(map(str, data)) or 'no fields'}")
    if data[name] is None:
        raise BadRow(name, "is null")
    return data[name]


def text_or_messages(value, name: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(name, "empty string")
        return value
    if isinstance(value, list):
        return check_messages(value, name)
    raise BadRow(name, f"expected a string or a list of {{role, content}} messages, got {type_name(value)}")


def check_messages(value: list, name: str) -> list[dict]:
    if not value:
        raise BadRow(name, "empty message list")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise BadRow(where, f"expected a {{role, content}} message, got {type_name(m)}")
        if "role" not in m and "from" in m and "value" in m:
            raise BadRow(where, "ShareGPT-style {from, value} message: convert to {role, content}")
        role = m.get("role")
        if role not in ROLES:
            if not isinstance(role, str):
                raise BadRow(f"{where}.role", f"missing or not a string (got {type_name(role)})")
            guess = [_ROLE_ALIASES[role.lower()]] if role.lower() in _ROLE_ALIASES else \
                difflib.get_close_matches(role.lower(), ROLES, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise BadRow(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}{hint}")
        content = m.get("content")
        # An assistant turn that only calls tools may have no text.
        if m.get("tool_calls") and content in (None, ""):
            pass
        elif not isinstance(content, str):
            raise BadRow(f"{where}.content", f"expected a string, got {type_name(content)}")
        elif not content.strip():
            raise BadRow(f"{where}.content", "empty string")
        # Parquet structs carry every key of every row, as None where absent: drop them so that chat
        # templates testing `message.tool_calls is defined` see what the user wrote.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def style_of(value) -> str:
    return "chat" if isinstance(value, list) else "text"


def _common_messages(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_text_prefix(a: str, b: str) -> int:
    """Where the shared prompt of two full texts ends: the longest common prefix, cut back to just
    before its last run of whitespace (so each completion starts with that whitespace). 0: none."""
    n = len(os.path.commonprefix([a, b]))
    cut = next((i for i in range(n - 1, -1, -1) if a[i].isspace()), -1)
    if cut < 0:
        return 0
    while cut > 0 and a[cut - 1].isspace():
        cut -= 1
    return cut


def paired_example(data: dict, rec: Record) -> PairExample:
    chosen = text_or_messages(_require(data, "chosen"), "chosen")
    rejected = text_or_messages(_require(data, "rejected"), "rejected")
    if style_of(chosen) != style_of(rejected):
        raise BadRow("rejected", f"chosen is {type_name(chosen)} but rejected is {type_name(rejected)}; "
                                 "both must be text or both conversations")
    if chosen == rejected:
        raise BadRow("rejected", "chosen and rejected are identical")
    prompt = data.get("prompt", _MISSING)
    if prompt is _MISSING:
        hint = suggest_rename("prompt", data.keys())
        if hint:  # a misnamed prompt would otherwise be silently read as an implicit-prompt pair
            raise BadRow("prompt", f"missing field 'prompt'{hint}")
    elif prompt is None:
        raise BadRow("prompt", "is null")
    else:
        prompt = text_or_messages(prompt, "prompt")
        if style_of(prompt) == "text" and style_of(chosen) == "chat":
            prompt = _MISSING  # the conversations hold the prompt already (UltraFeedback-binarized style)
        elif style_of(prompt) == "chat" and style_of(chosen) == "text":
            raise BadRow("chosen", "the prompt is a conversation but chosen is a string; give chosen as "
                                   "[{\"role\": \"assistant\", \"content\": ...}]")
        elif style_of(prompt) == "chat" and chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            if not chosen or not rejected:
                raise BadRow("chosen" if not chosen else "rejected", "holds only the prompt, no reply")
    if prompt is _MISSING:
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
    return PairExample(prompt, chosen, rejected, rec.source, rec.row)


def _split_implicit(chosen, rejected):
    if style_of(chosen) == "chat":
        n = _common_messages(chosen, rejected)
        if n == 0:
            raise BadRow("chosen", "no prompt field, and chosen and rejected share no leading messages to use as one")
        if n == len(chosen) or n == len(rejected):
            raise BadRow("rejected", "one of chosen/rejected is the start of the other: after the shared "
                                     "prompt it has no reply")
        if chosen[n]["role"] != "assistant" or rejected[n]["role"] != "assistant":
            raise BadRow("rejected", f"chosen and rejected first differ at message {n}, which is not an assistant "
                                     "reply, so the shared part is not a prompt")
        return chosen[:n], chosen[n:], rejected[n:]
    cut = split_text_prefix(chosen, rejected)
    if cut == 0:
        raise BadRow("prompt", "no prompt field, and chosen and rejected share no prefix ending at whitespace "
                               "to use as one (add a prompt field)")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _label(value, from_csv: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_csv and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BadRow("label", f"expected true or false, got {value!r} ({type_name(value)}); labels are not guessed "
                          "from 'yes'/'no', 1/0 or scores: convert them to booleans first")


def unpaired_example(data: dict, rec: Record, label_required: bool = True) -> UnpairedExample:
    prompt = text_or_messages(_require(data, "prompt"), "prompt")
    completion = text_or_messages(_require(data, "completion"), "completion")
    if style_of(prompt) != style_of(completion):
        raise BadRow("completion", f"the prompt is {type_name(prompt)} but the completion is "
                                   f"{type_name(completion)}; both must be text or both conversations")
    if not label_required and "label" not in data:
        return UnpairedExample(prompt, completion, True, rec.source, rec.row)
    label = _label(_require(data, "label"), rec.source.lower().endswith(".csv"))
    return UnpairedExample(prompt, completion, label, rec.source, rec.row)


def prompt_example(data: dict, rec: Record) -> PromptExample:
    prompt = text_or_messages(_require(data, "prompt"), "prompt")
    return PromptExample(prompt, rec.source, rec.row, {k: v for k, v in data.items() if k != "prompt"})
