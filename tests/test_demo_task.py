"""The embedded demo's building blocks: the task and its verifier, the tokenizer, the tiny model."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.demo import task
from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import ALPHABET, build_tokenizer

# --------------------------------------------------------------------------- verifier


@pytest.mark.parametrize(
    "completion, answer, score",
    [
        ("19", 19, 1.0),
        (" 19 ", 19, 1.0),  # surrounding spaces are tolerated
        ("19\n", 19, 1.0),
        ("18", 19, 0.0),  # off by one
        ("91", 19, 0.0),  # digits swapped
        ("019", 19, 0.0),  # leading zero: a format error, even though int("019") == 19
        ("0", 0, 1.0),
        ("00", 0, 0.0),
        ("", 19, 0.0),
        ("19+", 19, 0.0),
        ("1 9", 19, 0.0),
        ("19=19", 19, 0.0),
        ("198", 198, 1.0),
    ],
)
def test_verify_hand_cases(completion, answer, score):
    assert task.verify(completion, answer) == score


def test_format_check():
    assert task.format_ok("42") and task.format_ok(" 7") and task.format_ok("-3")
    for bad in ["", "4 2", "42=", "+42", "x", "007", "--1"]:
        assert not task.format_ok(bad), bad
    assert task.parse_answer(" 42 ") == 42 and task.parse_answer("4x") is None


def test_reward_reads_answer_from_prompt():
    assert task.answer_of_prompt("12+7=") == 19
    assert task.reward(["12+7=", "17+25=", "17+25="], ["19", "42", "32"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        task.answer_of_prompt("what is 2+2?")
    with pytest.raises(ValueError):
        task.verify_batch(["1"], [1, 2])


# --------------------------------------------------------------------------- problems and splits


def test_problem_formatting_and_carry():
    p = task.Problem(17, 25)
    assert p.prompt == "17+25=" and p.answer == 42 and p.carries
    assert task.forgot_carry(p) == 32
    q = task.Problem(12, 7)
    assert not q.carries and task.forgot_carry(q) == 19
    assert task.format_completion(42) == "42"


def test_splits_are_disjoint_and_cover_everything():
    s = task.make_splits(seed=0, n_heldout=500)
    assert len(s.heldout) == 500 and len(s.train) == 10_000 - 500
    train_prompts = {p.prompt for p in s.train}
    assert not train_prompts & {p.prompt for p in s.heldout}
    assert len(train_prompts | {p.prompt for p in s.heldout}) == 10_000


def test_splits_are_deterministic_and_depend_on_seed():
    a, b, c = task.make_splits(0), task.make_splits(0), task.make_splits(1)
    assert a.heldout == b.heldout and a.train == b.train
    assert a.heldout != c.heldout
    assert task.sample_problems(a.train, 50, seed=3) == task.sample_problems(b.train, 50, seed=3)
    assert task.sample_problems(a.train, 50, seed=3) != task.sample_problems(a.train, 50, seed=4)


def test_make_splits_rejects_bad_sizes():
    with pytest.raises(ValueError):
        task.make_splits(0, n_heldout=0)
    with pytest.raises(ValueError):
        task.make_splits(0, n_heldout=10_000)


# --------------------------------------------------------------------------- noisy demonstrations


def test_noisy_demonstrations_are_deterministic():
    problems = task.make_splits(0).train[:300]
    assert task.noisy_demonstrations(problems, seed=5) == task.noisy_demonstrations(problems, seed=5)
    assert task.noisy_demonstrations(problems, seed=5) != task.noisy_demonstrations(problems, seed=6)


def test_noise_fraction_and_kinds():
    problems = task.make_splits(0).train  # 9,500 problems: the fraction is tight
    demos = task.noisy_demonstrations(problems, seed=0, carry_slip=0.6, random_noise=0.1)
    wrong = sum(not d.correct for d in demos) / len(demos)
    expected = task.expected_noise(problems, carry_slip=0.6, random_noise=0.1)
    assert abs(wrong - expected) < 0.02, (wrong, expected)
    for d, p in zip(demos, problems):
        assert d.prompt == p.prompt and d.answer == p.answer
        # the verifier agrees with the label, and every demonstration is well formed
        assert task.verify(d.completion, d.answer) == (1.0 if d.correct else 0.0)
        assert task.format_ok(d.completion)
        if d.kind == "forgot_carry":
            assert p.carries and d.completion == str(p.answer - 10)
        if d.kind == "off_by_one":
            assert abs(int(d.completion) - p.answer) == 1
        if d.kind == "digit_swap":
            assert sorted(d.completion) == sorted(str(p.answer)) or abs(int(d.completion) - p.answer) == 1
    # On carry problems the slip is the teacher's most common answer: that is what SFT copies.
    carry = [d for d, p in zip(demos, problems) if p.carries]
    slips = sum(d.kind == "forgot_carry" for d in carry) / len(carry)
    right = sum(d.correct for d in carry) / len(carry)
    assert slips > right
    assert set(d.kind for d in demos) == {"correct", *task.NOISE_KINDS}


def test_noise_knobs_at_the_extremes():
    problems = task.make_splits(0).train[:500]
    clean = task.noisy_demonstrations(problems, seed=0, carry_slip=0.0, random_noise=0.0)
    assert all(d.correct for d in clean)
    sloppy = task.noisy_demonstrations(problems, seed=0, carry_slip=1.0, random_noise=0.0)
    assert all((d.kind == "forgot_carry") == p.carries for d, p in zip(sloppy, problems))
    with pytest.raises(ValueError):
        task.noisy_demonstrations(problems, carry_slip=1.5)


def test_wrong_answers_always_differ():
    rng = random.Random(0)
    for p in task.all_problems()[::7]:
        for kind in ("off_by_one", "digit_swap"):
            assert task.wrong_answer(p, kind, rng) != p.answer
    with pytest.raises(ValueError):
        task.wrong_answer(task.Problem(1, 2), "forgot_carry", rng)
    with pytest.raises(ValueError):
        task.wrong_answer(task.Problem(1, 2), "nonsense", rng)


def test_sft_ceiling():
    s = task.make_splits(0)
    ceiling = task.best_possible_imitation(s.heldout, carry_slip=0.6)
    assert 0.45 < ceiling < 0.65  # about 55% of problems do not carry
    assert task.best_possible_imitation(s.heldout, carry_slip=0.4) == 1.0


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_boundary():
    tok = build_tokenizer()
    text = "17+25=42"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    # The prompt/completion boundary is exact: prompt ids + completion ids == ids of the whole.
    assert tok("17+25=").input_ids + tok("42", add_special_tokens=False).input_ids == ids
    for ch in ALPHABET:
        assert tok.decode(tok(ch, add_special_tokens=False).input_ids) == ch
    assert tok("x", add_special_tokens=False).input_ids == [tok.unk_token_id]
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_tokenizer_is_deterministic_and_saves(tmp_path):
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    a.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == a.get_vocab()
    assert loaded("12+7=19").input_ids == a("12+7=19").input_ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (a.bos_token, a.eos_token, a.pad_token)
    assert loaded.padding_side == "left"


# --------------------------------------------------------------------------- model


def test_model_is_seeded_and_reloads(tmp_path):
    tok = build_tokenizer()
    state = torch.random.get_rng_state()
    m1, m2 = build_model(tok, seed=0), build_model(tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n1
    m3 = build_model(tok, seed=1)
    assert not torch.equal(m1.model.embed_tokens.weight, m3.model.embed_tokens.weight)
    assert m1.config.vocab_size == len(tok)

    m1.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tok(["17+25="], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(m1(ids).logits, loaded(ids).logits, atol=1e-6)


def test_model_generates_with_the_tokenizer():
    tok = build_tokenizer()
    model = build_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    enc = tok(["1+2=", "17+25="], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= enc.input_ids.shape[1] + 4
