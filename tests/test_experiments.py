"""Smoke tests: every `prefalign experiment NAME --quick` runs through the CLI and writes its report.

The quick runs share one SFT start (the cache folder next to their outputs), so the whole file
pays for one tiny SFT. The stories need the full runs (docs/experiments.md); here we check the
plumbing: report.md, summary.json, the figures, and the table's rows.
"""

from __future__ import annotations

import json
import os

import pytest

from prefalign import cli
from prefalign.experiments.cli import EXPERIMENTS

EXPECTED_RUNS = {
    "beta-sweep": ["SFT (reference)", "DPO beta=0.01", "DPO beta=0.03", "DPO beta=0.1", "DPO beta=0.3", "DPO beta=1.0"],
    "ipo-vs-dpo": ["SFT (reference)", "DPO", "IPO"],
    "kto-unpaired": ["SFT (reference)", "DPO (pairs)", "KTO balanced", "KTO 1:4, weights 1/1",
                     "KTO 1:4, desirable_weight 4"],
    "length-bias": ["SFT (reference)", "DPO, clean pairs", "DPO, biased (chosen longer)",
                    "DPO, balanced (both padded)", "SimPO (per-token means), biased", "IPO ipo_average_logps, biased"],
    "lora-memory": ["full fine-tuning, copy reference", "full fine-tuning, precomputed reference",
                    "LoRA r=8, adapters-off reference", "LoRA r=8, precomputed reference"],
    "dpo-vs-sft": ["SFT start (reference)", "SFT on chosen only", "DPO (chosen + rejected)",
                   "DPO + SFT term (RPO, alpha 1)"],
    "frontier": ["SFT (start)", "DPO beta=0.1", "DPO beta=1.0", "PPO kl_coef=0.01", "PPO kl_coef=0.3",
                 "GRPO kl_coef=0.01", "GRPO kl_coef=0.3"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def _run(root, name, capsys):
    out = root / name
    rc = cli.main(["experiment", name, "--quick", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert summary["experiment"] == name and summary["quick"]
    assert summary["figures"], "no figure"
    for fig in summary["figures"]:
        path = out / fig
        assert path.is_file() and path.stat().st_size > 1000
        assert f"]({fig})" in report
    assert "| " in report and "Wall time" in report and f"prefalign experiment {name}" in report
    assert "report:" in printed
    return summary, report


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "both-drop"])
def test_experiment_quick(root, name, capsys):
    summary, report = _run(root, name, capsys)
    runs = [r["run"] for r in summary["rows"]]
    assert runs == EXPECTED_RUNS[name]
    for r in summary["rows"]:
        assert f"| {r['run']} |" in report


def test_both_drop_quick(root, capsys):
    summary, _ = _run(root, "both-drop", capsys)
    steps = [r["step"] for r in summary["rows"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3  # SFT + every checkpoint
    for r in summary["rows"]:
        for k in ("logp chosen", "logp rejected", "score (greedy)", "malformed", "run-on"):
            assert isinstance(r[k], float)


def test_lora_memory_only_adapters_change(root, capsys):
    if not (root / "lora-memory" / "summary.json").exists():
        _run(root, "lora-memory", capsys)
    raw = json.loads((root / "lora-memory" / "summary.json").read_text())["raw"]
    for name, m in raw.items():
        if name.startswith("LoRA"):
            assert m["changed_base"] == 0 and m["lora_B_trained"] > 0 and m["trainable"] < m["params"]
        else:
            assert m["changed_base"] == m["base_tensors"] and m["trainable"] == m["params"]


def test_unknown_experiment_is_a_user_error(capsys):
    assert cli.main(["experiment", "beta-sweeep"]) == 2
    assert "did you mean 'beta-sweep'" in capsys.readouterr().err


def test_list(capsys):
    assert cli.main(["experiment", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)


def test_every_experiment_module_is_small():
    here = os.path.dirname(os.path.abspath(__import__("prefalign.experiments", fromlist=["x"]).__file__))
    for f in os.listdir(here):
        if f.endswith(".py"):
            with open(os.path.join(here, f)) as fh:
                assert len(fh.readlines()) < 600, f
