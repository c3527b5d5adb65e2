"""prefalign.data.tokenize: exact prompt/completion boundary, BOS/EOS, chat templates, truncation."""

import json

import pytest

from prefalign.data.formats import PairExample, PromptExample, UnpairedExample
from prefalign.data.tokenize import TokenizedPair, TokenizedPrompt, TokenizedUnpaired, tokenize_examples
from prefalign.errors import UserError
from tiny import BOS_ID, EOS_ID, IM_END_ID, make_tokenizer

PROMPT = "Question: What is the capital of France? Answer:"


def pair(prompt=PROMPT, chosen=" Paris.", rejected=" Lyon, a city in the south.", row=1):
    return PairExample(prompt, chosen, rejected, "d.jsonl", row)


def plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one(examples, tok, max_length=128, **kw):
    result = tokenize_examples(examples if isinstance(examples, list) else [examples], tok, max_length, **kw)
    return result.items[0], result.stats


@pytest.mark.parametrize("add_bos,add_eos", [(False, False), (True, False), (False, True)])
def test_text_boundary_bos_and_eos(add_bos, add_eos):
    tok = make_tokenizer(add_bos=add_bos, add_eos=add_eos)
    ex = pair()
    item, stats = one(ex, tok)
    assert isinstance(item, TokenizedPair) and (item.source, item.row, item.truncated) == ("d.jsonl", 1, False)
    lead = [BOS_ID] if add_bos else []
    # The completion is what follows the prompt in the tokenization of the whole text, plus one EOS.
    assert item.prompt_ids + item.chosen_ids == lead + plain(tok, ex.prompt + ex.chosen) + [EOS_ID]
    assert item.prompt_ids + item.rejected_ids == lead + plain(tok, ex.prompt + ex.rejected) + [EOS_ID]
    assert item.prompt_ids == lead + plain(tok, ex.prompt)  # no EOS from an add_eos post-processor
    for ids in (item.chosen_ids, item.rejected_ids):
        assert ids.count(EOS_ID) == 1 and BOS_ID not in ids
    assert stats == dict(rows=1, kept=1, skipped=0, truncated=0, boundary_mismatch=0, eos_appended=2,
                         bos_deduplicated=0, special_text=0)


def test_special_token_strings_in_text_are_text():
    """Data text is text: a '<bos>' or '<eos>' typed in a prompt or completion is tokenized as those
    characters (not the special ids), so BOS is never doubled nor EOS taken from the data; counted."""
    tok = make_tokenizer(add_bos=True)
    item, stats = one(pair(prompt="<bos>" + PROMPT, chosen=" Paris.<eos>"), tok)
    split = tok("<bos>" + PROMPT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert item.prompt_ids == [BOS_ID] + split and item.prompt_ids.count(BOS_ID) == 1
    assert item.chosen_ids.count(EOS_ID) == 1 and item.chosen_ids[-1] == EOS_ID
    assert stats["bos_deduplicated"] == 0 and stats["eos_appended"] == 2 and stats["special_text"] == 1


def test_boundary_mismatch_is_an_error_naming_the_row():
    tok = make_tokenizer()
    # A prompt ending in a space: byte-level BPE wants the space inside the next word's token.
    ex = pair(prompt=PROMPT + " ", chosen="the answer is Paris.", rejected="Lyon.", row=7)
    assert plain(tok, ex.prompt + ex.chosen)[:len(plain(tok, ex.prompt))] != plain(tok, ex.prompt)
    with pytest.raises(UserError, match=r"d\.jsonl, row 7, field 'chosen': the tokenized prompt is not a prefix"):
        tokenize_examples([ex], tok, 128)
    # Allowed: the pieces are tokenized separately, and the row is counted.
    item, stats = one(ex, tok, allow_boundary_mismatch=True)
    assert item.prompt_ids == plain(tok, ex.prompt)
    assert item.chosen_ids == plain(tok, "the answer is Paris.") + [EOS_ID]
    assert stats["boundary_mismatch"] == 1


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.mark.parametrize("add_bos", [False, True])
def test_chat_template_boundary(add_bos):
    tok = make_tokenizer(chat_template=True, add_bos=add_bos)
    reply = [{"role": "assistant", "content": "4"}]
    ex = PairExample(CONVERSATION, reply, [{"role": "assistant", "content": "The answer is 5"}], "c.jsonl", 2)
    item, stats = one(ex, tok)
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert item.prompt_ids == plain(tok, rendered)
    assert item.prompt_ids.count(BOS_ID) == int(add_bos)  # the template's own BOS, once
    whole = tok.apply_chat_template(CONVERSATION + reply, tokenize=False)
    assert item.prompt_ids + item.chosen_ids == plain(tok, whole)
    # The template ends the turn with <|im_end|> (the EOS) and a newline: no EOS added.
    assert tok.decode(item.chosen_ids) == "4<|im_end|>\n" and item.chosen_ids.count(IM_END_ID) == 1
    assert stats["eos_appended"] == 0 and stats["bos_deduplicated"] == 0


def test_chat_without_template_is_a_user_error():
    ex = PairExample(CONVERSATION, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}])
    with pytest.raises(UserError, match="no chat template"):
        tokenize_examples([ex], make_tokenizer(), 64)


