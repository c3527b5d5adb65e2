"""Broken inputs through the CLI, end to end: each gives exit 2 and ONE clear line naming the
problem and its place (file, row, field, flag), no traceback, and leaves earlier outputs intact.

Every data and model case runs with `--overwrite` into a copy of an earlier, finished run: a
run that fails while loading its inputs must not have destroyed the run it was to replace.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from prefalign.cli import main
from test_train import run_files, write_pairs  # noqa: F401 (run_files: fixture)
from tiny import make_tokenizer

GOOD = {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"}


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def pairs(n=4):
    return [dict(GOOD) for _ in range(n)]


# name -> (file contents or None, extra argv, substrings the one-line message must hold).
# {data} / {tmp} in the argv and the expected text are filled in per test.
DATA_CASES = {
    "empty file": ("", [], ["{data}", "empty"]),
    "only blank lines": ("\n\n   \n", [], ["{data}", "empty"]),
    "invalid JSON on row 3": (jsonl(GOOD, GOOD, '{"prompt": "x", '), [], ["{data}", "3", "JSON"]),
    "row without rejected": (jsonl(GOOD, {"prompt": "p", "chosen": " c"}), [], ["{data}", "row 2", "rejected"]),
    "mixed paired and unpaired rows": (jsonl(GOOD, {"prompt": "p", "completion": " c", "label": True}), [],
                                       ["{data}", "row 2"]),
    "chosen is a number": (jsonl(GOOD, {**GOOD, "chosen": 4}), [], ["{data}", "row 2", "chosen"]),
    "prompt is null": (jsonl({**GOOD, "prompt": None}, GOOD), [], ["{data}", "row 1", "prompt"]),
    "row is a list": (jsonl(GOOD, "[1, 2]"), [], ["{data}", "2"]),
    "non-UTF-8 bytes": (jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n', [],
                        ["{data}", "row 2", "not valid UTF-8"]),
    "max_prompt_length not below max_length": (jsonl(*pairs(4)), ["--max-prompt-length", "64"],
                                               ["max_prompt_length=64", "max_length-1 (63)"]),
    "chosen equals rejected": (jsonl(GOOD, {**GOOD, "rejected": GOOD["chosen"]}), [], ["{data}", "row 2"]),
    "every row bad under --on-bad-row skip": (jsonl({"prompt": "p"}, {"prompt": "q"}), ["--on-bad-row", "skip"],
                                              ["{data}", "all 2 rows"]),
    "fewer rows than one step": (jsonl(*pairs(2)), ["--batch-size", "4"], ["{data}", "2 usable rows"]),
    "KTO label is a string": (jsonl(*[{"prompt": "p", "completion": " c", "label": "maybe"}] * 4), ["--loss", "kto"],
                              ["{data}", "row 1", "label"]),
    "KTO label is a number": (jsonl(*[{"prompt": "p", "completion": " c", "label": 2}] * 4), ["--loss", "kto"],
                              ["{data}", "row 1", "label"]),
    "KTO label is null": (jsonl(*[{"prompt": "p", "completion": " c", "label": None}] * 4), ["--loss", "kto"],
                          ["{data}", "row 1", "label"]),
    "chat message with an unknown role": (
        jsonl({"chosen": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}],
               "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y"}]}),
        [], ["{data}", "row 1", "robot"]),
    "chat message without content": (
        jsonl({"prompt": [{"role": "user"}], "chosen": " a", "rejected": " b"}), [], ["{data}", "row 1", "content"]),
    "JSON object that is not a list": ('{"rows": []}', ["--data", "{tmp}/data.json"], ["{tmp}/data.json"]),
    "unknown file type": ("a,b\n", ["--data", "{tmp}/data.txt"], ["{tmp}/data.txt", "unknown file type"]),
    "CSV without the needed columns": ("question,answer\nq,a\n", ["--data", "{tmp}/data.csv"], ["{tmp}/data.csv"]),
    "data file missing": (None, ["--data", "{tmp}/nope.jsonl"], ["{tmp}/nope.jsonl", "not found"]),
    "broken eval data": (jsonl(*pairs(8)), ["--eval-data", "{tmp}/eval.jsonl"], ["{tmp}/eval.jsonl"]),
}


def digest_tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def earlier_run(run_files, tmp_path_factory):
    """A finished run (model, metrics, checkpoint): what a failing --overwrite run must not destroy."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
                 "--max-steps", "1", "--save-every", "1", "--max-length", "64", "--no-progress"]) == 0
    return out


