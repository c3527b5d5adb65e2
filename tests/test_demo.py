"""`prefalign demo --quick`: the whole story (SFT -> on-policy pairs -> DPO -> held-out table) end to end."""

import json

from prefalign.cli import main


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] >= 8 and summary["heldout_problems"] == 20
    for side in ("before", "after"):
        assert 0 <= summary[side]["verifier score (greedy)"] <= 1
    assert summary["before"]["KL to reference (sampled)"] == 0  # the SFT model against itself
    assert 0 <= summary["after"]["implicit-reward accuracy (held-out pairs)"] <= 1
    # every stage left its files: the data it made, both runs' metrics, the report and plots
    for f in ("data/sft.jsonl", "data/pairs.jsonl", "sft/metrics.jsonl", "dpo/metrics.jsonl", "dpo/model/config.json",
              "report.md", "plots/dpo_logps.png"):
        assert (out / f).exists(), f
    pairs = [json.loads(x) for x in (out / "data" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen_reward"] == 1.0 and p["rejected_reward"] == 0.0 for p in pairs)
    assert "after DPO" in capsys.readouterr().out
