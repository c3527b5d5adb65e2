"""Safety defaults: no remote code unless asked, safetensors only, torch.load(weights_only=True)
everywhere, reward functions imported only from the path the user names."""

import os
import re
import sys

import pytest
import torch

from prefalign.cli import main
from test_train import run_files  # noqa: F401 (fixture)
from tiny import make_model, make_tokenizer

SRC = os.path.join(os.path.dirname(__file__), "..", "src", "prefalign")


def spy(monkeypatch, cls, calls):
    real = cls.from_pretrained

    def recording(*a, **kw):
        calls.append((cls.__name__, kw))
        return real(*a, **kw)

    monkeypatch.setattr(cls, "from_pretrained", recording)


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_trust_remote_code_is_off_unless_asked(run_files, tmp_path, monkeypatch, flag, expected):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    spy(monkeypatch, AutoModelForCausalLM, calls)
    spy(monkeypatch, AutoTokenizer, calls)
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(tmp_path / "o"),
               "--max-steps", "1", "--max-length", "64", "--no-progress", "--no-save-model", *flag])
    assert rc == 0
    # tokenizer, policy and the frozen reference copy
    assert sorted(name for name, _ in calls) == ["AutoModelForCausalLM", "AutoModelForCausalLM", "AutoTokenizer"]
    assert all(kw["trust_remote_code"] is expected for _, kw in calls)
    assert all(kw["use_safetensors"] is True for name, kw in calls if name == "AutoModelForCausalLM")


def test_pickled_bin_weights_are_refused(run_files, tmp_path, capsys):
    d = tmp_path / "binmodel"
    model = make_model("llama", seed=0)
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # transformers 5 no longer writes .bin itself
    make_tokenizer().save_pretrained(d)
    rc = main(["train", "--model", str(d), "--data", run_files["data"], "--output", str(tmp_path / "o"),
               "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{d}: no safetensors weights found" in err and "does not unpickle" in err


def test_every_torch_load_is_weights_only():
    """Unpickling runs code: every torch.load in the package passes weights_only=True, and nothing
    calls pickle directly."""
    found = 0
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".py"):
                continue
            text = open(os.path.join(root, f)).read()
            for m in re.finditer(r"torch\.load\(", text):
                depth, i = 1, m.end()
                while depth:  # the call's full argument text, to its closing parenthesis
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                assert "weights_only=True" in text[m.end():i], f"{f}: {text[m.start():i]}"
                found += 1
            assert not re.search(r"\bpickle\.loads?\(|\bimport pickle\b", text), f
    assert found >= 1  # checkpoint.load


def test_reward_functions_come_only_from_the_named_path(tmp_path, monkeypatch):
    """A file spec loads exactly that file: a same-named module earlier on sys.path does not shadow
    it, the file's directory is not added to sys.path, and the module is not registered under its
    plain name (so a later `import` elsewhere cannot pick it up)."""
    from prefalign.online.rewards import load_reward

    named, decoy = tmp_path / "named", tmp_path / "decoy"
    named.mkdir()
    decoy.mkdir()
    (named / "scores.py").write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    (decoy / "scores.py").write_text("def score(prompts, completions):\n    return [-1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(decoy))
    path_before = list(sys.path)
    assert load_reward(f"{named}/scores.py:score")(["p"], ["c"]) == [1.0]
    assert sys.path == path_before and "scores" not in sys.modules
    assert load_reward("scores:score")(["p"], ["c"]) == [-1.0]  # a module spec is that module, by import
