"""Every numeric flag and config key has a documented range, and every config YAML is read strictly.

Each bad value goes through the real CLI (`prefalign.cli.main`, in-process): exit 2, exactly one
`prefalign: error:` line naming the flag or key and the value, no traceback, and the refusal comes
before any model or data is loaded (the paths given here do not even exist).
"""

import argparse
import os
import time

import pytest
import torch

from prefalign import config, fields, validation, yamlio
from prefalign.cli import main
from prefalign.errors import UserError

TRAIN = ["train", "--model", "no-model", "--data", "no-data.jsonl", "--max-steps", "1", "--no-progress"]

# name -> (argv after `train ...`, substrings of the one error line)
TRAIN_CASES = {
    "max_grad_norm nan": (["--max-grad-norm", "nan"], ["--max-grad-norm", "max_grad_norm", "nan"]),
    "max_grad_norm negative": (["--max-grad-norm", "-1"], ["max_grad_norm must be >= 0", "-1"]),
    "weight_decay inf": (["--weight-decay", "inf"], ["weight_decay must be >= 0", "inf"]),
    "adam_beta1 1": (["--adam-beta1", "1"], ["adam_beta1 must be in [0, 1)", "1.0"]),
    "adam_beta2 negative": (["--adam-beta2", "-0.1"], ["adam_beta2 must be in [0, 1)", "-0.1"]),
    "kto desirable_weight 0": (["--desirable-weight", "0"], ["desirable_weight must be > 0", "0"]),
    "kto undesirable_weight nan": (["--undesirable-weight", "nan"], ["undesirable_weight", "nan"]),
    "rpo_alpha negative": (["--rpo-alpha", "-0.5"], ["rpo_alpha must be >= 0", "-0.5"]),
    "epochs inf": (["--max-steps", "0", "--epochs", "inf"], ["--epochs", "epochs must be > 0", "inf"]),
    "epochs 0 with max_steps": (["--epochs", "0"], ["epochs must be > 0", "0"]),
    "seed 1e23": (["--seed", "1e23"], ["--seed", "seed", "1e23"]),
    "seed 2**32": (["--seed", str(2**32)], ["seed must be in [0, 2**32)", str(2**32)]),
    "seed negative": (["--seed", "-1"], ["seed must be in [0, 2**32)", "-1"]),
    "seed not whole": (["--seed", "1.5"], ["seed must be int", "1.5"]),
    "lr nan": (["--lr", "nan"], ["lr must be in (0, 1)", "nan"]),
    "lora_alpha 0": (["--lora-alpha", "0"], ["lora_alpha must be > 0", "0"]),
    "both_drop_threshold inf": (["--both-drop-threshold", "inf"], ["both_drop_threshold must be finite", "inf"]),
    "beta nan": (["--beta", "nan"], ["beta must be > 0", "nan"]),
    "gamma -inf": (["--gamma=-inf"], ["gamma must be finite", "-inf"]),
    "label_smoothing nan": (["--label-smoothing", "nan"], ["label_smoothing", "nan"]),
    "lora_dropout 1": (["--lora-dropout", "1"], ["lora_dropout must be in [0, 1)"]),
    "warmup_steps negative": (["--warmup-steps", "-3"], ["warmup_steps must be >= 0", "-3"]),
    "keep_checkpoints 0": (["--keep-checkpoints", "0"], ["keep_checkpoints must be >= 1", "0"]),
    "max_nonfinite 0": (["--max-nonfinite", "0"], ["max_nonfinite must be >= 1", "0"]),
    "num-processes 1e3": (["--num-processes", "1e3"], ["--num-processes", "1e3"]),
    "unknown flag": (["--betta", "0.1"], ["unrecognized arguments: --betta"]),
}


