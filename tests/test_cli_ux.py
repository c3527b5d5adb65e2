"""The CLI a TRL user meets: a start-up without torch, help that tells the real defaults and
choices of every flag, TRL's config names, warmup_ratio and gradient checkpointing."""

import argparse
import ast
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from prefalign import __version__, cli, config, fingerprint, train
from prefalign.experiments.compare_settings import CompareSettings
from prefalign.online.settings import GRPOConfig, IterativeConfig, PPOConfig
from prefalign.reward_config import RewardConfig
from test_train import assert_same_weights, cfg_for, run_files, weights  # noqa: F401 (run_files: a fixture)


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _flags(sub):
    return [a for a in sub._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


# ------------------------------------------------------------------------------------- start-up


def test_building_the_parsers_imports_no_heavy_module():
    code = ("import prefalign.cli, sys; prefalign.cli.build_parser(); "
            "print([m for m in ('torch', 'transformers', 'datasets', 'peft', 'accelerate', 'matplotlib') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"prefalign {__version__}"


# ------------------------------------------------------------------------------------- help


def _shown(action) -> str | None:
    """The default a flag's help shows (the last "(default: ...)", less its range), or None."""
    text = " ".join(action.help.split())
    i = text.rfind("(default: ")
    if i < 0:
        return None
    shown = text[i + len("(default: "):].split("; range ")[0]
    return shown[:-1] if shown.endswith(")") and shown.count("(") < shown.count(")") else shown


def _agrees(shown: str, real) -> bool:
    """The help's default is the value the command uses: a literal equal to it, or words for "unset"."""
    if shown == "empty":
        return real == ""
    if shown in ("none", "the loss's own") or shown.startswith("no "):
        return real in (None, "", [])
    try:
        return ast.literal_eval(shown) == real
    except (ValueError, SyntaxError):
        return real in ("", None, [])  # described in words ("the model's")


def _real_defaults(name: str, sub) -> dict:
    """dest -> the value the command really runs with when the flag is not given."""
    if name in ("train", "sft"):
        args = sub.parse_args([])
        cfg = config.from_args(args, cli.SFT_BASE if name == "sft" else None)
        return {**vars(cfg), "loss_params": None, "num_processes": 1, "config": None}
    cls = {"grpo": GRPOConfig, "ppo": PPOConfig, "iterate": IterativeConfig, "compare": CompareSettings,
           "reward": RewardConfig}.get(name)
    if cls is not None:
        obj = cls()
        real = dict(vars(obj))
        if name == "compare":  # None: the demo task's value, which the help names first
            real.update({k: v for k, v in vars(obj.resolved()).items() if getattr(obj, k) is None})
        return {**real, "config": "", "set": None}
    return {a.dest: a.default for a in sub._actions}


def test_every_flag_of_every_command_has_help_and_its_real_default():
    commands = _subparsers(cli.build_parser())
    assert {"train", "sft", "eval", "generate", "grpo", "iterate", "compare", "audit", "demo", "experiment",
            "losses"} <= set(commands)
    checked = 0
    for name, sub in commands.items():
        real = _real_defaults(name, sub)
        for a in _flags(sub):
            what = f"{name} {'/'.join(a.option_strings) or a.dest}"
            words = (a.help or "").split("(default")[0].strip()
            assert len(words) > 3, f"{what}: no help text"
            if not a.option_strings:  # a positional: no default
                continue
            shown = _shown(a)
            if isinstance(a, argparse._StoreTrueAction):  # a switch: off unless given
                continue
            if a.required:
                assert shown is None and "required" in a.help, f"{what}: required, says {a.help!r}"
                continue
            assert shown is not None, f"{what}: the help shows no default: {a.help!r}"
            assert a.help.count("(default:") == 1, f"{what}: {a.help!r}"
            if name == "compare" and shown.startswith("demo task"):
                shown = shown.split(" (DemoSettings)")[0].removeprefix("demo task ")
            assert _agrees(shown, real[a.dest]), f"{what}: help says {shown}, the command uses {real[a.dest]!r}"
            if a.choices:
                assert "{" + ",".join(a.choices) + "}" in sub.format_help(), f"{what}: choices hidden"
            checked += 1
    assert checked > 200


def test_train_help_shows_each_default_once_and_the_choices():
    text = " ".join(_subparsers(cli.build_parser())["train"].format_help().split())
    assert "--reference {auto,copy,adapters-off,precomputed,none}" in text
    assert "--lr-schedule {constant,linear,cosine}" in text and "--precision {fp32,bf16,auto}" in text
    assert "--on-bad-row {error,skip}" in text and "--sharding {auto,none,fsdp}" in text
    assert "(default: 5e-07; range in (0, 1))" in text


def test_sft_help_shows_sfts_defaults_and_no_preference_flags():
    sub = _subparsers(cli.build_parser())["sft"]
    flags = {o for a in sub._actions for o in a.option_strings}
    for hidden in ("--beta", "--label-smoothing", "--reference", "--ref-model", "--rpo-alpha", "--gamma"):
        assert hidden not in flags
    by_flag = {a.option_strings[0]: a for a in _flags(sub) if a.option_strings}
    assert _shown(by_flag["--lr"]).startswith("2e-05") and _shown(by_flag["--loss"]) == "'sft'"
    assert cli.main(["sft", "--model", "m", "--data", "d", "--output", "o", "--beta", "0.1"]) == 2


def test_eval_needs_its_reference_and_says_so(capsys):
    assert cli.main(["eval", "--model", "m", "--data", "d"]) == 2
    assert "--ref-model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- TRL keys


def _yaml(tmp_path, values, name="trl.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def test_a_trl_yaml_runs(run_files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    path = _yaml(tmp_path, {
        "model_name_or_path": run_files["model"], "dataset_name": run_files["data"], "output_dir": str(out),
        "learning_rate": 1e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_steps": 4, "warmup_ratio": 0.5, "lr_scheduler_type": "constant_with_warmup", "bf16": False,
        "logging_steps": 1, "save_steps": 2, "save_total_limit": 1, "max_length": 64, "beta": 0.2,
        "loss_type": "sigmoid", "precompute_ref_log_probs": False, "seed": 3, "max_grad_norm": 0.5,
    })
    assert cli.main(["train", "--config", path, "--no-progress"]) == 0, capsys.readouterr().err
    saved = yaml.safe_load(open(out / "config.yaml"))
    saved = saved.get("config", saved)
    assert (saved["lr"], saved["batch_size"], saved["grad_accum"], saved["lr_schedule"], saved["precision"]) == \
        (1e-3, 2, 2, "constant", "fp32")
    assert (saved["keep_checkpoints"], saved["save_every"], saved["seed"], saved["max_grad_norm"]) == (1, 2, 3, 0.5)
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    # warmup_ratio 0.5 of 4 steps: 2 warm-up steps at 1/3 and 2/3 of the peak, then the peak. The
    # record of step k holds the scheduler's lr after its step: that of step k + 1.
    assert lrs == pytest.approx([2e-3 / 3, 1e-3, 1e-3, 1e-3])


def test_unknown_keys_are_all_reported_in_one_line(tmp_path, capsys):
    path = _yaml(tmp_path, {"learning_rate": 1e-3, "save_stepz": 5, "max_stepz": 3, "frobnicate": 1})
    assert cli.main(["train", "--config", path]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "'save_stepz' (did you mean 'save_steps', TRL's name for save_every?)" in err
    assert "'max_stepz' (did you mean 'max_steps'?)" in err and "'frobnicate'" in err


def test_grpo_yaml_unknown_keys_are_all_reported(tmp_path, capsys):
    path = _yaml(tmp_path, {"stepz": 3, "group_sise": 4, "lr": 1e-5})
    assert cli.main(["grpo", "--config", path]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "'stepz' (did you mean 'steps'?)" in err and "'group_sise' (did you mean 'group_size'?)" in err


@pytest.mark.parametrize("values,flags,words", [
    ({"lr": 1e-3, "learning_rate": 1e-4}, [], ["'lr' and 'learning_rate' both set lr"]),
    ({"precision": "fp32", "bf16": True}, [], ["both set precision"]),
    ({}, ["--lr", "1e-3", "--learning-rate", "1e-4"], ["both set lr"]),
])
def test_a_field_set_under_two_names_is_refused(tmp_path, capsys, values, flags, words):
    argv = ["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o"), *flags]
    if values:
        argv += ["--config", _yaml(tmp_path, values)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


def test_trl_flags_are_accepted():
    sub = _subparsers(cli.build_parser())["train"]
    args = sub.parse_args(["--model-name-or-path", "m", "--dataset-name", "d.jsonl", "--output-dir", "o",
                           "--learning-rate", "1e-4", "--per-device-train-batch-size", "2", "--bf16",
                           "--precompute-ref-log-probs", "--num-train-epochs", "2", "--loss-type", "ipo"])
    cfg = config.from_args(args)
    assert (cfg.model, cfg.data, cfg.output, cfg.lr, cfg.batch_size, cfg.precision, cfg.reference, cfg.epochs,
            cfg.loss) == ("m", "d.jsonl", "o", 1e-4, 2, "bf16", "precomputed", 2.0, "ipo")
    assert config.from_args(sub.parse_args(["--model", "m", "--bf16", "false"])).precision == "fp32"


# ------------------------------------------------------------------------------------- warmup_ratio


@pytest.mark.parametrize("schedule,ratio,steps,total,expect", [
    ("linear", 0.25, 0, 8, [1 / 3, 2 / 3, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
    ("constant", 0.1, 0, 10, [1 / 2, 1.0, 1.0]),          # ceil(0.1 x 10) = 1 step
    ("constant", 0.15, 0, 10, [1 / 3, 2 / 3, 1.0]),       # ceil(1.5) = 2 steps
    ("constant", 0.5, 1, 10, [1 / 2, 1.0, 1.0]),          # warmup_steps wins over the ratio
    ("cosine", 0.0, 0, 4, [1.0, 0.5 * (1 + math.cos(math.pi / 4))]),
])
def test_warmup_ratio_schedule(schedule, ratio, steps, total, expect):
    cfg = config.build({"lr_schedule": schedule, "warmup_ratio": ratio, "warmup_steps": steps})
    f = train.lr_lambda(cfg, total)
    assert [f(s) for s in range(len(expect))] == pytest.approx(expect)


def test_warmup_ratio_range_and_fingerprint(run_files, tmp_path, capsys):  # noqa: F811
    assert cli.main(["train", "--model", "m", "--data", "d", "--output", "o", "--warmup-ratio", "1.5"]) == 2
    assert "warmup_ratio must be in [0, 1]" in capsys.readouterr().err
    base = fingerprint.of_run(cfg_for(run_files, tmp_path / "a"))
    assert fingerprint.differences(base, fingerprint.of_run(cfg_for(run_files, tmp_path / "a",
                                                                      gradient_checkpointing=True))) == {}
    assert "warmup_ratio" in fingerprint.differences(base, fingerprint.of_run(cfg_for(run_files, tmp_path / "a",
                                                                                       warmup_ratio=0.1)))


# ------------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_is_the_same_step(run_files, tmp_path, lora_r):  # noqa: F811
    """The same step-1 loss, gradient norm and weights after one step, checkpointed or not (LoRA too)."""
    plain = train.train(cfg_for(run_files, tmp_path / "plain", max_steps=1, lora_r=lora_r))
    ckpt = train.train(cfg_for(run_files, tmp_path / "ckpt", max_steps=1, lora_r=lora_r, gradient_checkpointing=True))
    base = ckpt.policy.get_base_model() if lora_r else ckpt.policy
    on = getattr(base, "is_activation_checkpointing", None)
    assert (on if on is not None else base.is_gradient_checkpointing) and not any(getattr(m, "_prefalign_lean", False) for m in base.modules())
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert ckpt.history[0][key] == pytest.approx(plain.history[0][key], abs=1e-6, rel=1e-6), key
    assert plain.history[0]["grad_norm"] > 0
    if lora_r:
        a, b = (dict((n, p.detach()) for n, p in r.policy.named_parameters() if "lora_" in n) for r in (plain, ckpt))
        assert a.keys() == b.keys() and a
        for n in a:
            torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)
    else:
        assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "ckpt"))
        assert not torch.equal(weights(tmp_path / "plain")["model.layers.0.mlp.up_proj.weight"],
                               make_start()["model.layers.0.mlp.up_proj.weight"])


def make_start():
    from tiny import make_model

    return make_model("llama", seed=0).state_dict()

