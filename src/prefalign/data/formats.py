"""Read preference data and normalize every row into one of three example types.

Sources (read_records): .jsonl/.ndjson, .json (a list of objects, {"data": [...]}, or JSON Lines saved as
.json), .parquet, .csv, a directory written by `datasets` save_to_disk, or a hub dataset name (through
datasets.load_dataset). Rows are numbered from 1; in JSON Lines the row number is the line number (blank lines
are skipped but still counted), so an editor jumps straight to it.

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

Bad rows (missing or misnamed fields, wrong types, empty strings, chosen == rejected, unknown roles, a row
whose format differs from the first row's; in JSON, text holding a lone surrogate such as "\\ud800", which is
not Unicode and which no tokenizer or file can take, and values nested more than MAX_DEPTH levels deep) raise
a UserError naming the file, row and field, or, with on_bad_row="skip", are counted and written with their
reason to rejects_path. Problems with the whole file (missing, empty, not what its extension says, a CSV
header naming a column twice, a .json file nested too deeply to parse) always raise.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prefalign import paths
from prefalign.data.jsonsafe import MAX_DEPTH, json_text, unusable
from prefalign.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("auto", "paired", "unpaired", "prompt", "sft")
ON_BAD_ROW = ("error", "skip")
_READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv"}
_FIELDS = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
           "prompt": ("prompt",), "sft": ("prompt", "completion")}
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


# ----------------------------------------------------------------------------- types

class Record(NamedTuple):
    data: dict
    source: str
    row: int  # 1-based


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


class LoadResult(NamedTuple):
    examples: list
    kind: str      # "paired" | "unpaired" | "prompt"
    skipped: int   # rows skipped under on_bad_row="skip" (each one is in the rejects file)


class BadRow(Exception):
    """One row is wrong; the caller adds its place and raises or skips (see RejectsWriter)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def place(source: str, row: int, field: str | None = None) -> str:
    """The prefix every row message starts with: 'data.jsonl, row 3, field 'chosen''."""
    return f"{source}, row {row}" + (f", field '{field}'" if field else "")


class RejectsWriter:
    """Counts skipped rows and appends each, with its reason, as one JSON line to `path`.

    Appends rather than truncates so that loading and tokenizing can share one rejects file;
    the caller picks a fresh path per run. path=None still counts.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path, self.count = path, 0

    def write(self, source: str, row: int, reason: str, data: Any) -> None:
        self.count += 1
        if self.path is None:
            return
        record = {"source": source, "row": row, "reason": reason, "data": data}
        try:
            line = json_text(record)
        except RecursionError:
            line = json_text({**record, "data": f"(not written: nested more than {MAX_DEPTH} levels deep)"})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{name}={value!r} is not one of {', '.join(choices)}{hint}")


# ----------------------------------------------------------------------------- reading

class _Broken(NamedTuple):
    """A row that could not even be parsed (bad JSON line, bad bytes) or holds what no later step can
    handle (a lone surrogate, deep nesting): a bad row, skippable."""
    reason: str
    raw: str
    field: str | None = None
    syntax: bool = True  # False: valid JSON, just not usable (a first row like that is not a wrong file)


def read_records(spec: str, split: str = "train") -> list[Record]:
    """Every row of a data source as Record(data, source, row); UserError at the first unreadable one."""
    records = _read(spec, split)
    for r in records:
        if isinstance(r.data, _Broken):
            raise UserError(f"{place(r.source, r.row, r.data.field)}: {r.data.reason}")
    return records


def _read(spec: str, split: str) -> list[Record]:
    path = os.path.expanduser(str(spec))
    if os.path.isdir(path):
        records = _read_saved_dataset(path, split)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext in _READERS or os.path.exists(path) or paths.looks_local(str(spec)):
            if not os.path.exists(path):
                raise UserError(f"{spec}: file not found{paths.did_you_mean(str(spec))}")
            if ext not in _READERS:
                raise UserError(f"{spec}: unknown file type '{ext}'; use .jsonl, .json, .parquet or .csv, "
                                "or a directory written by datasets' save_to_disk")
            with open(path, "rb") as f:
                raw = f.read()
            if not raw.strip():
                raise UserError(f"{spec}: the file is empty")
            reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}
            records = reader[_READERS[ext]](raw, str(spec))
        else:
            records = _read_hub(spec, split)
    if not records:
        raise UserError(f"{spec}: no rows")
    return records


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate the BOM that Excel puts in front of a CSV
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{source}, line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                        "re-save the file as UTF-8") from None


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _parsed(text: str) -> dict | _Broken:
    """One JSON object from its text, or why not (raw: the text, so a rejects file keeps the row as written)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return _Broken(f"not valid JSON ({e.msg} at column {e.colno})", text.rstrip("\r\n"))
    except RecursionError:  # the parser recurses per level: '[' * 200000 runs out of stack
        return _Broken(f"nested more than {MAX_DEPTH} levels deep", text.rstrip("\r\n"), syntax=False)
    if not isinstance(obj, dict):
        return _Broken(f"expected a JSON object, got {_type_name(obj)}", text.rstrip("\r\n"))
    problem = unusable(obj)
    return obj if problem is None else _Broken(problem[1], text.rstrip("\r\n"), problem[0], syntax=False)


