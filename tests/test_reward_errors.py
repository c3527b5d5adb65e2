"""GRPO reward values that cannot train: every one ends `prefalign grpo` with exit 2 and one line
naming the reward function and the prompt (row), before any update, never "done" with exit 0.

Rewards become float32 tensors, so 1e39 (a finite Python float) would be inf there; a weighted
sum of in-range rewards can overflow too; a reward function calling sys.exit must not end the
run with status 0 and no output."""

import json
import os

import pytest

from prefalign.cli import main
from test_compare import prompts_file, saved_model  # noqa: F401 (fixtures)


# Each function misbehaves only for the prompt "2+2=" (the 3rd row), so the message must find it.
FUNCTIONS = """
import sys
def overflow(prompts, completions):
    return [1e39 if p == "2+2=" else 0.5 for p in prompts]
def nan(prompts, completions):
    return [float("nan") if p == "2+2=" else 0.5 for p in prompts]
def neg_inf(prompts, completions):
    return [float("-inf") if p == "2+2=" else 0.5 for p in prompts]
def exits(prompts, completions):
    if "2+2=" in prompts:
        sys.exit(0)
    return [0.5] * len(prompts)
def big(prompts, completions):
    return [3e38] * len(prompts)
"""


def run_grpo(saved_model, prompts_file, out, rewards, *extra):
    # 4 prompts per step: the one step sees every prompt, the 3rd included.
    return main(["grpo", "--model", saved_model, "--prompts", prompts_file, "--reward", *rewards,
                 "--output", str(out), "--steps", "1", "--prompts-per-step", "4", "--group-size", "2",
                 "--max-new-tokens", "2", "--no-progress", *extra])


@pytest.mark.parametrize("fn, message", [
    ("overflow", "returned 1e+39, beyond the float32 range"),
    ("nan", "returned nan"),
    ("neg_inf", "returned -inf"),
    ("exits", "called sys.exit(0)"),
])
def test_bad_reward_value_is_one_line_naming_function_and_prompt(saved_model, prompts_file, tmp_path, capsys,
                                                                 fn, message):
    f = tmp_path / "rewards.py"
    f.write_text(FUNCTIONS)
    out = tmp_path / "run"
    rc = run_grpo(saved_model, prompts_file, out, [f"{f}:{fn}"])
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("prefalign")]
    assert rc == 2, captured.err[-2000:]
    assert "done:" not in captured.out and "Traceback" not in captured.err
    assert len(err) == 1, err
    assert err[0].startswith(f"prefalign: error: reward function {f}:{fn} ") and message in err[0], err[0]
    assert "prompt 3, sample 1" in err[0], err[0]  # the row: prompt index in the file, sample in its group
    assert not os.path.exists(out / "model") and not os.path.exists(out / "metrics.jsonl")  # no step was made


def test_weighted_sum_beyond_float32_names_the_terms(saved_model, prompts_file, tmp_path, capsys):
    """3e38 is a float32, 3e38 + 3e38 is not: the error shows the weighted terms and the row."""
    f = tmp_path / "rewards.py"
    f.write_text(FUNCTIONS)
    rc = run_grpo(saved_model, prompts_file, tmp_path / "run", [f"{f}:big", f"{f}:big"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefalign")]
    assert rc == 2 and len(err) == 1, err
    assert "the weighted reward 1 * 3e+38" in err[0] and f"({f}:big#2)" in err[0]
    assert "not a finite float32" in err[0] and "prompt 1, sample 1" in err[0]


def test_module_level_sys_exit_is_an_error(saved_model, prompts_file, tmp_path, capsys):
    f = tmp_path / "quits.py"
    f.write_text("import sys\nsys.exit(3)\ndef r(prompts, completions):\n    return [0.0] * len(prompts)\n")
    rc = run_grpo(saved_model, prompts_file, tmp_path / "run", [f"{f}:r"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefalign")]
    assert rc == 2 and len(err) == 1 and f"importing {f} failed: SystemExit: 3" in err[0], err


def test_in_range_rewards_still_train(saved_model, prompts_file, tmp_path, capsys):
    """The control: the same command with finite float32 rewards makes its update and says done."""
    f = tmp_path / "rewards.py"
    f.write_text(FUNCTIONS + "def fine(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    rc = run_grpo(saved_model, prompts_file, tmp_path / "run", [f"{f}:fine"], "--no-save-model")
    assert rc == 0 and "done: 1 steps" in capsys.readouterr().out
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["step"] == 1 and row["grad_norm"] == row["grad_norm"]  # a real (finite) update
