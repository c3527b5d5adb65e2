"""Config: YAML keys and flags are the same fields; bad values are user errors with their place."""

import argparse

import pytest
import yaml

from prefalign import config
from prefalign.errors import UserError


def parse(argv, yaml_text=None, tmp_path=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    config.add_flags(p)
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path)] + argv
    return config.from_args(p.parse_args(argv))


def test_every_field_is_a_flag_and_a_key(tmp_path):
    p = argparse.ArgumentParser()
    config.add_flags(p)
    flags = {a.dest: a.option_strings for a in p._actions}
    spelled = {"loss_params": "--loss-param"}  # repeated, one KEY=VALUE each
    for name in config.FIELDS:
        flag = spelled.get(name, "--" + name.replace("_", "-"))
        assert flag in flags.get(name, ()), f"{name}: no flag {flag}"
    # every field as a YAML key: a file spelling out all of them reads back as the same config
    defaults = parse([])
    every_key = yaml.safe_dump({name: getattr(defaults, name) for name in config.FIELDS})
    assert parse([], every_key, tmp_path) == defaults
    cfg = parse(["--max-steps", "7", "--no-packing"], "max_steps: 3\nbeta: 0.3\nlr_schedule: cosine\n", tmp_path)
    assert cfg.max_steps == 7  # the flag wins over the file
    assert cfg.beta == 0.3 and cfg.lr_schedule == "cosine" and cfg.packing is False


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'max_step'.*did you mean 'max_steps'"):
        parse([], "max_step: 3\n", tmp_path)


@pytest.mark.parametrize("values,match", [
    ({"beta": 0}, "beta must be > 0"),
    ({"beta": -1}, "beta must be > 0"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"lr": 2}, "lr must be"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ({"max_steps": "ten"}, "max_steps must be int"),
    ({"reference": "adapters-off"}, "needs LoRA"),
])
def test_out_of_range(values, match):
    with pytest.raises(UserError, match=match):
        config.build(values)


def test_yaml_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="expected a mapping"):
        parse([], "- a\n- b\n", tmp_path)
