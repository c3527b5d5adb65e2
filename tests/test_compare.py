"""`prefalign compare` (reduced), and the online commands end to end through the CLI."""

import dataclasses
import json
import os
import shutil
import textwrap

import pytest
import torch

from prefalign.cli import main
from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.errors import UserError
from prefalign.demo.pipeline import DemoSettings, sft_cache_key
from prefalign.experiments.compare import CompareSettings, compare, prepare_sft, sft_dir
from prefalign.experiments.compare_settings import DEMO_FIELDS, USER_DEFAULTS

torch.set_num_threads(1)


def test_compare_smoke(tmp_path, capsys):
    # In-process (isolate=False) to stay in seconds; the real command runs each method in its own process.
    s = CompareSettings.quick_settings(output=str(tmp_path / "cmp"), isolate=False, grpo_steps=2, dpo_steps=2,
                                       sample_prompts=24, dpo_batch=2, heldout=8)  # enough pairs for a DPO step
    out = compare(s)
    methods = [r["method"] for r in out["rows"]]
    assert methods == ["SFT (start)", "offline DPO", "iterative DPO", "GRPO", "RLHF (RM + PPO)"]
    for row in out["rows"]:
        assert 0.0 <= row["score"] <= 1.0 and row["peak MB"] >= row["base MB"] > 0
    sft = out["rows"][0]
    assert sft["KL"] == pytest.approx(0.0, abs=1e-5)  # the SFT model against itself
    # Models resident at the first training step, counted: DPO policy + reference; GRPO policy + reference
    # (its reward is a function); PPO policy + reference + value model (+ the reward model with --ppo-reward rm).
    rm = s.ppo_reward == "rm"
    assert [r["models"] for r in out["rows"]] == ["-", "2", "2", "2", "4" if rm else "3"]
    ppo = out["rows"][-1]
    assert ppo["gen batches"] == s.ppo_steps and (ppo["RM s"] > 0) == rm and ppo["gen s"] > 0 and ppo["train s"] > 0
    assert out["rows"][1]["gen batches"] == 1 and out["rows"][2]["gen batches"] == s.rounds
    assert [r["method"] for r in out["chapter"]] == ["offline DPO", "RLHF (RM + PPO)", "GRPO"]
    report = open(tmp_path / "cmp" / "report.md").read()
    assert "| method | models | score |" in report and "GRPO" in report and "The chapter's table" in report
    results = json.load(open(tmp_path / "cmp" / "results.json"))
    assert {r["method"] for r in results["runs"]} == {"sft", "dpo", "iterative", "grpo", "ppo"}
    assert os.path.isfile(tmp_path / "cmp" / "seed-0" / "dpo" / "round-1" / "pairs.jsonl")
    assert os.path.isfile(tmp_path / "cmp" / "plots" / "loss.png")
    out_text = capsys.readouterr().out
    assert "GRPO" in out_text and "wall: SFT model" in out_text  # the table and the wall split are printed
    assert results["sft"] == ["trained"] and results["settings"]["beta"] == DemoSettings.quick().beta

    # Same settings -> the cached SFT model, never retrained (also from another output via --sft-from).
    again = compare(dataclasses.replace(s, methods=["dpo"], seeds=2, same_start=True))
    assert [r["seed"] for r in again["runs"]] == [0, 0, 1, 1]  # seed 1 starts from seed 0's SFT model
    assert again["runs"][2]["score"] == again["runs"][0]["score"]
    assert json.load(open(tmp_path / "cmp" / "results.json"))["sft"] == ["cached"]
    assert again["rows"][0]["score"] == out["rows"][0]["score"]  # the same SFT model
    other = dataclasses.replace(s, output=str(tmp_path / "other"), sft_from=str(tmp_path / "cmp"))
    assert prepare_sft(other, 0)[1] == "--sft-from" and not os.path.exists(tmp_path / "other" / "seed-0" / "sft")
    assert sft_dir(other, 0) == str(tmp_path / "cmp" / "seed-0" / "sft")
    demo_out = tmp_path / "demo_out"  # a `prefalign demo --output DIR` layout: DIR/sft
    shutil.copytree(tmp_path / "cmp" / "seed-0" / "sft", demo_out / "sft")
    assert sft_dir(dataclasses.replace(other, sft_from=str(demo_out)), 0) == str(demo_out / "sft")
    with pytest.raises(UserError, match="no SFT model for seed 1"):
        prepare_sft(dataclasses.replace(other, seeds=2), 1)
    with pytest.raises(UserError, match="other settings.*sft_steps"):  # a model trained otherwise is refused
        sft_dir(dataclasses.replace(other, sft_from=str(_stale(tmp_path))), 0)


def _stale(tmp_path):
    """A demo output whose SFT model was trained with other settings (its stamp says so)."""
    d = tmp_path / "stale" / "sft"
    (d / "model").mkdir(parents=True)
    key = sft_cache_key(DemoSettings.quick(0))
    (d / "demo_settings.json").write_text(json.dumps({**key, "sft_steps": key["sft_steps"] + 1}))
    return tmp_path / "stale"