def run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (unknown flag, bad choice) exit 2 with usage
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def check_one_clear_line(rc, err, expect):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("prefalign: error:")]
    assert len(lines) == 1, err
    for s in expect:
        assert s in lines[0], f"{s!r} not in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(case, run_files, earlier_run, tmp_path, capsys):
    contents, extra, expect = DATA_CASES[case]
    data = str(tmp_path / "data.jsonl")
    if case == "broken eval data":
        open(tmp_path / "eval.jsonl", "w").write(jsonl(GOOD, "{oops"))
    fill = lambda s: s.replace("{data}", data).replace("{tmp}", str(tmp_path))  # noqa: E731
    extra = [fill(x) for x in extra]
    if "--data" in extra:
        data = extra[extra.index("--data") + 1]
    if contents is not None:
        with open(data, "wb") as fh:
            fh.write(contents if isinstance(contents, bytes) else contents.encode())
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    before = digest_tree(out)
    argv = ["train", "--model", run_files["model"], "--data", data, "--output", str(out), "--overwrite",
            "--max-steps", "1", "--max-length", "64", "--no-progress", *extra]
    rc, err = run_cli(argv, capsys)
    check_one_clear_line(rc, err, [fill(s) for s in expect])
    after = digest_tree(out)
    assert {k: v for k, v in after.items() if k in before} == before, "the earlier run was touched"


def _noeos_tokenizer(tmp):
    tok = make_tokenizer()
    tok.eos_token = None
    path = os.path.join(tmp, "noeos")
    tok.save_pretrained(path)
    return path


# Config, flag, model and output problems: name -> (argv after the common ones, expected substrings).
def other_cases(run_files, tmp):
    yaml_of = lambda name, text: (open(os.path.join(tmp, name), "w").write(text), os.path.join(tmp, name))[1]  # noqa: E731
    return {
        "unknown loss name": (["--loss", "dpoo"], ["dpoo", "did you mean", "dpo"]),
        "beta zero": (["--beta", "0"], ["beta must be > 0"]),
        "beta negative": (["--beta", "-1"], ["beta must be > 0"]),
        "beta not a number": (["--beta", "strong"], ["beta must be float", "strong"]),
        "label_smoothing 0.5": (["--label-smoothing", "0.5"], ["label_smoothing", "[0, 0.5)"]),
        "label_smoothing negative": (["--label-smoothing", "-0.1"], ["label_smoothing"]),
        "lr zero": (["--lr", "0"], ["lr must be in (0, 1)"]),
        "lr too large": (["--lr", "3"], ["lr must be in (0, 1)"]),
        "batch size zero": (["--batch-size", "0"], ["batch_size must be >= 1"]),
        "max_steps not an integer": (["--max-steps", "2.5"], ["max_steps must be int"]),
        "num-processes zero": (["--num-processes", "0"], ["--num-processes must be >= 1"]),
        "adapters-off reference without LoRA": (["--reference", "adapters-off"], ["adapters-off needs LoRA"]),
        "reference for a reference-free loss": (["--loss", "orpo", "--reference", "copy"], ["orpo uses no reference"]),
        "unknown flag": (["--betta", "0.1"], ["unrecognized arguments: --betta"]),
        "bad choice for lr_schedule": (["--lr-schedule", "step"], ["--lr-schedule", "invalid choice"]),
        "unknown config key": (["--config", yaml_of("a.yaml", "max_step: 3\n")],
                               ["a.yaml", "unknown config key 'max_step'", "did you mean 'max_steps'"]),
        "config value of the wrong type": (["--config", yaml_of("b.yaml", "beta: [1, 2]\n")], ["b.yaml", "beta"]),
        "config file is a list": (["--config", yaml_of("c.yaml", "- beta\n")], ["c.yaml", "mapping"]),
        "config file is not YAML": (["--config", yaml_of("d.yaml", "beta: [\n")], ["d.yaml", "not valid YAML"]),
        "config file missing": (["--config", os.path.join(tmp, "none.yaml")], ["config file not found"]),
        "missing model path": (["--model", os.path.join(tmp, "no-model")], ["model path not found", "no-model"]),
        "model dir without config.json": (["--model", tmp], ["not a model directory", "config.json"]),
        "tokenizer without EOS": (["--tokenizer", _noeos_tokenizer(tmp)], ["no EOS token"]),
        "output is a file": (["--output", yaml_of("file.txt", "x")], ["exists and is not a directory"]),
        "resume from a missing checkpoint": (["--resume", os.path.join(tmp, "ck")], ["cannot resume", "not found"]),
    }


