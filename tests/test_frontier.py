"""`prefalign experiment frontier`: DPO, PPO and GRPO points of reward vs KL from one SFT start.

The quick run checks the plumbing through the CLI (every method's points, finite numbers, the
PNG, the table); the frontier's reading (dominance, KL vs coefficient) is checked on hand-made
points. The full run's story is in docs/compare.md.
"""

from __future__ import annotations

import json
import math

import pytest

from prefalign import cli
from prefalign.experiments import frontier, rlhf


def _rows(points: dict) -> list[dict]:
    return [{"method": m, "coef": c, "KL (sampled)": k, "score (greedy)": s}
            for m, pts in points.items() for c, k, s in pts]


def test_dominance_and_kl_trend_on_hand_made_points():
    assert frontier.dominated((1.0, 0.5), [(0.5, 0.6)])
    assert frontier.dominated((1.0, 0.5), [(1.0, 0.6)])
    assert not frontier.dominated((1.0, 0.5), [(1.0, 0.5)])     # itself: not strictly better
    assert not frontier.dominated((1.0, 0.5), [(0.5, 0.4), (2.0, 0.9)])
    rows = _rows({"DPO": [(0.1, 1.0, 0.9), (1.0, 0.2, 0.8)],
                  "PPO": [(0.01, 1.5, 0.85), (0.1, 0.5, 0.7)],
                  "GRPO": [(0.01, 0.4, 0.95), (0.3, 0.6, 0.9)]})
    assert frontier.kl_trend(rows, "DPO") == "falls"
    assert frontier.kl_trend(rows, "GRPO") == "does not fall"
    v = frontier.verdict(rows)
    assert v.startswith("Matches the claim") and "DPO dominates 2 of 2 PPO points" in v
    rows = _rows({"DPO": [(0.1, 1.0, 0.5)], "PPO": [(0.1, 0.5, 0.9)], "GRPO": [(0.1, 0.5, 0.9)]})
    assert frontier.verdict(rows).startswith("Does NOT match")


@pytest.mark.slow
def test_quick_frontier_through_the_cli(tmp_path, capsys):
    out = tmp_path / "frontier"
    assert cli.main(["experiment", "frontier", "--quick", "--output", str(out), "--ppo-reward", "verifier"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    png = out / "plots" / "frontier.png"
    assert png.is_file() and png.stat().st_size > 5000
    rows = summary["rows"]
    budget = frontier.Budget.quick()
    assert [r["method"] for r in rows] == ["SFT"] + ["DPO"] * len(budget.dpo_betas) + ["PPO"] * len(budget.ppo_kl) \
        + ["GRPO"] * len(budget.grpo_kl)
    for r in rows:
        assert math.isfinite(r["KL (sampled)"]) and 0.0 <= r["score (greedy)"] <= 1.0, r
        assert r["KL (sampled)"] > -0.05, r  # a Monte-Carlo KL: near 0 at worst
    assert rows[0]["KL (sampled)"] == pytest.approx(0.0, abs=1e-5)  # the SFT model against itself
    report = (out / "report.md").read_text()
    assert "| PPO kl_coef=0.01 |" in report and "| GRPO kl_coef=0.3 |" in report and "| DPO beta=1.0 |" in report
    assert "DPO dominates" in summary["verdict"] and summary["ppo_reward"] == "verifier"
    # The quick runs are too short to move KL monotonically; the verdict states the measured relation
    # per method (the full run's: KL falls as beta / kl_coef grows for all three, docs/compare.md).
    assert all(f"{m} {trend}" in summary["verdict"] for m, trend in
               ((m, frontier.kl_trend(rows[1:], m)) for m in frontier.METHODS))


@pytest.mark.slow
@pytest.mark.skipif(not rlhf.reward_model_available(), reason="needs `prefalign reward` (reward-model training)")
def test_quick_frontier_with_a_reward_model(tmp_path):
    out = tmp_path / "frontier"
    assert cli.main(["experiment", "frontier", "--quick", "--output", str(out), "--ppo-reward", "rm"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppo_reward"] == "rm" and 0.0 <= summary["rm_accuracy"] <= 1.0
    assert (out / "rm" / "model" / "config.json").is_file()
    assert all(math.isfinite(r["KL (sampled)"]) for r in summary["rows"])


def test_reward_model_scores_an_empty_generated_completion(tmp_path):
    """A policy that stops at once generates "" then EOS: the rm:PATH reward scores prompt + EOS
    (compare's PPO row died on such a row before: the data layer refuses empty completions)."""
    from prefalign import reward_model
    from prefalign.demo.model import build_model
    from prefalign.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rm = reward_model.from_causal_lm(build_model(tok, seed=0, hidden_size=32, intermediate_size=64),
                                     tok.pad_token_id, 0)
    reward_model.save(rm, tok, str(tmp_path / "rm"), {"chat": False, "max_length": 16, "max_prompt_length": 8})
    scorer = reward_model.load_scorer(str(tmp_path / "rm"))
    with_answer = scorer.tokenize(["1+2="], ["3"])[0]               # prompt + "3" + EOS
    assert scorer.tokenize(["1+2="], [""]) == [with_answer[:-2] + [tok.eos_token_id]]
    scores = scorer(["1+2=", "1+2="], ["", "3"])
    assert all(math.isfinite(v) for v in scores) and scores[0] != scores[1]
