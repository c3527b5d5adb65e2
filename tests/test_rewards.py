"""prefalign.online.rewards: loading by import path, checks, verifiers, reward model, LM judge, combination."""

import math
import sys
import textwrap

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prefalign.errors import UserError
from prefalign.online.reward_models import PairwiseJudge, RewardModel
from prefalign.online.rewards import (
    Reward, combine, exact_answer, extract_answer, format_reward, load_reward, regex_reward,
)

PROMPTS = ["2+2=", "3*3=", "what is 10/2?"]
COMPLETIONS = ["4", "the answer is 9", "#### 5"]


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# --- loading by import path -------------------------------------------------------------------


def test_file_path_function_is_called_with_documented_arguments(tmp_path):
    path = write(tmp_path, "my_reward.py", """
        CALLS = []
        def score(prompts, completions, answer, **extra):
            CALLS.append((prompts, completions, answer, extra))
            return [float(len(c)) for c in completions]
    """)
    r = load_reward(f"{path}:score")
    out = r(PROMPTS, COMPLETIONS, answer=["4", "9", "5"], source=["a", "b", "c"])
    assert out == [1.0, 15.0, 6.0]
    # The file's module is private (not in sys.modules by its name): reach its state through the function.
    (prompts, completions, answer, extra), = r.fn.__globals__["CALLS"]
    assert prompts == PROMPTS and completions == COMPLETIONS and answer == ["4", "9", "5"]
    assert extra == {"source": ["a", "b", "c"]}