def test_compare_defaults_come_from_demo_settings():
    # One source of truth: unset numbers are DemoSettings' on the demo task; flags override them.
    r = CompareSettings().resolved()
    d = DemoSettings()
    assert (r.dpo_lr, r.beta, r.sample_prompts, r.pairs_per_prompt, r.samples, r.dpo_steps, r.dpo_batch,
            r.heldout, r.threads) == (d.dpo_lr, d.beta, d.dpo_prompts, d.pairs_per_prompt, d.samples, d.dpo_steps,
                                      d.dpo_batch, d.n_heldout, d.threads)
    assert CompareSettings(beta=0.2).resolved().beta == 0.2
    user = CompareSettings(model="m", prompts="p", reward=["exact_answer"]).resolved()
    assert user.dpo_lr == USER_DEFAULTS["dpo_lr"] and user.max_new_tokens == 64
    assert all(getattr(CompareSettings(), f) is None for f in DEMO_FIELDS)


def test_every_compare_flag_has_help():
    import argparse

    from prefalign.experiments.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compare"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help" and not a.dest.startswith("alias__")]
    assert len(flags) == len(dataclasses.fields(CompareSettings))  # + the hidden old names (CompareSettings.ALIASES)
    for a in flags:
        assert a.default is None and len(a.help.split("(default")[0].strip()) > 5, a.option_strings
    help_text = sub.format_help()
    assert "(DemoSettings)" in help_text and "5e-05" in help_text  # the demo's dpo lr, read from DemoSettings


def test_compare_settings_errors():
    with pytest.raises(UserError, match="methods"):
        CompareSettings(methods=["rlhf"]).validate()
    with pytest.raises(UserError, match="offline DPO's pairs: add dpo"):
        CompareSettings(methods=["grpo", "ppo"]).validate()
    with pytest.raises(UserError, match="--reward"):
        CompareSettings(model="m", prompts="p.jsonl").validate()


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tok = build_tokenizer()
    build_model(tok, seed=0, hidden_size=32, intermediate_size=64).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    with open(path, "w") as fh:
        for a in range(4):
            fh.write(json.dumps({"prompt": f"{a}+{a}=", "answer": 2 * a}) + "\n")
    return str(path)


BAD = {
    "raises": "def f(prompts, completions):\n    raise RuntimeError('boom')\n",
    "wrong_length": "def f(prompts, completions):\n    return [1.0]\n",
    "nan": "def f(prompts, completions):\n    return [float('nan')] * len(completions)\n",
}


@pytest.mark.parametrize("kind, message", [("raises", "raised RuntimeError: boom"),
                                           ("wrong_length", "returned 1 values for"),
                                           ("nan", "returned nan")])
def test_bad_reward_function_is_one_clear_line_and_exit_2(tmp_path, capsys, saved_model, prompts_file, kind, message):
    fn = tmp_path / f"{kind}.py"
    fn.write_text(BAD[kind])
    rc = main(["grpo", "--model", saved_model, "--prompts", prompts_file, "--reward", f"{fn}:f",
               "--output", str(tmp_path / "run"), "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
               "--max-new-tokens", "2", "--no-progress"])
    # (transformers' own "Loading weights" progress bar may share stderr; ours is one line)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefalign")]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("prefalign: error: reward function") and message in err[0], err


def test_generate_command_writes_completions(tmp_path, capsys, saved_model, prompts_file):
    out = tmp_path / "gen.jsonl"
    rc = main(["generate", "--model", saved_model, "--prompts", prompts_file, "--output", str(out), "--n", "3",
               "--max-new-tokens", "3", "--reward", "exact_answer"])
    assert rc == 0
    rows = [json.loads(x) for x in open(out)]
    assert len(rows) == 12 and [r["sample"] for r in rows[:3]] == [0, 1, 2]
    assert {"prompt", "completion", "finish_reason", "num_tokens", "reward", "answer"} <= set(rows[0])


def test_grpo_and_iterate_commands_run(tmp_path, capsys, saved_model, prompts_file):
    common = ["--model", saved_model, "--prompts", prompts_file, "--max-new-tokens", "2", "--no-progress",
              "--no-save-model"]
    assert main(["grpo", *common, "--reward", "regex=1", "--output", str(tmp_path / "g"), "--steps", "2",
                 "--prompts-per-step", "2", "--group-size", "2", "--beta", "0.1"]) == 0
    assert main(["iterate", *common, "--reward", "regex=1", "--output", str(tmp_path / "i"), "--rounds", "1",
                 "--prompts-per-round", "4", "--samples", "4", "--batch-size", "1", "--dpo-steps", "1",
                 "--set", "warmup_steps=0"]) == 0
    assert "done:" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "i" / "round-1" / "pairs.jsonl")
    bad = textwrap.dedent("steps: 1\nstepz: 2\n")
    (tmp_path / "c.yaml").write_text(bad)
    assert main(["grpo", "--config", str(tmp_path / "c.yaml"), *common, "--output", str(tmp_path / "g2")]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