def _read_jsonl(raw: bytes, source: str) -> list[Record]:
    records = []
    # Line by line from a buffer (not raw.split): a second copy of the whole file is never held.
    for lineno, line in enumerate(io.BytesIO(raw), start=1):
        if line.isspace():
            continue
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            data = _Broken(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})", text)
        else:
            line = None  # one copy fewer of a huge row while it is parsed (json.loads takes the newline)
            data = _parsed(text)
        if not records and isinstance(data, _Broken) and data.syntax:
            # The first row failing says the file as a whole is not JSON Lines: no row is worth keeping.
            looks_json = text.lstrip()[:1] in ("[", "{")
            hint = " (a JSON array or pretty-printed JSON belongs in a .json file)" if looks_json else ""
            raise UserError(f"{place(source, lineno)}: {data.reason}; this is not a JSON Lines file{hint}")
        records.append(Record(data, source, lineno))
    return records


def _read_json(raw: bytes, source: str) -> list[Record]:
    text = _decode(raw, source)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line, saved as .json (common on the hub)
            return _read_jsonl(raw, source)
        raise UserError(f"{source}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # the whole file is one value: no row to point at, nothing to skip
        raise UserError(f"{source}: JSON nested too deeply to read (rows may nest at most {MAX_DEPTH} "
                        "levels)") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f"{source}: expected a list of objects or {{\"data\": [...]}}, got {_type_name(obj)}")
    return [Record(_json_item(item), source, i) for i, item in enumerate(obj, start=1)]


def _json_item(item) -> dict | _Broken:
    if not isinstance(item, dict):
        return _Broken(f"expected a JSON object, got {_type_name(item)}", json.dumps(item, default=str))
    problem = unusable(item)
    if problem is None:
        return item
    try:
        raw = json_text(item)
    except RecursionError:
        raw = "(not written: too deep)"
    return _Broken(problem[1], raw, problem[0], syntax=False)


def _read_csv(raw: bytes, source: str) -> list[Record]:
    text = _decode(raw, source)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        _check_header(reader.fieldnames or [], source)
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{source}: not a valid CSV file ({e})") from None
    records = []
    for i, row in enumerate(rows, start=1):
        if None in row:  # DictReader files surplus cells under the key None
            data = _Broken("more cells than the header has columns", json.dumps(row, default=str))
        elif any(v is None for v in row.values()):
            data = _Broken("fewer cells than the header has columns", json.dumps(row, default=str))
        else:
            data = dict(row)
        records.append(Record(data, source, i))
    return records


def _check_header(names: list[str], source: str) -> None:
    # DictReader keeps the last of two same-named columns: the first would be silently ignored.
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserError(f"{source}: the header names column '{name}' twice (columns {names.index(name) + 1} "
                            f"and {i + 1}); rename or remove one")


