"""Iterative DPO (prefalign.online.iterative) and pair building (prefalign.online.pairs)."""

import json
import textwrap

import pytest
import torch

from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.errors import UserError
from prefalign.online.iterative import IterativeConfig, iterate
from prefalign.online.pairs import build_pairs, read_pairs

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- pairs


def test_best_vs_worst_with_min_gap():
    comps = ["a", "b", "c", "d",     "e", "f", "g", "h"]
    rewards = [0.2, 0.9, 0.5, 0.1,   0.5, 0.6, 0.55, 0.5]
    rows = build_pairs(["p", "q"], comps, rewards, group_size=4, min_gap=0.3, extra={"answer": [1, 2]})
    # group p: best b (0.9) vs worst d (0.1); group q: gap 0.1 < 0.3, no pair
    assert rows == [{"prompt": "p", "chosen": "b", "rejected": "d", "chosen_reward": 0.9, "rejected_reward": 0.1,
                     "answer": 1}]


def test_more_pairs_per_prompt_reuse_no_completion_and_stop_at_the_gap():
    comps = ["a", "b", "c", "d", "e", "f"]
    rewards = [1.0, 0.0, 0.8, 0.2, 0.5, 0.5]
    rows = build_pairs(["p"], comps, rewards, group_size=6, min_gap=0.5, pairs_per_prompt=3)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a", "b"), ("c", "d")]  # e/f: gap 0


def test_duplicates_blanks_ties_and_per_sample_prompts():
    comps = ["x", "x", "", "y"]                        # "x" twice (counted once), a blank sample
    rows = build_pairs(["p"] * 4, comps, [1.0, 1.0, 0.0, 0.0], group_size=4)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("x", "y")]
    assert build_pairs(["p"], ["a", "b"], [1.0, 1.0], group_size=2) == []  # a tie is no preference
    with pytest.raises(ValueError):
        build_pairs(["p"], ["a", "b", "c"], [1, 0, 1], group_size=2)


# ---------------------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok):
    return build_model(tok, seed=0, hidden_size=32, intermediate_size=64)


PROMPTS = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(6) for b in range(6)]


def first_is_digit(prompts, completions):
    return [float(c[:1].isdigit()) for c in completions]


def small_cfg(tmp_path, **kw):
    base = dict(output=str(tmp_path / "run"), rounds=2, prompts_per_round=12, samples=4, max_new_tokens=3,
                lr=1e-3, dpo_steps=2, batch_size=2, progress=False, save_model=False)
    base.update(kw)
    return IterativeConfig(**base)


def test_each_round_writes_its_pairs_and_metrics(tok, tmp_path):
    res = iterate(small_cfg(tmp_path), model=tiny(tok), tokenizer=tok, prompts=PROMPTS, reward=first_is_digit)
    out = tmp_path / "run"
    for k in (1, 2):
        rows = read_pairs(out / f"round-{k}" / "pairs.jsonl")
        assert rows and all(r["chosen_reward"] - r["rejected_reward"] > 0 for r in rows)
        assert all(r["prompt"] in {p["prompt"] for p in PROMPTS} and "answer" in r for r in rows)
        assert (out / f"round-{k}" / "metrics.jsonl").is_file()  # the round's DPO run
        assert res.history[k - 1]["pairs"] == len(rows)
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["round"] for r in lines] == [1, 2]
    for key in ("reward/mean", "pairs", "time/generation", "time/training", "peak_memory_mb", "dpo/loss"):
        assert key in lines[0]
    assert "reward/after" in lines[-1]
    assert [r["step"] for r in res.train_history] == [1, 2, 3, 4]  # a global step across rounds


@pytest.mark.parametrize("reference", ["fixed", "moving"])
def test_reference_fixed_or_moved_to_the_last_rounds_policy(tok, tmp_path, monkeypatch, reference):
    import prefalign.train

    real_train, seen = prefalign.train.train, []

    def spy(cfg, model=None, tokenizer=None, ref_model=None):
        seen.append((ref_model, {k: v.clone() for k, v in model.state_dict().items()}))
        return real_train(cfg, model=model, tokenizer=tokenizer, ref_model=ref_model)

    monkeypatch.setattr(prefalign.train, "train", spy)
    start = tiny(tok)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    iterate(small_cfg(tmp_path, ref_update=reference), model=start, tokenizer=tok, prompts=PROMPTS,
            reward=first_is_digit)
    (ref1, pol1), (ref2, pol2) = seen
    for k, v in ref2.state_dict().items():
        want = initial[k] if reference == "fixed" else pol2[k]  # round 2 starts from round 1's policy
        torch.testing.assert_close(v, want)
    assert not torch.equal(pol2["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_reward_by_import_path_gets_the_documented_arguments(tok, tmp_path):
    path = tmp_path / "my_reward.py"
    log = tmp_path / "calls.jsonl"
    path.write_text(textwrap.dedent(f"""
        import json
        def score(prompts, completions, answer):
            with open({str(log)!r}, "a") as fh:
                fh.write(json.dumps({{"prompts": prompts, "completions": completions, "answer": answer}}) + "\\n")
            return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]
    """))
    cfg = small_cfg(tmp_path, rounds=1, reward=[f"{path}:score"])
    iterate(cfg, model=tiny(tok), tokenizer=tok, prompts=PROMPTS)
    call = json.loads(open(log).readline())
    n = 12 * 4
    assert len(call["prompts"]) == len(call["completions"]) == len(call["answer"]) == n
    # prompts and the answer column come one per sample, grouped by prompt
    by_prompt = {p["prompt"]: p["answer"] for p in PROMPTS}
    assert all(by_prompt[p] == a for p, a in zip(call["prompts"], call["answer"]))
    assert call["prompts"][0] == call["prompts"][3] and all(isinstance(c, str) for c in call["completions"])


def test_config_errors():
    with pytest.raises(UserError, match="ref_update"):
        IterativeConfig(ref_update="sometimes")
    with pytest.raises(UserError, match="samples"):
        IterativeConfig(samples=1)
    with pytest.raises(UserError, match="loss"):
        IterativeConfig(loss="nope")
