"""TRL's SFT formats (`messages`, `text`) for `prefalign sft`, and KTO data for `prefalign eval`."""

import json
import re

import pytest

from prefalign import config, prepare
from prefalign.cli import main
from prefalign.errors import UserError
from tiny import make_model, make_tokenizer
from test_train import write_pairs


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _items(tmp_path, rows, tok):
    cfg = config.build({"loss": "sft", "reference": "none", "max_length": 512, "data": "x"})
    return prepare.load_items(cfg, tok, _jsonl(tmp_path / "d.jsonl", rows), "sft", None, log=lambda m: None)[0]


def test_messages_train_on_the_last_assistant_turn(tmp_path):
    tok = make_tokenizer(chat_template=True)
    conv = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "The answer is four."}]
    (item,) = _items(tmp_path, [{"messages": conv}], tok)
    prompt_text = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(item.prompt_ids) == prompt_text
    # the template's own ending of the turn, as for conversational pairs
    assert tok.decode(item.completion_ids) == "The answer is four.<|im_end|>\n"
    assert tok.decode(item.prompt_ids + item.completion_ids) == tok.apply_chat_template(conv, tokenize=False)


def test_text_rows_are_all_completion(tmp_path):
    tok = make_tokenizer()
    (item,) = _items(tmp_path, [{"text": "The quick brown fox jumps."}], tok)
    assert item.prompt_ids == []
    assert tok.decode(item.completion_ids) == "The quick brown fox jumps.<eos>"
    (item,) = _items(tmp_path, [{"text": "The quick brown fox jumps."}], make_tokenizer(add_bos=True))
    assert item.prompt_ids == [1]  # a BOS tokenizer: the prompt is its BOS, so every text token is scored


@pytest.mark.parametrize("row, where", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages[0].role'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "field 'messages'"),
    ({"messages": "hi"}, "field 'messages'"),
    ({"text": ""}, "field 'text'"),
    ({"text": 3}, "field 'text'"),
])
def test_bad_sft_rows_name_the_row_and_field(tmp_path, row, where):
    with pytest.raises(UserError, match=re.escape(f"row 1, {where}")):
        _items(tmp_path, [row], make_tokenizer(chat_template=True))


def test_sft_command_trains_on_messages(tmp_path, capsys):
    model_dir = tmp_path / "chat"
    tok = make_tokenizer(chat_template=True)
    # room for the ids the reloaded chat tokenizer has beyond len(tok)
    make_model("qwen2", seed=0, vocab_size=len(tok) + 8).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(8)]
    assert main(["sft", "--model", str(model_dir), "--data", _jsonl(tmp_path / "m.jsonl", rows), "--output",
                 str(tmp_path / "run"), "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_eval_takes_kto_data(tmp_path):
    model_dir = tmp_path / "model"
    make_model("llama", seed=0).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    pairs = [json.loads(line) for line in open(write_pairs(tmp_path / "p.jsonl", 6))]
    kto = _jsonl(tmp_path / "kto.jsonl", [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                                          for p in pairs for side in ("chosen", "rejected")])
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", write_pairs(tmp_path / "t.jsonl", 16), "--output",
                 str(out), "--max-steps", "3", "--lr", "1e-2", "--no-progress", "--max-length", "64"]) == 0

    def evaluate(model, data, name):
        assert main(["eval", "--model", model, "--ref-model", str(model_dir), "--data", data,
                     "--json", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name).read_text())

    same = evaluate(str(model_dir), kto, "same.json")
    # policy == reference: every reward is 0, so only the undesirable rows (reward not > 0) count as right
    assert same["examples"] == 12 and same["rewards/accuracies"] == pytest.approx(0.5)
    assert same["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    k, d = evaluate(str(out / "model"), kto, "kto.json"), evaluate(str(out / "model"), str(tmp_path / "p.jsonl"), "d.json")
    # the same completions scored as pairs and as KTO rows: the same mean rewards
    assert k["rewards/chosen"] == pytest.approx(d["rewards/chosen"], abs=1e-4)
    assert k["rewards/rejected"] == pytest.approx(d["rewards/rejected"], abs=1e-4)
    assert k["rewards/chosen"] != pytest.approx(0, abs=1e-4) and 0 <= k["rewards/accuracies"] <= 1