def test_module_function_and_only_named_columns(tmp_path, monkeypatch):
    write(tmp_path, "pa_reward_mod.py", """
        def by_len(prompts, completions):   # takes no extra columns: gets none
            return [len(c) for c in completions]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_reward("pa_reward_mod:by_len", weight=0.5)
    assert r(PROMPTS, COMPLETIONS, answer=["x"] * 3) == [1.0, 15.0, 6.0] and r.weight == 0.5


def test_file_path_imports_only_that_file(tmp_path, monkeypatch):
    """A module of the same name on sys.path must not be picked instead of the file named."""
    (tmp_path / "other").mkdir()
    write(tmp_path / "other", "shadow.py", "def f(prompts, completions): return [0.0] * len(completions)\n")
    path = write(tmp_path, "shadow.py", "def f(prompts, completions): return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    assert load_reward(f"{path}:f")(["p"], ["c"]) == [1.0]
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize("spec, match", [
    ("nowhere/missing.py:f", "file not found"),
    ("pa_no_such_module_xyz:f", "no module named"),
    ("math:no_such_fn", "has no 'no_such_fn'"),
    ("math:pi", "not a function"),
    ("justaname", "expected 'module:function'"),
    ("regex=(", "bad regular expression"),
])
def test_bad_specs_are_user_errors(spec, match):
    with pytest.raises(UserError, match=match):
        load_reward(spec)


def test_import_error_in_file_is_a_user_error(tmp_path):
    path = write(tmp_path, "broken.py", "import pa_not_installed_pkg\n")
    with pytest.raises(UserError, match="importing .*broken.py failed: ModuleNotFoundError"):
        load_reward(f"{path}:f")


# --- checks on what a reward function returns -------------------------------------------------


@pytest.mark.parametrize("fn, match", [
    (lambda p, c: [1.0] * (len(c) - 1), r"returned 2 values for 3 completions"),
    (lambda p, c: [1.0, float("nan"), 0.0], r"returned nan \(row 2, completion 'the answer is 9'\)"),
    (lambda p, c: [1.0, 0.0, float("inf")], r"returned inf \(row 3"),
    (lambda p, c: [1.0, "high", 0.0], r"returned a non-number 'high' \(row 2"),
    (lambda p, c: [1.0, None, 0.0], r"returned a non-number None \(row 2"),
    (lambda p, c: 1.0, r"must return a list of 3 numbers, got float"),
])
def test_bad_outputs_name_function_and_row(fn, match):
    r = Reward("my_fn", fn)
    with pytest.raises(UserError, match="reward function my_fn " + match):
        r(PROMPTS, COMPLETIONS)


def test_raising_function_names_the_failing_row():
    def picky(prompts, completions):
        return [1.0 / (len(c) - 6) for c in completions]  # "#### 5" (row 3) has length 6
    with pytest.raises(UserError, match=r"picky raised ZeroDivisionError: .*\(data.jsonl row 9, completion '#### 5'\)"):
        Reward("picky", picky).score(PROMPTS, COMPLETIONS, rows=["data.jsonl row 7", "data.jsonl row 8", "data.jsonl row 9"])
    with pytest.raises(UserError, match="each row alone passed"):
        Reward("batchy", lambda p, c: [0.0] * len(c) if len(c) == 1 else 1 / 0)(PROMPTS, COMPLETIONS)


def test_missing_column_and_numeric_types():
    with pytest.raises(UserError, match="needs the column 'answer', which the rows lack"):
        Reward("exact_answer", exact_answer)(PROMPTS, COMPLETIONS)
    np = pytest.importorskip("numpy")
    assert Reward("t", lambda p, c: torch.tensor([1, 2, 3]))(PROMPTS, COMPLETIONS) == [1.0, 2.0, 3.0]
    assert Reward("n", lambda p, c: np.array([0.5, 1, 2]))(PROMPTS, COMPLETIONS) == [0.5, 1.0, 2.0]
    assert Reward("b", lambda p, c: [True, False, np.float32(2)])(PROMPTS, COMPLETIONS) == [1.0, 0.0, 2.0]


# --- built-in verifiers -----------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("so <answer> 42 </answer>", "42"),
    ("thus \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("steps...\n#### 1,000", "1,000"),
    ("The answer is 7.", "7."),
    ("Answer: Paris", "Paris"),
    ("3 apples and 5 pears", "5"),
    ("no digits here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_exact_answer_verifier():
    comps = ["the answer is 4.", "<answer>9</answer>", "#### 1,000", "I think 6", "answer: paris", "\\boxed{2.50}"]
    gold = ["4", 9, "1000", "5", "Paris", "2.5"]
    assert exact_answer([""] * 6, comps, gold) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert load_reward("exact_answer")([""] * 6, comps, answer=gold) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_regex_and_format_verifiers():
    comps = ["<think>a\nb</think> <answer>4</answer>", "<answer>4</answer>", "  <think>x</think><answer>y</answer>\n"]
    assert format_reward()([""] * 3, comps) == [1.0, 0.0, 1.0]
    assert load_reward("format")([""] * 3, comps) == [1.0, 0.0, 1.0]
    assert load_reward(r"format=<answer>\d+</answer>")([""] * 3, comps) == [0.0, 1.0, 0.0]
    assert regex_reward(r"\d")([""] * 3, comps) == [1.0, 1.0, 0.0]
    assert load_reward(r"regex=think>x")([""] * 3, comps) == [0.0, 0.0, 1.0]


def test_weighted_combination():
    comb = combine(["exact_answer", "format", lambda p, c: [len(x) for x in c]], weights=[1.0, 0.5, 0.1])
    comps = ["<think>.</think><answer>4</answer>", "5"]
    scores = comb.score(["", ""], comps, {"answer": ["4", "4"]})
    assert scores.components == {"exact_answer": [1.0, 0.0], "format": [1.0, 0.0], "<lambda>": [34.0, 1.0]}
    assert scores.total == pytest.approx([1.0 + 0.5 + 3.4, 0.1])
    assert comb(["", ""], comps, answer=["4", "4"]) == scores.total
    dup = combine(["format", "format"])
    assert [r.name for r in dup.rewards] == ["format", "format#2"]
    with pytest.raises(UserError, match="2 reward weights for 1"):
        combine(["format"], weights=[1, 2])


# --- tiny tokenizer and models ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE; 'A' and 'B' (and ' A', ' B') are single tokens."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["Response A or Response B? Answer: A B the cat 2+2=4"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")


def llama_config(tok, **kw):
    return tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                          pad_token_id=tok.pad_token_id, **kw)


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_scores_match_single_rows(tok, num_labels):
    torch.manual_seed(0)
    model = tf.LlamaForSequenceClassification(llama_config(tok, num_labels=num_labels)).eval()
    rm = RewardModel(model, tok, batch_size=2)  # ragged lengths, several batches, sorted by length
    prompts, comps = PROMPTS + ["a"], COMPLETIONS + ["much longer completion than the others here"]
    got = rm(prompts, comps)
    for p, c, g in zip(prompts, comps, got):
        with torch.no_grad():
            logits = model(torch.tensor([tok(p + c)["input_ids"]])).logits[0]
        want = logits[0] if num_labels == 1 else logits[1] - logits[0]
        assert g == pytest.approx(want.item(), abs=1e-5)
    assert len(set(got)) == 4
    assert Reward("rm", rm)(prompts, comps) == got  # usable as a reward function as is


def test_reward_model_needs_label_index_for_many_labels(tok):
    model = tf.LlamaForSequenceClassification(llama_config(tok, num_labels=3))
    with pytest.raises(UserError, match="label_index"):
        RewardModel(model, tok)
    assert len(RewardModel(model, tok, label_index=2)(["a"], ["b"])) == 1


@pytest.fixture(scope="module")
def judge(tok):
    torch.manual_seed(1)
    model = tf.LlamaForCausalLM(llama_config(tok)).eval()
    return PairwiseJudge(model, tok, batch_size=3)


def test_judge_reads_a_vs_b_logprobs_in_both_orders(judge, tok):
    a_id, b_id = judge.label_ids
    assert tok.decode([a_id]) == " A" and tok.decode([b_id]) == " B"
    prompts, first, second = ["2+2=", "the cat"], ["4", "sat"], ["5", "sat on the mat"]
    v = judge.compare(prompts, first, second)
    for i in range(2):  # naive: one unpadded forward per order
        probs = []
        for x, y in ((first[i], second[i]), (second[i], first[i])):
            ids = tok(judge.rubric.format(prompt=prompts[i], a=x, b=y))["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(judge.model(torch.tensor([ids])).logits[0, -1], -1)
            probs.append(math.exp(lp[a_id]) / (math.exp(lp[a_id]) + math.exp(lp[b_id])))
        assert v.prob_ab[i] == pytest.approx(probs[0], abs=1e-5)
        assert v.prob_ba[i] == pytest.approx(1 - probs[1], abs=1e-5)
        assert v.prob[i] == pytest.approx((probs[0] + 1 - probs[1]) / 2, abs=1e-5)


def test_judge_is_antisymmetric_and_ties_are_half(judge):
    p, x, y = ["q1", "q2"], ["alpha", "the cat"], ["beta beta", "2+2=4"]
    fwd, bwd = judge.compare(p, x, y).prob, judge.compare(p, y, x).prob
    assert [a + b for a, b in zip(fwd, bwd)] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert judge.compare(["q"], ["same"], ["same"]).prob == pytest.approx([0.5], abs=1e-6)
    rates = judge.win_rates(["q"] * 3 + ["r"] * 3, ["a", "bb", "ccc", "x", "y", "z"], group_size=3)
    assert len(rates) == 6 and sum(rates[:3]) == pytest.approx(1.5) and sum(rates[3:]) == pytest.approx(1.5)
    r = Reward("judge", judge.as_reward("reference"))
    assert r(p, x, reference=y) == pytest.approx(fwd)
    with pytest.raises(UserError, match="column 'reference'"):
        r(p, x)
    with pytest.raises(UserError, match="placeholders"):
        PairwiseJudge(judge.model, judge.tokenizer, rubric="no slots")
