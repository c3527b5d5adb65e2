"""Read preference data and normalize every row into one of three example types: PairExample,
UnpairedExample (KTO) or PromptExample (GRPO, iterative DPO); load_examples is the entry point.

Reading a source into numbered records is data.records' (the file types it reads); the row formats
and their rules (conversations, implicit prompts, KTO labels) are data.rows'; SFT's extra formats
(TRL's messages and text rows) are data.sft_rows'. The names they define are importable from here.

Bad rows (missing or misnamed fields, wrong types, empty strings, chosen == rejected, unknown roles, a row
whose format differs from the first row's; in JSON, text holding a lone surrogate such as "\\ud800", which is
not Unicode and which no tokenizer or file can take, and values nested more than MAX_DEPTH levels deep) raise
a UserError naming the file, row and field, or, with on_bad_row="skip", are counted and written with their
reason to rejects_path. Problems with the whole file (missing, empty, not what its extension says, a CSV
header naming a column twice, a .json file nested too deeply to parse) always raise.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, NamedTuple

from prefalign.data import sft_rows
from prefalign.data.jsonsafe import MAX_DEPTH, json_text
from prefalign.data.records import Broken, Record, place, read_records, read_source  # noqa: F401 (read_records)
from prefalign.data.rows import (  # noqa: F401 (PromptExample, split_text_prefix: this module's API too)
    BadRow, PairExample, PromptExample, UnpairedExample, detect_kind, paired_example, prompt_example,
    split_text_prefix, style_of, suggest_rename, unpaired_example,
)
from prefalign.errors import UserError

KINDS = ("auto", "paired", "unpaired", "prompt", "sft")
ON_BAD_ROW = ("error", "skip")
_FIELDS = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
           "prompt": ("prompt",), "sft": ("prompt", "completion")}


class LoadResult(NamedTuple):
    examples: list
    kind: str      # "paired" | "unpaired" | "prompt"
    skipped: int   # rows skipped under on_bad_row="skip" (each one is in the rejects file)


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


_NORMALIZE = {"paired": paired_example, "unpaired": unpaired_example, "prompt": prompt_example,
              "sft": sft_rows.example}


def _example(rec: Record, kind: str):
    """(example, kind) for one record, or BadRow."""
    if isinstance(rec.data, Broken):
        raise BadRow(rec.data.field, rec.data.reason)
    detected = detect_kind(rec.data)
    if kind == "sft" and detected == "paired":
        kind = "paired"  # SFT on preference data trains on the chosen side
    if kind == "auto":
        if detected is None:
            hints = "".join(suggest_rename(f, rec.data.keys()) for f in _FIELDS["paired"] + _FIELDS["unpaired"][1:])
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
    records = read_source(spec, split)
    rejects = RejectsWriter(rejects_path)
    examples, first = [], None  # first: (kind, style, row) of the first good row
    for rec in records:
        try:
            ex, row_kind = _example(rec, kind)
            style = style_of(ex.prompt)
            if first is None:
                first = (row_kind, style, rec.row)
            elif (row_kind, style) != first[:2]:
                raise BadRow(None, f"mixed formats: row {first[2]} is {first[0]} {first[1]} data but this row is "
                                   f"{row_kind} {style} data; one file holds one format")
        except BadRow as bad:
            message = f"{place(rec.source, rec.row, bad.field)}: {bad.reason}"
            if on_bad_row == "error":
                raise UserError(message) from None
            raw = rec.data.raw if isinstance(rec.data, Broken) else rec.data
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
