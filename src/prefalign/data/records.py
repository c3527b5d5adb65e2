"""Reading a data source into numbered records, before any row is looked at.

Sources (read_records): .jsonl/.ndjson, .json (a list of objects, {"data": [...]}, or JSON Lines saved as
.json), .parquet, .csv, a directory written by `datasets` save_to_disk, or a hub dataset name (through
datasets.load_dataset). Rows are numbered from 1; in JSON Lines the row number is the line number (blank lines
are skipped but still counted), so an editor jumps straight to it.

A row that cannot even be parsed (a bad JSON line, bytes that are not UTF-8, a lone surrogate, nesting
deeper than MAX_DEPTH) is a Broken record: a bad row, skippable like any other (data.formats). Problems
with the whole file (missing, empty, not what its extension says, a CSV header naming a column twice, a
.json file nested too deeply to parse) always raise a UserError.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import NamedTuple

from prefalign import paths
from prefalign.data.jsonsafe import MAX_DEPTH, json_text, type_name, unusable
from prefalign.errors import UserError

_READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv"}


class Record(NamedTuple):
    data: dict
    source: str
    row: int  # 1-based


def place(source: str, row: int, field: str | None = None) -> str:
    """The prefix every row message starts with: 'data.jsonl, row 3, field 'chosen''."""
    return f"{source}, row {row}" + (f", field '{field}'" if field else "")


class Broken(NamedTuple):
    """A row that could not even be parsed (bad JSON line, bad bytes) or holds what no later step can
    handle (a lone surrogate, deep nesting): a bad row, skippable."""
    reason: str
    raw: str
    field: str | None = None
    syntax: bool = True  # False: valid JSON, just not usable (a first row like that is not a wrong file)


def read_records(spec: str, split: str = "train") -> list[Record]:
    """Every row of a data source as Record(data, source, row); UserError at the first unreadable one."""
    records = read_source(spec, split)
    for r in records:
        if isinstance(r.data, Broken):
            raise UserError(f"{place(r.source, r.row, r.data.field)}: {r.data.reason}")
    return records


def read_source(spec: str, split: str) -> list[Record]:
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


def _parsed(text: str) -> dict | Broken:
    """One JSON object from its text, or why not (raw: the text, so a rejects file keeps the row as written)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Broken(f"not valid JSON ({e.msg} at column {e.colno})", text.rstrip("\r\n"))
    except RecursionError:  # the parser recurses per level: '[' * 200000 runs out of stack
        return Broken(f"nested more than {MAX_DEPTH} levels deep", text.rstrip("\r\n"), syntax=False)
    if not isinstance(obj, dict):
        return Broken(f"expected a JSON object, got {type_name(obj)}", text.rstrip("\r\n"))
    problem = unusable(obj)
    return obj if problem is None else Broken(problem[1], text.rstrip("\r\n"), problem[0], syntax=False)


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
            data = Broken(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})", text)
        else:
            line = None  # one copy fewer of a huge row while it is parsed (json.loads takes the newline)
            data = _parsed(text)
        if not records and isinstance(data, Broken) and data.syntax:
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
        raise UserError(f"{source}: expected a list of objects or {{\"data\": [...]}}, got {type_name(obj)}")
    return [Record(_json_item(item), source, i) for i, item in enumerate(obj, start=1)]


def _json_item(item) -> dict | Broken:
    if not isinstance(item, dict):
        return Broken(f"expected a JSON object, got {type_name(item)}", json.dumps(item, default=str))
    problem = unusable(item)
    if problem is None:
        return item
    try:
        raw = json_text(item)
    except RecursionError:
        raw = "(not written: too deep)"
    return Broken(problem[1], raw, problem[0], syntax=False)


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
            data = Broken("more cells than the header has columns", json.dumps(row, default=str))
        elif any(v is None for v in row.values()):
            data = Broken("fewer cells than the header has columns", json.dumps(row, default=str))
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