def test_template_that_raises_is_a_bad_row():
    tok = make_tokenizer(chat_template=True)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    ex = PairExample(CONVERSATION, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}],
                     "c.jsonl", 3)
    with pytest.raises(UserError, match=r"c\.jsonl, row 3, field 'prompt': the chat template failed.*alternate"):
        tokenize_examples([ex], tok, 64)


def test_unpaired_and_prompt_items():
    tok = make_tokenizer(add_bos=True)
    examples = [UnpairedExample(PROMPT, " Paris.", True, "u.jsonl", 1),
                PromptExample(PROMPT, "p.jsonl", 4, {"answer": "Paris"})]
    result = tokenize_examples(examples, tok, 128)
    unpaired, prompt = result.items
    assert isinstance(unpaired, TokenizedUnpaired) and unpaired.label is True
    assert unpaired.prompt_ids + unpaired.completion_ids == [BOS_ID] + plain(tok, PROMPT + " Paris.") + [EOS_ID]
    assert isinstance(prompt, TokenizedPrompt) and prompt.extra == {"answer": "Paris"} and prompt.row == 4
    assert prompt.prompt_ids == [BOS_ID] + plain(tok, PROMPT)
    assert result.stats["eos_appended"] == 1


def test_truncation_policy():
    tok = make_tokenizer(add_bos=True)
    ex = pair()
    full, _ = one(ex, tok)
    n_prompt = len(full.prompt_ids)
    # Completions are cut from the right to fit max_length; the cut one loses its EOS.
    max_length = n_prompt + len(full.chosen_ids) + 1
    assert len(full.rejected_ids) > max_length - n_prompt
    item, stats = one(ex, tok, max_length=max_length)
    assert item.truncated and stats["truncated"] == 1
    assert item.chosen_ids == full.chosen_ids  # it fitted
    assert item.rejected_ids == full.rejected_ids[: max_length - n_prompt] and item.rejected_ids[-1] != EOS_ID
    # The prompt is cut from the left to max_prompt_length, keeping its BOS and its end.
    item, stats = one(ex, tok, max_length=max_length, max_prompt_length=5)
    assert item.prompt_ids == [BOS_ID] + full.prompt_ids[-4:]
    assert item.rejected_ids == full.rejected_ids  # now there is room for all of it
    assert len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids)) <= max_length


def test_prompt_too_long_is_a_bad_row(tmp_path):
    tok = make_tokenizer()
    examples = [pair(row=1), pair(prompt=PROMPT * 5, row=2), pair(row=3)]
    with pytest.raises(UserError, match=r"d\.jsonl, row 2, field 'prompt': the prompt is \d+ tokens.*max_length=40"):
        tokenize_examples(examples, tok, 40)
    rejects = tmp_path / "rejects.jsonl"
    result = tokenize_examples(examples, tok, 40, on_bad_row="skip", rejects_path=str(rejects))
    assert [i.row for i in result.items] == [1, 3]
    assert result.stats["skipped"] == 1 and result.stats["kept"] == 2 and result.stats["rows"] == 3
    (line,) = rejects.read_text().splitlines()
    reject = json.loads(line)
    assert reject["row"] == 2 and "no room for the completion" in reject["reason"]
    assert reject["data"]["prompt"] == PROMPT * 5


def test_bad_arguments():
    tok = make_tokenizer()
    with pytest.raises(UserError, match="max_prompt_length"):
        tokenize_examples([pair()], tok, 16, max_prompt_length=16)
    with pytest.raises(UserError, match="did you mean 'skip'"):
        tokenize_examples([pair()], tok, 16, on_bad_row="skipped")
    tok.eos_token = None
    with pytest.raises(UserError, match="no EOS token"):
        tokenize_examples([pair()], tok, 16)
