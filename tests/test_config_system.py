"""One config system for every command (prefalign.fields): eval and generate take --config YAML like
train, grpo and iterate; a YAML run equals the same run by flags; unknown keys are reported together;
and `prefalign losses` answers from an import-light table."""

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import yaml

from prefalign import cli, config, fields, loss_table
from prefalign.errors import UserError
from prefalign.online import cli as online_cli
from prefalign.experiments.compare_settings import CompareSettings
from prefalign.online.settings import GRPOConfig, IterativeConfig, PPOConfig
from prefalign.reward_config import RewardConfig
from prefalign.settings import EvalConfig, GenerateConfig
from test_train import run_files  # noqa: F401 (a fixture)


def _yaml(tmp_path, values, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("prefalign: error: "), err
    return err


# ------------------------------------------------------------------------------ one builder


def test_every_settings_class_goes_through_the_one_builder(monkeypatch):
    """Each command's flags come from fields.add_flags (train/sft, eval, generate, grpo, ppo, iterate, compare, reward)."""
    seen = []
    real = fields.add_flags
    monkeypatch.setattr(fields, "add_flags", lambda p, cls, *a, **k: (seen.append(cls), real(p, cls, *a, **k)))
    monkeypatch.setattr(online_cli, "add_flags", fields.add_flags)
    cli.build_parser()
    assert seen.count(config.TrainConfig) == 2  # train and sft
    assert {EvalConfig, GenerateConfig, GRPOConfig, PPOConfig, IterativeConfig, CompareSettings,
            RewardConfig} <= set(seen)


@pytest.mark.parametrize("cls", [config.TrainConfig, EvalConfig, GenerateConfig, GRPOConfig, PPOConfig,
                                 IterativeConfig, CompareSettings, RewardConfig])
def test_every_field_has_help_and_every_range_a_field(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    assert all(len(f.metadata.get("help", "")) > 3 for f in dataclasses.fields(cls)), cls.__name__
    assert set(cls.RANGES) <= names and set(getattr(cls, "PATHS", ())) <= names


# ------------------------------------------------------------------------------ shared field groups


def test_a_shared_setting_is_declared_once_and_its_range_reaches_every_command(capsys):
    """AdamW's, sampling's, LoRA's ... fields live in field_groups; each command that inherits a group
    gets its flags (under the group's heading), its range checks and its path expansion."""
    from prefalign import field_groups as g

    for cls, groups in [(GRPOConfig, (g.Rewards, g.Sampling, g.AdamW, g.Loading, g.LoRA, g.Run)),
                        (PPOConfig, (g.Rewards, g.Sampling, g.AdamW, g.Loading, g.LoRA, g.Checkpoints, g.Run)),
                        (IterativeConfig, (g.Rewards, g.Sampling, g.Loading)),
                        (RewardConfig, (g.AdamW, g.LoRA, g.Checkpoints, g.Run)),
                        (config.TrainConfig, (g.AdamW, g.Loading, g.LoRA, g.Checkpoints, g.Run))]:
        headings = [title for title, _ in fields.sections(cls)]
        for group in groups:
            assert issubclass(cls, group) and group.__doc__.strip() in headings
            for name, spec in getattr(group, "RANGES", {}).items():
                assert cls.RANGES[name] == spec, (cls.__name__, name)
            assert set(getattr(group, "PATHS", ())) <= set(cls.PATHS)
        shown = [f.name for _, fs in fields.sections(cls) for f in fs]
        assert sorted(shown) == sorted(f.name for f in dataclasses.fields(cls))  # each field shown once
    # A group's range is enforced for a flag of a command that inherits it.
    assert cli.main(["ppo", "--model", "m", "--prompts", "p.jsonl", "--reward", "exact_answer",
                     "--output", "o", "--adam-beta2", "1.5"]) == 2
    assert "adam_beta2" in capsys.readouterr().err
    with pytest.raises(UserError, match="top_p"):
        IterativeConfig(top_p=0.0)
    # A command's own default for a group's field stays its own; the others keep the group's.
    assert GRPOConfig().lr_schedule == PPOConfig().lr_schedule == "constant"
    assert config.TrainConfig().lr_schedule == RewardConfig().lr_schedule == "linear"


def test_grpo_settings_offer_exactly_the_losses_choices():
    """online.settings stays torch-free, so it names the GRPO loss's scalings and aggregations itself."""
    from prefalign.losses import grpo

    fields_ = GRPOConfig.__dataclass_fields__
    assert tuple(fields_["scale"].metadata["choices"]) == grpo.SCALES
    assert tuple(fields_["aggregation"].metadata["choices"]) == grpo.AGGREGATIONS
    with pytest.raises(UserError, match="grpo config: scale must be one of group, batch, none; got 'x'"):
        GRPOConfig(scale="x")


def test_config_yaml_keeps_the_help_order():
    """config.yaml lists a run's settings as --help does: the command's own first, then each group's."""
    keys = list(config.to_dict(config.TrainConfig()))
    assert keys[:3] == ["model", "ref_model", "tokenizer"] and keys.index("lr") < keys.index("warmup_steps")
    for cls in (GRPOConfig, PPOConfig, RewardConfig):
        shown = [f.name for _, group in fields.sections(cls) for f in group]
        assert list(fields.as_dict(cls())) == shown and shown[0] == "model"


# ------------------------------------------------------------------------------ eval and generate


def _parse(argv):
    return cli.build_parser().parse_args(argv)


def test_eval_from_yaml_equals_eval_from_flags(tmp_path):
    values = {"model": "m", "ref_model": "r", "data": "d.jsonl", "beta": 0.25, "batch_size": 3, "max_length": 77,
              "samples": 0, "max_new_tokens": 9, "json": str(tmp_path / "out.json")}
    flags = [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), str(v))]
    by_flags = fields.from_flags(EvalConfig, _parse(["eval", *flags]))
    by_yaml = fields.from_flags(EvalConfig, _parse(["eval", "--config", _yaml(tmp_path, values)]), _yaml(tmp_path, values))
    assert by_flags == by_yaml == EvalConfig(tokenizer="", **values)
    # a flag wins over the file's key
    args = _parse(["eval", "--config", _yaml(tmp_path, values), "--beta", "0.5"])
    assert fields.from_flags(EvalConfig, args, args.config).beta == 0.5