def run(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def one_line(rc, err, expect):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("prefalign: error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    for s in expect:
        assert s in lines[0], f"{s!r} not in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_flag_out_of_range(case, tmp_path, capsys):
    extra, expect = TRAIN_CASES[case]
    rc, err = run([*TRAIN, "--output", str(tmp_path / "o"), *extra], capsys)
    one_line(rc, err, expect)
    assert not (tmp_path / "o").exists(), "a refused run must write nothing"


def test_sft_takes_the_same_checks(tmp_path, capsys):
    rc, err = run(["sft", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o"),
                   "--weight-decay", "nan"], capsys)
    one_line(rc, err, ["--weight-decay", "nan"])


def yaml_file(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# name -> (YAML text, substrings of the one error line; {f} is the file)
YAML_CASES = {
    "duplicated key": ("lr: 1.0e-6\nbeta: 0.1\nlr: 0.5\n", ["{f}", "line 3", "duplicate key 'lr'", "line 1"]),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", ["{f}", "line 1", "anchor &a"]),
    "alias": ("output: *x\n", ["{f}", "line 1", "alias *x"]),
    "merge key": ("base: {lr: 1.0e-6}\n<<: {beta: 0.2}\n", ["{f}", "line 2", "merge keys"]),
    "integer key": ("1: 2\n", ["{f}", "line 1", "key 1 is not a string"]),
    "null key": ("null: 2\n", ["{f}", "line 1", "key null is not a string"]),
    "sequence key": ("? [a, b]\n: 1\n", ["{f}", "line 1", "is not a string"]),
    "mapping for a string field": ("output: {a: 1}\n", ["{f}", "output must be a string", "a mapping"]),
    "list for a string field": ("data: [a.jsonl, b.jsonl]\n", ["{f}", "data must be a string", "a list"]),
    "boolean for a string field": ("output: no\n", ["{f}", "output must be a string", "False"]),
    "null for a string field": ("model:\n", ["{f}", "model must be a string", "null"]),
    "list for a number": ("lr: [1, 2]\n", ["{f}", "lr must be float", "a list"]),
    "nan in the file": ("max_grad_norm: .nan\n", ["{f}", "max_grad_norm must be >= 0", "nan"]),
    "huge float seed": ("seed: 1.0e+23\n", ["{f}", "seed must be in [0, 2**32)"]),
    "not UTF-8": (None, ["{f}", "not valid YAML"]),
    "deep nesting": ("a: " + "[" * 50_000 + "\n", ["{f}", "nested too deeply"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_train_yaml_refusals(case, tmp_path, capsys):
    text, expect = YAML_CASES[case]
    f = tmp_path / "run.yaml"
    if text is None:
        f.write_bytes(b"output: caf\xe9\n")
    else:
        f.write_text(text)
    rc, err = run([*TRAIN, "--output", str(tmp_path / "o"), "--config", str(f)], capsys)
    one_line(rc, err, [s.replace("{f}", str(f)) for s in expect])
    assert not (tmp_path / "o").exists() and not os.path.exists("{'a': 1}")


def test_alias_bomb_is_refused_at_once():
    """Nine levels of nine aliases are 9**9 strings once built: the loader must stop at the first anchor."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="line 1: YAML anchor &l0"):
        yamlio.loads("\n".join(lines) + "\n", "bomb.yaml")
    assert time.perf_counter() - t0 < 1.0


def test_loader_keeps_plain_files():
    assert yamlio.loads("lr: 1.0e-6\nreward: [a, b]\nnested: {x: 1}\n'1': quoted\n", "f") == {
        "lr": 1e-6, "reward": ["a", "b"], "nested": {"x": 1}, "1": "quoted"}
    assert yamlio.loads("", "f") is None


def test_yaml_empty_file_is_no_keys(tmp_path):
    assert yamlio.load_mapping(yaml_file(tmp_path, "# only a comment\n")) == {}
    with pytest.raises(UserError, match="not a file"):
        yamlio.load_mapping(str(tmp_path))


def parse_train(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    config.add_flags(p)
    return config.from_args(p.parse_args(argv))


def test_tilde_is_expanded_in_path_keys_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    f = yaml_file(tmp_path, "output: ~/runs/a\ndata: ~/d.jsonl\ncache_dir: ~/cache\nloss: dpo\n")
    cfg = parse_train(["--config", "~/run.yaml", "--model=~/m"])
    assert cfg.output == f"{tmp_path}/runs/a" and cfg.data == f"{tmp_path}/d.jsonl"
    assert cfg.cache_dir == f"{tmp_path}/cache" and cfg.model == f"{tmp_path}/m"
    assert cfg.loss == "dpo" and os.path.exists(f)
    assert config.build({"resume": "auto"}).resume == "auto"  # not a path: left alone


def test_tilde_in_flags_of_other_commands(tmp_path, monkeypatch, capsys):
    """`--json=~/x` gets no shell expansion: prefalign does it (here: the expanded parent is a file)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "afile").write_text("x")
    rc, err = run(["eval", "--model", "m", "--ref-model", "r", "--data", "d", "--json=~/afile/r.json"], capsys)
    one_line(rc, err, ["--json", f"{tmp_path}/afile/r.json", "is a file"])


def test_range_is_in_the_help():
    p = argparse.ArgumentParser()
    config.add_flags(p)
    text = p.format_help()
    assert "range in [0, 1)" in text and "range >= 0" in text and "range in [0, 2**32)" in text


# Other commands: name -> (argv, substrings of the one error line). {tmp} is the test's folder.
OTHER_CASES = {
    "eval --samples -1": (["eval", "--model", "m", "--ref-model", "r", "--data", "d", "--samples", "-1"],
                          ["--samples", "must be >= 0", "-1"]),
    "eval --beta nan": (["eval", "--model", "m", "--ref-model", "r", "--data", "d", "--beta", "nan"],
                        ["--beta", "must be > 0", "nan"]),
    "eval --batch-size 0": (["eval", "--model", "m", "--ref-model", "r", "--data", "d", "--batch-size", "0"],
                            ["--batch-size", "must be >= 1", "0"]),
    "eval --json a directory": (["eval", "--model", "m", "--ref-model", "r", "--data", "d", "--json", "{tmp}"],
                                ["--json", "{tmp}", "is a directory"]),
    "generate --temperature nan": (["generate", "--model", "m", "--prompts", "p", "--output", "o.jsonl",
                                    "--temperature", "nan"], ["--temperature", "nan"]),
    "generate --top-p 0": (["generate", "--model", "m", "--prompts", "p", "--output", "o.jsonl", "--top-p", "0"],
                           ["--top-p", "must be in (0, 1]", "0"]),
    "generate --top-p 1.5": (["generate", "--model", "m", "--prompts", "p", "--output", "o.jsonl", "--top-p", "1.5"],
                             ["--top-p", "1.5"]),
    "generate --n 0": (["generate", "--model", "m", "--prompts", "p", "--output", "o.jsonl", "--n", "0"],
                       ["--n", "must be >= 1"]),
    "generate --seed 1e23": (["generate", "--model", "m", "--prompts", "p", "--output", "o.jsonl", "--seed", "1e23"],
                             ["--seed", "1e23"]),
    "generate --output a directory": (["generate", "--model", "m", "--prompts", "p", "--output", "{tmp}"],
                                      ["--output", "{tmp}", "is a directory"]),
    "grpo --reward-weights nan": (["grpo", "--model", "m", "--prompts", "p", "--output", "{tmp}/g", "--reward",
                                   "regex=1", "--reward-weights", "nan"], ["--reward-weights", "reward_weights must be finite", "nan"]),
    "grpo --reward-weights inf": (["grpo", "--model", "m", "--prompts", "p", "--output", "{tmp}/g", "--reward",
                                   "regex=1", "--reward-weights", "inf"], ["reward_weights", "inf"]),
    "grpo --group-size 1": (["grpo", "--group-size", "1"], ["--group-size", "group_size must be >= 2", "1"]),
    "grpo --max-grad-norm nan": (["grpo", "--max-grad-norm", "nan"], ["max_grad_norm", "nan"]),
    "grpo --top-p 0": (["grpo", "--top-p", "0"], ["top_p must be in (0, 1]", "0"]),
    "grpo --adam-beta2 1": (["grpo", "--adam-beta2", "1"], ["adam_beta2 must be in [0, 1)", "1"]),
    "grpo --seed -1": (["grpo", "--seed", "-1"], ["seed must be in [0, 2**32)", "-1"]),
    "iterate --temperature 0": (["iterate", "--temperature", "0"], ["--temperature", "temperature must be > 0", "0"]),
    "iterate --epochs inf": (["iterate", "--epochs", "inf"], ["epochs must be > 0", "inf"]),
    "iterate --reward-weights nan": (["iterate", "--reward", "regex=1", "--reward-weights", "nan"],
                                     ["reward_weights", "nan"]),
    "iterate --set weight_decay=nan": (["iterate", "--set", "weight_decay=nan"], ["iterate", "weight_decay must be >= 0", "nan"]),
    "compare --grpo-lr nan": (["compare", "--grpo-lr", "nan"], ["--grpo-lr", "grpo_lr must be in (0, 1)", "nan"]),
    "compare --temperature -1": (["compare", "--temperature", "-1"], ["temperature must be > 0", "-1"]),
    "compare --output a file": (["compare", "--output", "{tmp}/f.txt"], ["--output", "f.txt", "not a directory"]),
    "audit --max-length 0": (["audit", "d.jsonl", "--max-length", "0"], ["--max-length", "must be >= 1", "0"]),
    "audit --alpha nan": (["audit", "d.jsonl", "--alpha", "nan"], ["--alpha", "nan"]),
    "audit --max-skipped 2": (["audit", "d.jsonl", "--max-skipped", "2"], ["--max-skipped", "must be in [0, 1]"]),
    "audit --json a directory": (["audit", "d.jsonl", "--json", "{tmp}"], ["--json", "{tmp}", "is a directory"]),
    "demo --seed 1e23": (["demo", "--quick", "--seed", "1e23"], ["--seed", "1e23"]),
    "demo --output a file": (["demo", "--quick", "--output", "{tmp}/f.txt"], ["--output", "f.txt", "not a directory"]),
    "experiment --threads -1": (["experiment", "beta-sweep", "--threads", "-1"], ["--threads", "must be >= 0"]),
    "experiment --output under a file": (["experiment", "beta-sweep", "--output", "{tmp}/f.txt/x"],
                                         ["--output", "f.txt", "is a file"]),
    "experiment --cache a file": (["experiment", "beta-sweep", "--cache", "{tmp}/f.txt"], ["--cache", "f.txt"]),
    "train --output under a file": ([*TRAIN, "--output", "{tmp}/f.txt/run"], ["--output", "f.txt", "is a file"]),
    "train --cache-dir a file": ([*TRAIN, "--output", "{tmp}/o", "--cache-dir", "{tmp}/f.txt"],
                                 ["--cache-dir", "f.txt", "not a directory"]),
}


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_other_commands(case, tmp_path, capsys):
    argv, expect = OTHER_CASES[case]
    (tmp_path / "f.txt").write_text("not a folder")
    fill = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    rc, err = run([fill(a) for a in argv], capsys)
    one_line(rc, err, [fill(s) for s in expect])
    assert sorted(os.listdir(tmp_path)) == ["f.txt"], "a refused command must write nothing"


def test_grpo_yaml_is_strict_and_typed(tmp_path, capsys):
    dup = yaml_file(tmp_path, "steps: 2\nsteps: 3\n", "dup.yaml")
    one_line(*run(["grpo", "--config", dup], capsys), [dup, "line 2", "duplicate key 'steps'"])
    mapping = yaml_file(tmp_path, "output: {a: 1}\n", "map.yaml")
    one_line(*run(["grpo", "--config", mapping], capsys), [mapping, "output must be a string", "a mapping"])
    weights = yaml_file(tmp_path, "reward: regex=1\nreward_weights: [.inf]\n", "w.yaml")
    one_line(*run(["grpo", "--config", weights], capsys), [weights, "reward_weights must be finite", "inf"])
    nan = yaml_file(tmp_path, "temperature: .nan\n", "nan.yaml")  # refused even where a flag overrides it
    one_line(*run(["grpo", "--config", nan, "--temperature", "1"], capsys), [nan, "temperature must be > 0", "nan"])
    words = yaml_file(tmp_path, "reward: [a]\nreward_weights: [heavy]\n", "words.yaml")
    one_line(*run(["grpo", "--config", words], capsys), ["reward_weights must be numbers", "'heavy'"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex_attention trains on CUDA")
def test_flex_attention_training_on_cpu_is_refused_before_loading(tmp_path, capsys):
    rc, err = run([*TRAIN, "--output", str(tmp_path / "o"), "--attention", "flex_attention"], capsys)
    one_line(rc, err, ["--attention flex_attention", "CUDA", "--attention sdpa"])


def test_flex_attention_check_follows_the_device(tmp_path):
    cfg = config.build({"attention": "flex_attention"})
    with pytest.raises(UserError, match="flex_attention"):
        config.check_before_start(cfg, cuda=False)
    config.check_before_start(cfg, cuda=True)  # a GPU trains with it
    config.check_before_start(config.build({"attention": "sdpa"}), cuda=False)


@pytest.mark.parametrize("spec,inside,outside", [
    ("> 0", [1e-30, 5], [0, -1, float("nan"), float("inf")]),
    (">= 0", [0, 3.5], [-1e-9, float("nan"), float("inf")]),
    ("[0, 1)", [0, 0.999], [1, -0.1, float("nan")]),
    ("(0, 1]", [1, 0.5], [0, 1.01, float("-inf")]),
    ("[0, 2**32)", [0, 2**32 - 1], [2**32, -1]),
    ("finite", [-1e300, 0], [float("nan"), float("inf"), float("-inf")]),
])
def test_range_specs(spec, inside, outside):
    r = validation.Range(spec)
    assert all(r.ok(v) for v in inside) and not any(r.ok(v) for v in outside)


def test_every_numeric_train_field_has_a_range():
    numeric = {n for n in config.FIELDS if fields.field_type(config.TrainConfig, n)[0] in (int, float)}
    assert numeric <= set(config.RANGES), numeric - set(config.RANGES)
    for name, spec in config.RANGES.items():  # every default sits inside its own range
        assert validation.problem(name, config.FIELDS[name].default, spec) is None, name


def test_written_config_reads_back_strictly(tmp_path):
    """OUTPUT/config.yaml (what a resume reads) survives the strict loader, even with a shared object."""
    cfg = config.build({"output": "~/o", "lr": 1e-4, "seed": 2**32 - 1, "max_grad_norm": 0})
    shared = [1, 2]
    text = yamlio.dumps({**config.to_dict(cfg), "extra_a": shared, "extra_b": shared})
    assert "&" not in text and "*" not in text
    back = yamlio.loads(text, "config.yaml")
    back.pop("extra_a"), back.pop("extra_b")
    assert config.build(back) == cfg


def test_boundaries_are_accepted():
    cfg = config.build({"max_grad_norm": 0, "weight_decay": 0, "adam_beta1": 0, "adam_beta2": 0.999999,
                        "seed": 2**32 - 1, "rpo_alpha": 0, "epochs": 0.5, "label_smoothing": 0.49})
    assert (cfg.max_grad_norm, cfg.seed, cfg.epochs) == (0.0, 2**32 - 1, 0.5)
    assert config.build({"seed": "1e3"}).seed == 1000  # a whole number written as a float