def _read_parquet(raw: bytes, source: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{source}: not a Parquet file ({e})") from None
    return [Record(row, source, i) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError or its own types; all mean the same here
        raise UserError(f"{path}: a directory, but not a dataset written by save_to_disk ({e})") from None
    return _dataset_records(ds, path, split)


def _read_hub(spec: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # network, auth, missing split: one message, the cause included
        raise UserError(f"{spec}: not a local file, and loading it as a hub dataset failed "
                        f"({type(e).__name__}: {e}){paths.did_you_mean(spec)}") from None
    return _dataset_records(ds, spec, split)


def _dataset_records(ds, source: str, split: str) -> list[Record]:
    if hasattr(ds, "keys"):  # a DatasetDict
        if split not in ds:
            raise UserError(f"{source}: no split '{split}'; it has {', '.join(ds.keys())}")
        ds = ds[split]
    return [Record(dict(row), source, i) for i, row in enumerate(ds, start=1)]


# ----------------------------------------------------------------------------- validation

def _suggest(missing: str, keys) -> str:
    """' (did you mean 'choosen'? rename it to 'chosen')' when the row has a near-miss of `missing`."""
    for k in keys:
        if _ALIASES.get(str(k).lower()) == missing:
            return f" (found '{k}': rename it to '{missing}')"
    close = difflib.get_close_matches(missing, [str(k) for k in keys], n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'? rename it to '{missing}')" if close else ""


def _detect(data: dict) -> str | None:
    if "chosen" in data or "rejected" in data:
        return "paired"
    if "completion" in data or "label" in data:
        return "unpaired"
    if "prompt" in data:
        return "prompt"
    return None


def _require(data: dict, name: str):
    if name not in data:
        raise BadRow(name, f"missing field '{name}'{_suggest(name, data.keys())}; the row has "
                           f"{', '.join(map(str, data)) or 'no fields'}")
    if data[name] is None:
        raise BadRow(name, "is null")
    return data[name]


def _text_or_messages(value, name: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(name, "empty string")
        return value
    if isinstance(value, list):
        return _messages(value, name)
    raise BadRow(name, f"expected a string or a list of {{role, content}} messages, got {_type_name(value)}")


def _messages(value: list, name: str) -> list[dict]:
    if not value:
        raise BadRow(name, "empty message list")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise BadRow(where, f"expected a {{role, content}} message, got {_type_name(m)}")
        if "role" not in m and "from" in m and "value" in m:
            raise BadRow(where, "ShareGPT-style {from, value} message: convert to {role, content}")
        role = m.get("role")
        if role not in ROLES:
            if not isinstance(role, str):
                raise BadRow(f"{where}.role", f"missing or not a string (got {_type_name(role)})")
            guess = [_ROLE_ALIASES[role.lower()]] if role.lower() in _ROLE_ALIASES else \
                difflib.get_close_matches(role.lower(), ROLES, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise BadRow(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}{hint}")
        content = m.get("content")
        # An assistant turn that only calls tools may have no text.
        if m.get("tool_calls") and content in (None, ""):
            pass
        elif not isinstance(content, str):
            raise BadRow(f"{where}.content", f"expected a string, got {_type_name(content)}")
        elif not content.strip():
            raise BadRow(f"{where}.content", "empty string")
        # Parquet structs carry every key of every row, as None where absent: drop them so that chat
        # templates testing `message.tool_calls is defined` see what the user wrote.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _style(value) -> str:
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


def _paired(data: dict, rec: Record) -> PairExample:
    chosen = _text_or_messages(_require(data, "chosen"), "chosen")
    rejected = _text_or_messages(_require(data, "rejected"), "rejected")
    if _style(chosen) != _style(rejected):
        raise BadRow("rejected", f"chosen is {_type_name(chosen)} but rejected is {_type_name(rejected)}; "
                                 "both must be text or both conversations")
    if chosen == rejected:
        raise BadRow("rejected", "chosen and rejected are identical")
    prompt = data.get("prompt", _MISSING)
    if prompt is _MISSING:
        hint = _suggest("prompt", data.keys())
        if hint:  # a misnamed prompt would otherwise be silently read as an implicit-prompt pair
            raise BadRow("prompt", f"missing field 'prompt'{hint}")
    elif prompt is None:
        raise BadRow("prompt", "is null")
    else:
        prompt = _text_or_messages(prompt, "prompt")
        if _style(prompt) == "text" and _style(chosen) == "chat":
            prompt = _MISSING  # the conversations hold the prompt already (UltraFeedback-binarized style)
        elif _style(prompt) == "chat" and _style(chosen) == "text":
            raise BadRow("chosen", "the prompt is a conversation but chosen is a string; give chosen as "
                                   "[{\"role\": \"assistant\", \"content\": ...}]")
        elif _style(prompt) == "chat" and chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            if not chosen or not rejected:
                raise BadRow("chosen" if not chosen else "rejected", "holds only the prompt, no reply")
    if prompt is _MISSING:
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
    return PairExample(prompt, chosen, rejected, rec.source, rec.row)


def _split_implicit(chosen, rejected):
    if _style(chosen) == "chat":
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
    raise BadRow("label", f"expected true or false, got {value!r} ({_type_name(value)}); labels are not guessed "
                          "from 'yes'/'no', 1/0 or scores: convert them to booleans first")


def _unpaired(data: dict, rec: Record, label_required: bool = True) -> UnpairedExample:
    prompt = _text_or_messages(_require(data, "prompt"), "prompt")
    completion = _text_or_messages(_require(data, "completion"), "completion")
    if _style(prompt) != _style(completion):
        raise BadRow("completion", f"the prompt is {_type_name(prompt)} but the completion is "
                                   f"{_type_name(completion)}; both must be text or both conversations")
    if not label_required and "label" not in data:
        return UnpairedExample(prompt, completion, True, rec.source, rec.row)
    label = _label(_require(data, "label"), rec.source.lower().endswith(".csv"))
    return UnpairedExample(prompt, completion, label, rec.source, rec.row)


def _sft(data: dict, rec: Record) -> UnpairedExample:
    """prompt + completion (label optional: false rows are not trained on), or TRL's messages/text (sft_rows.py)."""
    from prefalign.data import sft_rows  # it imports this module

    return sft_rows.example(data, rec)


def _prompt_only(data: dict, rec: Record) -> PromptExample:
    prompt = _text_or_messages(_require(data, "prompt"), "prompt")
    return PromptExample(prompt, rec.source, rec.row, {k: v for k, v in data.items() if k != "prompt"})


_NORMALIZE = {"paired": _paired, "unpaired": _unpaired, "prompt": _prompt_only, "sft": _sft}


def _example(rec: Record, kind: str):
    """(example, kind) for one record, or BadRow."""
    if isinstance(rec.data, _Broken):
        raise BadRow(rec.data.field, rec.data.reason)
    detected = _detect(rec.data)
    if kind == "sft" and detected == "paired":
        kind = "paired"  # SFT on preference data trains on the chosen side
    if kind == "auto":
        if detected is None:
            hints = "".join(_suggest(f, rec.data.keys()) for f in _FIELDS["paired"] + _FIELDS["unpaired"][1:])
            raise BadRow(None, f"no known fields (the row has {', '.join(map(str, rec.data)) or 'none'}){hints}; "
                               "expected prompt/chosen/rejected, prompt/completion/label or prompt")
        kind = detected
    elif detected in ("paired", "unpaired") and detected != kind and kind not in ("prompt", "sft"):
        # (kind=prompt accepts any row with a prompt: preference data can feed online methods)
        raise BadRow(None, f"this row is {detected} data ({', '.join(_FIELDS[detected][1:])}) but kind={kind} "
                           f"expects {', '.join(_FIELDS[kind])}" +
                           ("; load it as paired and convert with pairs_to_unpaired" if kind == "unpaired" else ""))
    return _NORMALIZE[kind](rec.data, rec), kind


def load_examples(spec: str, kind: str = "auto", on_bad_row: str = "error", rejects_path=None,
                  split: str = "train") -> LoadResult:
    """Read `spec` and normalize each row (see the module docstring for formats and rules).

    All rows must share one kind and one style (text or chat): the first good row sets them.
    """
    check_choice("kind", kind, KINDS)
    check_choice("on_bad_row", on_bad_row, ON_BAD_ROW)
    records = _read(spec, split)
    rejects = RejectsWriter(rejects_path)
    examples, first = [], None  # first: (kind, style, row) of the first good row
    for rec in records:
        try:
            ex, row_kind = _example(rec, kind)
            style = _style(ex.prompt)
            if first is None:
                first = (row_kind, style, rec.row)
            elif (row_kind, style) != first[:2]:
                raise BadRow(None, f"mixed formats: row {first[2]} is {first[0]} {first[1]} data but this row is "
                                   f"{row_kind} {style} data; one file holds one format")
        except BadRow as bad:
            message = f"{place(rec.source, rec.row, bad.field)}: {bad.reason}"
            if on_bad_row == "error":
                raise UserError(message) from None
            raw = rec.data.raw if isinstance(rec.data, _Broken) else rec.data
            rejects.write(rec.source, rec.row, message, raw)
            continue
        examples.append(ex)
    if not examples:
        where = f"; see {rejects_path}" if rejects_path else ""
        raise UserError(f"{spec}: all {len(records)} rows were bad and skipped{where}")
    return LoadResult(examples, first[0], rejects.count)


def pairs_to_unpaired(pairs: list[PairExample]) -> list[UnpairedExample]:
    """Each pair becomes a desirable (chosen) and an undesirable (rejected) example, interleaved so
    that any slice of the result stays balanced, as KTO expects."""
    out = []
    for p in pairs:
        out.append(UnpairedExample(p.prompt, p.chosen, True, p.source, p.row))
        out.append(UnpairedExample(p.prompt, p.rejected, False, p.source, p.row))
    return out