def test_eval_runs_the_same_from_yaml_and_from_flags(run_files, tmp_path, capsys):  # noqa: F811
    common = {"model": run_files["model"], "ref_model": run_files["model"], "data": run_files["eval"],
              "beta": 0.2, "batch_size": 2, "max_length": 64, "samples": 2, "max_new_tokens": 3}
    flags = [x for k, v in common.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert cli.main(["eval", *flags, "--json", str(tmp_path / "flags.json")]) == 0
    cfg = _yaml(tmp_path, {**common, "json": str(tmp_path / "yaml.json")})
    assert cli.main(["eval", "--config", cfg]) == 0, capsys.readouterr().err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("flags.json", "yaml.json"))
    assert a == b and a["pairs"] == 6 and 0 <= a["rewards/accuracies"] <= 1


def test_generate_runs_the_same_from_yaml_and_from_flags(run_files, tmp_path, capsys):  # noqa: F811
    common = {"model": run_files["model"], "prompts": run_files["eval"], "n": 2, "max_new_tokens": 4,
              "temperature": 0.7, "top_k": 5, "seed": 3, "batch_size": 4}
    flags = [x for k, v in common.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert cli.main(["generate", *flags, "--output", str(tmp_path / "flags.jsonl")]) == 0
    cfg = _yaml(tmp_path, {**common, "output": str(tmp_path / "yaml.jsonl")})
    assert cli.main(["generate", "--config", cfg]) == 0, capsys.readouterr().err
    a, b = ((tmp_path / f).read_text().splitlines() for f in ("flags.jsonl", "yaml.jsonl"))
    assert a == b and len(a) == 12  # 6 prompts x 2 samples
    assert {json.loads(line)["sample"] for line in a} == {0, 1}


def test_unknown_eval_keys_are_all_reported_in_one_line(tmp_path, capsys):
    path = _yaml(tmp_path, {"model": "m", "ref_modle": "r", "betta": 0.1, "frobnicate": 1, "data": "d"})
    assert cli.main(["eval", "--config", path]) == 2
    err = _one_line(capsys)
    assert f"{path}: unknown keys" in err
    assert "'ref_modle' (did you mean 'ref_model'?)" in err and "'betta' (did you mean 'beta'?)" in err
    assert "'frobnicate'" in err


@pytest.mark.parametrize("command,values,words", [
    ("eval", {"model": "m", "ref_model": "r", "data": "d", "batch_size": 0}, ["batch_size must be >= 1", "got 0"]),
    ("eval", {"model": "m", "ref_model": "r", "data": "d", "beta": float("nan")}, ["beta must be > 0", "nan"]),
    ("generate", {"model": "m", "prompts": "p", "output": "o.jsonl", "top_p": 1.5}, ["top_p must be in (0, 1]", "1.5"]),
    ("generate", {"model": "m", "prompts": "p", "output": "o.jsonl", "n": "two"}, ["n must be int", "'two'"]),
])
def test_a_bad_yaml_value_names_the_file_and_the_key(tmp_path, capsys, command, values, words):
    path = _yaml(tmp_path, values)
    assert cli.main([command, "--config", path]) == 2
    err = _one_line(capsys)
    assert path in err and all(w in err for w in words), err


def test_a_bad_flag_value_names_the_flag(capsys):
    assert cli.main(["generate", "--model", "m", "--prompts", "p", "--output", "o.jsonl", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: max_new_tokens must be >= 1; got 0" in _one_line(capsys)


@pytest.mark.parametrize("argv,missing", [
    (["eval", "--model", "m", "--data", "d"], "--ref-model"),
    (["generate", "--model", "m", "--output", "o.jsonl"], "--prompts"),
])
def test_a_required_key_may_come_from_either_and_its_absence_is_named(tmp_path, capsys, argv, missing):
    assert cli.main(argv) == 2
    assert f"missing {missing}" in _one_line(capsys)


# ------------------------------------------------------------------------------ prefalign losses


def test_listing_the_losses_imports_no_torch():
    code = ("import sys, io, contextlib, prefalign.cli; out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out): rc = prefalign.cli.main(['losses'])\n"
            "print(rc, 'torch' in sys.modules, len(out.getvalue().splitlines()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rc, torch_loaded, lines = out.stdout.split()
    assert (rc, torch_loaded) == ("0", "False") and int(lines) > 2 * len(loss_table.TABLE)


def test_the_loss_functions_take_their_defaults_from_the_table():
    from prefalign.losses import LOSSES

    for name, info in loss_table.TABLE.items():
        signature = inspect.signature(LOSSES[name].fn).parameters
        assert {k: signature[k].default for k in info.defaults} == info.defaults, name
        assert LOSSES[name].params == info.params and LOSSES[name].kind == info.kind


def test_losses_output_shows_each_loss_with_its_description(capsys):
    assert cli.main(["losses"]) == 0
    out = capsys.readouterr().out
    for name, info in loss_table.TABLE.items():
        line = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert all(f"{k}={v!r}" in line for k, v in info.params.items()), line
        assert info.about in out


def test_a_default_without_a_table_entry_is_refused():
    def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):  # label_smoothing missing
        return beta

    with pytest.raises(TypeError, match="TABLE"):
        loss_table.takes_defaults(dpo)


def test_compare_takes_the_old_names_of_renamed_settings():
    """grpo_beta -> grpo_kl_coef and reference -> ref_update (the renovation's names), old names kept."""
    import argparse

    p = argparse.ArgumentParser()
    fields.add_flags(p, CompareSettings)
    assert fields.given_flags(CompareSettings, p.parse_args(["--grpo-beta", "0.1", "--reference", "fixed"])) == \
        {"grpo_kl_coef": 0.1, "ref_update": "fixed"}
    with pytest.raises(UserError, match="both set grpo_kl_coef"):
        fields.given_flags(CompareSettings, p.parse_args(["--grpo-beta", "0.1", "--grpo-kl-coef", "0.2"]))