OTHER_NAMES = ["unknown loss name", "beta zero", "beta negative", "beta not a number", "label_smoothing 0.5",
               "label_smoothing negative", "lr zero", "lr too large", "batch size zero", "max_steps not an integer",
               "num-processes zero", "adapters-off reference without LoRA", "reference for a reference-free loss",
               "unknown flag", "bad choice for lr_schedule", "unknown config key", "config value of the wrong type",
               "config file is a list", "config file is not YAML", "config file missing", "missing model path",
               "model dir without config.json", "tokenizer without EOS", "output is a file",
               "resume from a missing checkpoint"]


@pytest.mark.parametrize("case", OTHER_NAMES)
def test_bad_config_model_output(case, run_files, tmp_path, capsys):
    extra, expect = other_cases(run_files, str(tmp_path))[case]
    argv = ["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(tmp_path / "out"),
            "--max-steps", "1", "--max-length", "64", "--no-progress", *extra]
    rc, err = run_cli(argv, capsys)
    if case.startswith(("unknown flag", "bad choice")):  # argparse: a usage line, then one error line
        assert rc == 2 and "Traceback" not in err and all(s in err for s in expect), err
        return
    check_one_clear_line(rc, err, expect)
    assert not (tmp_path / "out" / "config.yaml").exists(), "a failed start must not look like a run"


def test_output_holding_another_run_is_never_clobbered(run_files, earlier_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    before = digest_tree(out)
    rc, err = run_cli(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
                       "--max-steps", "1", "--no-progress"], capsys)
    check_one_clear_line(rc, err, [str(out), "already holds a run", "--overwrite"])
    assert digest_tree(out) == before


def test_overwrite_replaces_the_old_runs_checkpoints(run_files, earlier_run, tmp_path, capsys):
    """--overwrite must also drop the old run's checkpoints, or --resume auto would continue the OLD run."""
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    assert os.listdir(out / "checkpoints") == ["step-000001"]
    assert main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
                 "--overwrite", "--max-steps", "2", "--max-length", "64", "--no-progress"]) == 0
    assert os.listdir(out / "checkpoints") == ["step-000002"]  # only the new run's final checkpoint


def test_huge_rows_and_long_prompts_are_truncated_and_counted(run_files, tmp_path, capsys):
    """Not errors: a 2 MB completion and a prompt longer than max_length are cut to fit (the
    prompt from the left, keeping its end), counted, and reported; the run goes on."""
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl(*pairs(4), {**GOOD, "chosen": " word" * 400_000},
                          {**GOOD, "prompt": "the quick brown fox " * 60}))
    rc = main(["train", "--model", run_files["model"], "--data", str(data), "--output", str(tmp_path / "o"),
               "--max-steps", "1", "--max-length", "64", "--no-progress", "--no-save-model"])
    err = capsys.readouterr().err
    assert rc == 0 and f"{data}: truncated 2 rows to max_length 64" in err


def test_reward_function_errors(tmp_path):
    """No CLI command runs reward functions yet (the online loops do); their loader and checks are
    the same code those commands will call: each failure is one UserError naming function and row."""
    from prefalign.errors import UserError
    from prefalign.online.rewards import load_reward

    f = tmp_path / "my_rewards.py"
    f.write_text("def boom(prompts, completions):\n"
                 "    return [1.0 / (len(c) - 3) for c in completions]\n"
                 "def nan(prompts, completions):\n"
                 "    return [float('nan')] * len(completions)\n")
    cases = [
        (f"{f}:boom", ["abcd", "abc"], ["boom", "ZeroDivisionError", "row 2", "'abc'"]),  # raises on row 2 only
        (f"{f}:nan", ["a"], ["nan", "returned nan"]),
        (f"{f}:missing", ["a"], ["has no 'missing'", "boom"]),
        (f"{tmp_path}/nope.py:fn", ["a"], ["file not found"]),
    ]
    for spec, completions, expect in cases:
        with pytest.raises(UserError) as e:
            load_reward(spec)(["p"] * len(completions), completions)
        for s in expect:
            assert s in str(e.value), (spec, str(e.value))


def test_no_traceback_in_a_real_process(run_files, tmp_path):
    """The installed entry point, as a user runs it: a bad row and a bad flag value give one line."""
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl(GOOD, {"prompt": "p", "chosen": " c"}))
    proc = subprocess.run([sys.executable, "-m", "prefalign.cli", "train", "--model", run_files["model"], "--data",
                           str(data), "--output", str(tmp_path / "o"), "--beta", "0.1", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("prefalign: error:"), proc.stderr
    assert f"{data}" in proc.stderr and "row 2" in proc.stderr and "Traceback" not in proc.stderr
