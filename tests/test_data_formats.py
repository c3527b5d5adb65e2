"""prefalign.data.formats: every source, every format, every bad input named by file, row and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefalign.data.formats import (
    PairExample, PromptExample, UnpairedExample, load_examples, pairs_to_unpaired, read_records,
    split_text_prefix,
)
from prefalign.errors import UserError

PAIR = {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"}
CHAT_PAIR = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}


def write(tmp_path, name, content):
    """content: bytes, str, or a list of rows (written as JSON Lines)."""
    path = tmp_path / name
    if isinstance(content, list):
        content = "\n".join(json.dumps(r) for r in content) + "\n"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def error_of(path, **kw):
    with pytest.raises(UserError) as e:
        load_examples(path, **kw)
    return str(e.value)


# ----------------------------------------------------------------------------- sources

def test_jsonl_rows_are_line_numbers(tmp_path):
    path = write(tmp_path, "d.jsonl", json.dumps(PAIR) + "\n\n" + json.dumps(PAIR) + "\n")
    records = read_records(path)
    assert [r.row for r in records] == [1, 3]  # the blank line still counts: row = line
    assert records[0].data == PAIR and records[0].source == path


def test_json_list_data_key_and_json_lines(tmp_path):
    for i, text in enumerate([json.dumps([PAIR, PAIR]), json.dumps({"data": [PAIR, PAIR]}),
                              json.dumps(PAIR) + "\n" + json.dumps(PAIR)]):
        result = load_examples(write(tmp_path, f"d{i}.json", text))
        assert len(result.examples) == 2 and result.kind == "paired"
        assert result.examples[1].row == 2


def test_parquet_with_conversations(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([CHAT_PAIR, CHAT_PAIR]), path)
    ex = load_examples(path).examples[0]
    assert ex.prompt == CHAT_PAIR["prompt"] and ex.chosen == CHAT_PAIR["chosen"]


def test_parquet_structs_lose_null_keys(tmp_path):
    # Parquet gives every message every struct key; absent ones come back as None and are dropped.
    rows = [dict(CHAT_PAIR, chosen=[{"role": "assistant", "content": "4", "name": "bot"}]), CHAT_PAIR]
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_examples(path).examples[1].chosen == [{"role": "assistant", "content": "4"}]


def test_csv_paired_and_unpaired_labels(tmp_path):
    result = load_examples(write(tmp_path, "p.csv", "prompt,chosen,rejected\nHi,\" a\",\" b\"\n"))
    assert result.examples[0] == PairExample("Hi", " a", " b", str(tmp_path / "p.csv"), 1)
    result = load_examples(write(tmp_path, "u.csv", "prompt,completion,label\nHi, a,true\nHi, b,FALSE\n"))
    assert result.kind == "unpaired" and [e.label for e in result.examples] == [True, False]


def test_saved_dataset_directory_and_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([PAIR, PAIR, PAIR])
    ds.save_to_disk(str(tmp_path / "one"))
    assert len(load_examples(str(tmp_path / "one")).examples) == 3
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "two"))
    assert len(load_examples(str(tmp_path / "two"), split="test").examples) == 1
    assert "no split 'dev'" in error_of(str(tmp_path / "two"), split="dev")
    (tmp_path / "empty_dir").mkdir()
    assert "not a dataset written by save_to_disk" in error_of(str(tmp_path / "empty_dir"))


# ----------------------------------------------------------------------------- formats

def test_paired_explicit_text_and_chat(tmp_path):
    result = load_examples(write(tmp_path, "d.jsonl", [PAIR]))
    assert result.examples[0].prompt == PAIR["prompt"] and result.skipped == 0
    ex = load_examples(write(tmp_path, "c.jsonl", [CHAT_PAIR])).examples[0]
    assert ex.chosen == [{"role": "assistant", "content": "4"}]


def test_implicit_text_prompt_cut_before_whitespace(tmp_path):
    row = {"chosen": "Human: hi\n\nAssistant: Sure thing", "rejected": "Human: hi\n\nAssistant: Sure, no"}
    ex = load_examples(write(tmp_path, "d.jsonl", [row])).examples[0]
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Human: hi\n\nAssistant:", " Sure thing", " Sure, no")
    assert ex.prompt + ex.chosen == row["chosen"]
    # One text is the start of the other: the cut is still before the last whitespace, so both keep a reply.
    assert split_text_prefix("A: 4", "A: 4 apples") == 2
    assert split_text_prefix("A:\n\n4", "A:\n\n5") == 2  # the whole whitespace run goes to the completion
    assert split_text_prefix("Paris", "Parsley") == 0


def test_implicit_chat_prompt(tmp_path):
    user = {"role": "user", "content": "2 + 2?"}
    row = {"chosen": [user, {"role": "assistant", "content": "4"}],
           "rejected": [user, {"role": "assistant", "content": "5"}]}
    ex = load_examples(write(tmp_path, "d.jsonl", [row])).examples[0]
    assert ex.prompt == [user] and ex.chosen == [{"role": "assistant", "content": "4"}]
    # UltraFeedback-binarized: a string prompt beside full conversations.
    ex = load_examples(write(tmp_path, "u.jsonl", [dict(row, prompt="2 + 2?")])).examples[0]
    assert ex.prompt == [user] and ex.rejected == [{"role": "assistant", "content": "5"}]
    # A conversational prompt repeated at the start of chosen and rejected is stripped.
    ex = load_examples(write(tmp_path, "r.jsonl", [dict(row, prompt=[user])])).examples[0]
    assert ex.prompt == [user] and ex.chosen == [{"role": "assistant", "content": "4"}]


def test_unpaired_and_prompt_only(tmp_path):
    rows = [{"prompt": "Q", "completion": " yes", "label": True}, {"prompt": "Q", "completion": " no", "label": False}]
    result = load_examples(write(tmp_path, "u.jsonl", rows))
    assert result.kind == "unpaired"
    assert result.examples[1] == UnpairedExample("Q", " no", False, str(tmp_path / "u.jsonl"), 2)
    result = load_examples(write(tmp_path, "p.jsonl", [{"prompt": "2 + 2?", "answer": "4"}]))
    assert result.kind == "prompt" and result.examples[0].extra == {"answer": "4"}
    # Forced kind=prompt reads the prompts of paired data; the rest is kept in extra.
    ex = load_examples(write(tmp_path, "d.jsonl", [PAIR]), kind="prompt").examples[0]
    assert isinstance(ex, PromptExample) and ex.extra == {"chosen": " 4", "rejected": " 5"}


def test_pairs_to_unpaired(tmp_path):
    pairs = load_examples(write(tmp_path, "d.jsonl", [PAIR, PAIR])).examples
    unpaired = pairs_to_unpaired(pairs)
    assert [(u.completion, u.label, u.row) for u in unpaired] == [(" 4", True, 1), (" 5", False, 1),
                                                                   (" 4", True, 2), (" 5", False, 2)]


# ----------------------------------------------------------------------------- bad files

BAD_FILES = [  # name, content, expected pieces of the message
    ("missing.jsonl", None, ["missing.jsonl", "not found"]),
    ("empty.jsonl", b"", ["empty.jsonl", "empty"]),
    ("blank.csv", b"\n  \n", ["blank.csv", "empty"]),
    ("text.parquet", b"prompt,chosen\nhello,world\n", ["text.parquet", "not a Parquet file"]),
    ("array.jsonl", b'[\n  {"prompt": "a"}\n]\n', ["array.jsonl", "row 1", "not a JSON Lines file", ".json file"]),
    ("binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\xff", ["binary.jsonl", "row 1", "not valid UTF-8"]),
    ("latin1.csv", "prompt,chosen,rejected\nhi,caf\xe9,b\n".encode("latin-1"), ["latin1.csv", "line 2", "UTF-8"]),
    ("bad.json", b'{"data": [1, 2', ["bad.json", "line 1", "not valid JSON"]),
    ("scalar.json", b'"hello"', ["scalar.json", "expected a list of objects"]),
    ("empty_list.json", b"[]", ["empty_list.json", "no rows"]),
    ("data.txt", b"hello", ["data.txt", "unknown file type"]),
]


@pytest.mark.parametrize("name,content,pieces", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files(tmp_path, name, content, pieces):
    path = str(tmp_path / name) if content is None else write(tmp_path, name, content)
    message = error_of(path, on_bad_row="skip")  # a broken file is never skippable
    for piece in pieces:
        assert piece in message, message


# ----------------------------------------------------------------------------- bad rows

def chat(role="assistant", content="ok"):
    return [{"role": role, "content": content}]


BAD_ROWS = [  # row 2 of a file whose row 1 is good; expected pieces of the message
    ("not_json", b'{"prompt": "a", "chosen": ', ["row 2", "not valid JSON"]),
    ("not_object", b"[1, 2]", ["row 2", "expected a JSON object"]),
    ("non_utf8", b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}', ["row 2", "not valid UTF-8"]),
    ("missing_rejected", {"prompt": "Q", "chosen": " a"}, ["row 2", "field 'rejected'", "missing field"]),
    ("misnamed_rejected", {"prompt": "Q", "chosen": " a", "rejcted": " b"}, ["field 'rejected'", "did you mean 'rejcted'"]),
    ("misnamed_chosen", {"prompt": "Q", "Chosen": " a", "rejected": " b"}, ["field 'chosen'", "did you mean 'Chosen'"]),
    ("prompt_alias", {"question": "Q", "chosen": " a", "rejected": " b"}, ["field 'prompt'", "found 'question'"]),
    ("no_fields", {"text": "hello"}, ["row 2", "no known fields", "text"]),
    ("int_chosen", {"prompt": "Q", "chosen": 4, "rejected": " b"}, ["field 'chosen'", "got a number"]),
    ("null_prompt", {"prompt": None, "chosen": " a", "rejected": " b"}, ["field 'prompt'", "null"]),
    ("empty_chosen", {"prompt": "Q", "chosen": "  ", "rejected": " b"}, ["field 'chosen'", "empty string"]),
    ("empty_prompt", {"prompt": "", "chosen": " a", "rejected": " b"}, ["field 'prompt'", "empty string"]),
    ("identical", {"prompt": "Q", "chosen": " a", "rejected": " a"}, ["field 'rejected'", "identical"]),
    ("no_common_prefix", {"chosen": "Paris", "rejected": "Parsley"}, ["field 'prompt'", "share no prefix"]),
    ("mixed_kinds", {"prompt": "Q", "completion": " a", "label": True}, ["row 2", "mixed formats", "row 1 is paired"]),
]
CHAT_ROWS = [  # row 2 of a conversational file
    ("bad_role", {"prompt": chat("human", "Q"), "chosen": chat(), "rejected": chat(content="no")},
     ["field 'prompt[0].role'", "unknown role 'human'", "did you mean 'user'"]),
    ("no_role", {"prompt": [{"content": "Q"}], "chosen": chat(), "rejected": chat(content="no")}, ["prompt[0].role"]),
    ("sharegpt", {"prompt": [{"from": "human", "value": "Q"}], "chosen": chat(), "rejected": chat(content="no")},
     ["prompt[0]", "ShareGPT"]),
    ("list_content", {"prompt": chat("user", ["Q"]), "chosen": chat(), "rejected": chat(content="no")},
     ["prompt[0].content", "expected a string"]),
    ("empty_content", {"prompt": chat("user", ""), "chosen": chat(), "rejected": chat(content="no")},
     ["prompt[0].content", "empty string"]),
    ("empty_messages", {"prompt": [], "chosen": chat(), "rejected": chat(content="no")}, ["'prompt'", "empty message list"]),
    ("text_chosen", {"prompt": chat("user", "Q"), "chosen": " a", "rejected": " b"}, ["field 'chosen'", "conversation"]),
    ("mixed_styles", {"prompt": "Q", "chosen": " a", "rejected": " b"}, ["mixed formats", "paired chat", "paired text"]),
    ("style_mismatch", {"prompt": chat("user", "Q"), "chosen": chat(), "rejected": "no"}, ["field 'rejected'", "both must"]),
    ("no_shared_messages", {"chosen": chat("user", "a") + chat(), "rejected": chat("user", "b") + chat()},
     ["share no leading messages"]),
    ("user_differs", {"chosen": chat("system", "s") + chat("user", "a") + chat(),
                      "rejected": chat("system", "s") + chat("user", "b") + chat()}, ["not an assistant reply"]),
    ("prefix_only", {"chosen": chat("user", "a") + chat(), "rejected": chat("user", "a")}, ["has no reply"]),
]


def check_bad_row(tmp_path, good, bad, pieces, kind="auto"):
    bad_line = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
    path = write(tmp_path, "d.jsonl", json.dumps(good).encode() + b"\n" + bad_line + b"\n")
    message = error_of(path, kind=kind)
    for piece in [path, "row 2"] + pieces:
        assert piece in message, message
    # The same file under on_bad_row="skip": row 1 kept, row 2 counted and written with its reason.
    rejects = tmp_path / "rejects.jsonl"
    rejects.unlink(missing_ok=True)  # the writer appends
    result = load_examples(path, kind=kind, on_bad_row="skip", rejects_path=str(rejects))
    assert len(result.examples) == 1 and result.skipped == 1
    (line,) = rejects.read_text().splitlines()
    reject = json.loads(line)
    assert reject["row"] == 2 and reject["source"] == path and reject["reason"] == message and reject["data"]


@pytest.mark.parametrize("name,bad,pieces", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_rows(tmp_path, name, bad, pieces):
    check_bad_row(tmp_path, PAIR, bad, pieces)


@pytest.mark.parametrize("name,bad,pieces", CHAT_ROWS, ids=[b[0] for b in CHAT_ROWS])
def test_bad_chat_rows(tmp_path, name, bad, pieces):
    check_bad_row(tmp_path, CHAT_PAIR, bad, pieces)


@pytest.mark.parametrize("label", ["yes", 1, 1.0, 0, "true", None])
def test_kto_labels_must_be_booleans(tmp_path, label):
    good = {"prompt": "Q", "completion": " a", "label": True}
    pieces = ["field 'label'"] + (["null"] if label is None else ["expected true or false", repr(label)])
    check_bad_row(tmp_path, good, dict(good, label=label), pieces)


def test_forced_kind_mismatch(tmp_path):
    check_bad_row(tmp_path, {"prompt": "Q", "completion": " a", "label": True}, PAIR,
                  ["this row is paired", "kind=unpaired", "pairs_to_unpaired"], kind="unpaired")
    check_bad_row(tmp_path, PAIR, {"prompt": "Q", "answer": "4"}, ["missing field 'chosen'"], kind="paired")


def test_csv_ragged_rows(tmp_path):
    path = write(tmp_path, "d.csv", "prompt,chosen,rejected\nQ, a, b\nQ, a, b, c\nQ, a\n")
    assert "row 2: more cells than the header" in error_of(path)
    result = load_examples(path, on_bad_row="skip")
    assert result.skipped == 2 and len(result.examples) == 1


def test_every_row_bad_is_an_error(tmp_path):
    path = write(tmp_path, "d.jsonl", [dict(PAIR, chosen=" 5"), dict(PAIR, prompt="")])
    message = error_of(path, on_bad_row="skip", rejects_path=str(tmp_path / "r.jsonl"))
    assert "all 2 rows were bad" in message and "r.jsonl" in message
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_bad_options(tmp_path):
    path = write(tmp_path, "d.jsonl", [PAIR])
    assert "did you mean 'paired'" in error_of(path, kind="pairs")
    assert "did you mean 'skip'" in error_of(path, on_bad_row="skipp")


def test_sft_rows_need_no_label(tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "5", "label": False}]
    path = write(tmp_path, "sft.jsonl", "\n".join(json.dumps(r) for r in rows))
    res = load_examples(path, kind="sft")
    assert res.kind == "sft" and [e.label for e in res.examples] == [True, False]
    with pytest.raises(UserError, match="label"):
        load_examples(path, kind="unpaired")  # KTO still insists on explicit labels


def test_sft_kind_reads_pairs_as_pairs(tmp_path):
    path = write(tmp_path, "p.jsonl", json.dumps({"prompt": "q", "chosen": " a", "rejected": " b"}))
    res = load_examples(path, kind="sft")
    assert res.kind == "paired" and res.examples[0].chosen == " a"
