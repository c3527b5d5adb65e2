"""The Python API: `from prefalign import TrainConfig, train, sft, evaluate, generate` on
in-process tiny models and in-memory data, the same runs the CLI makes."""

import math
import os
import subprocess
import sys

import pytest
import torch

from tiny import make_model, make_tokenizer

ROWS = [{"prompt": f"Question: what is {i} + {i}? Answer:", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}."}
        for i in range(8)]


def test_import_is_light():
    code = ("import sys, prefalign; assert prefalign.__version__; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_online_methods_and_reward_model_from_the_package(tmp_path):
    """The docs/python.md GRPO example on a tiny model, imported from the package itself; every exported
    online name is the function or class the CLI runs."""
    import prefalign
    from prefalign import GRPOConfig, grpo
    from prefalign.online import grpo as grpo_module, iterative, ppo, settings
    from prefalign import reward_config, reward_train

    assert (prefalign.grpo, prefalign.ppo, prefalign.iterate, prefalign.train_reward) == (
        grpo_module.grpo, ppo.ppo, iterative.iterate, reward_train.train_reward)
    assert (prefalign.GRPOConfig, prefalign.PPOConfig, prefalign.IterativeConfig, prefalign.RewardConfig) == (
        settings.GRPOConfig, settings.PPOConfig, settings.IterativeConfig, reward_config.RewardConfig)
    assert set(prefalign._LAZY) <= set(dir(prefalign))

    def starts_with_7(prompts, completions, **_):
        return [float(c.startswith("7")) for c in completions]

    model, tokenizer = make_model("llama", seed=0), make_tokenizer()
    cfg = GRPOConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=4, lr=1e-3, output=str(tmp_path / "g"),
                     progress=False)
    result = grpo(cfg, model=model, tokenizer=tokenizer, prompts=[{"prompt": f"{i}+4="} for i in range(8)],
                  reward=starts_with_7)
    assert [r["step"] for r in result.history] == [1, 2]
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in result.history)
    assert os.path.isfile(tmp_path / "g" / "model" / "config.json") and result.policy is model


def test_the_readme_example(tmp_path):
    # The example of docs/python.md, on a tiny model and a list of dicts.
    import prefalign
    from prefalign import TrainConfig, train

    model, tokenizer = make_model("llama", seed=0), make_tokenizer()
    cfg = TrainConfig(loss="dpo", beta=0.1, lr=1e-3, max_steps=3, batch_size=4, max_length=64)
    result = train(cfg, model=model, tokenizer=tokenizer, data=ROWS, output=str(tmp_path / "run"))

    assert train is prefalign.api.train  # a plain function (the trainer is prefalign.trainer)
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert result.history[-1]["loss"] < math.log(2)
    assert result.policy is model  # trained in place
    # The data went through the data layer from a file, and the saved model reloads equal.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(make_model("llama", seed=0)(ids).logits, reloaded(ids).logits, atol=1e-4)


def test_keyword_fields_dataset_sft_evaluate_generate(tmp_path):
    import datasets

    from prefalign import TrainConfig, evaluate, generate, sft, train

    tok = make_tokenizer()
    # keywords instead of a TrainConfig, a datasets.Dataset as data, paths as models
    base = tmp_path / "base"
    make_model("llama", seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    r = train(model=str(base), data=datasets.Dataset.from_list(ROWS), loss="ipo", max_steps=2, batch_size=4,
              lr=1e-3, max_length=64, output=str(tmp_path / "ipo"))
    assert r.steps == 2 and len(r.history) == 2 and os.path.isfile(tmp_path / "ipo" / "model" / "model.safetensors")

    s = sft(TrainConfig(max_steps=2, batch_size=2, max_length=32), model=make_model("llama", seed=0), tokenizer=tok,
            data=[{"prompt": "a", "completion": " b"}] * 4, output=str(tmp_path / "sft"))
    assert s.history[-1]["loss"] < s.history[0]["loss"]
    assert "rewards/accuracies" not in s.history[0]  # loss sft, although TrainConfig's default loss is dpo

    same = evaluate(str(base), str(base), ROWS, batch_size=4, max_length=64)
    assert same["pairs"] == 8 and same["rewards/margins"] == pytest.approx(0, abs=1e-6)
    trained = evaluate(tmp_path / "ipo" / "model", base, ROWS, batch_size=4, max_length=64)
    assert trained["rewards/margins"] > 0

    gens = generate(make_model("llama", seed=0), tok, ["Question: what", "The quick"], max_new_tokens=4,
                    temperature=0)
    assert len(gens.texts) == 2 and all(0 < len(t) <= 4 for t in gens.token_ids)


def test_bad_data_is_a_user_error(tmp_path):
    from prefalign import train
    from prefalign.errors import UserError

    with pytest.raises(UserError, match="list of dicts"):
        train(model=make_model(), tokenizer=make_tokenizer(), data=[1, 2], output=str(tmp_path / "x"))
    with pytest.raises(UserError, match="needs its tokenizer"):
        train(model=make_model(), data=ROWS, output=str(tmp_path / "y"))


def test_losses_are_exported():
    from prefalign.losses import dpo, ipo, kto, simpo

    z = torch.zeros(3)
    assert dpo(z, z, z, z).losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert ipo(z, z, z, z, beta=0.1).losses.tolist() == pytest.approx([25.0] * 3)
    assert callable(kto) and callable(simpo)


def test_a_run_leaves_the_callers_config_as_given(tmp_path):
    """precision "auto" is resolved for the run (config.yaml records it), not written into the caller's object."""
    from prefalign import GRPOConfig, grpo

    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2, precision="auto",
                     output=str(tmp_path / "g"), progress=False, save_model=False)
    grpo(cfg, model=make_model("llama", seed=0), tokenizer=make_tokenizer(), prompts=[{"prompt": "1+1="}] * 2,
         reward=lambda prompts, completions, **_: [0.0] * len(completions))
    assert cfg.precision == "auto"
    import yaml

    assert yaml.safe_load(open(tmp_path / "g" / "config.yaml"))["precision"] in ("fp32", "bf16")
