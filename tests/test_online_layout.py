"""The online loops share train's paths: the output-dir lock and guard (rundir), model loading
(prepare: LoRA, attention), the autocast helper; and their renamed settings keep the old names
as aliases (GRPO's kl_coef <- beta, iterate's ref_update <- reference)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from prefalign import cli
from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.online.grpo import GRPOConfig, grpo
from prefalign.online.iterative import IterativeConfig, iterate

PROMPTS = [{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(4)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok):
    return build_model(tok, seed=0, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("model")
    tiny(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return str(path)


def grpo_argv(model, prompts, output, *extra):
    return ["grpo", "--model", model, "--prompts", prompts, "--reward", "regex=1", "--output", str(output),
            "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "2",
            "--no-progress", "--no-save-model", *extra]


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefalign: error")]


# ---------------------------------------------------------------------------------------------- output dir


def test_a_second_grpo_run_into_a_held_output_is_refused(tmp_path, capsys, saved_model, prompts_file):
    out = tmp_path / "run"
    # Another process holds OUTPUT as a running GRPO does (rundir.claim: flock on OUTPUT/.lock).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, types; from prefalign import rundir\n"
         f"with rundir.claim(types.SimpleNamespace(output={str(out)!r}, overwrite=False, resume='')):\n"
         "    print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(grpo_argv(saved_model, prompts_file, out)) == 2
        err = errors(capsys)
        assert len(err) == 1 and f"is in use by pid {holder.pid}" in err[0], err
        assert sorted(os.listdir(out)) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert cli.main(grpo_argv(saved_model, prompts_file, out)) == 0  # released: the next run goes ahead
    assert not os.path.exists(out / ".lock")


def test_grpo_refuses_a_directory_of_other_files(tmp_path, capsys, saved_model, prompts_file):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    assert cli.main(grpo_argv(saved_model, prompts_file, out)) == 2
    err = errors(capsys)
    assert len(err) == 1 and "is not empty and holds no prefalign run (thesis.tex)" in err[0], err
    assert sorted(os.listdir(out)) == ["thesis.tex"]
    assert cli.main(grpo_argv(saved_model, prompts_file, out, "--overwrite")) == 0
    assert (out / "thesis.tex").read_text() == "mine"  # --overwrite writes beside them, deletes none
    assert os.path.isfile(out / "metrics.jsonl")


def test_a_finished_online_run_needs_overwrite(tmp_path, capsys, saved_model, prompts_file):
    out = tmp_path / "run"
    assert cli.main(grpo_argv(saved_model, prompts_file, out)) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 1 and saved["reward"] == ["regex=1"]
    assert cli.main(grpo_argv(saved_model, prompts_file, out, "--steps", "2")) == 2
    err = errors(capsys)
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0], err
    assert len(open(out / "metrics.jsonl").readlines()) == 1  # untouched
    assert cli.main(grpo_argv(saved_model, prompts_file, out, "--steps", "2", "--overwrite")) == 0
    assert len(open(out / "metrics.jsonl").readlines()) == 2
    # iterate takes the same guard: the GRPO run is not written over
    assert cli.main(["iterate", "--model", saved_model, "--prompts", prompts_file, "--reward", "regex=1",
                     "--output", str(out), "--rounds", "1", "--prompts-per-round", "2", "--samples", "2",
                     "--no-progress", "--no-save-model"]) == 2
    assert "already holds a run" in errors(capsys)[0]


# ---------------------------------------------------------------------------------------------- models


def test_grpo_with_lora_trains_only_the_adapters(tok, tmp_path):
    start = tiny(tok)
    base = {k: v.clone() for k, v in start.state_dict().items()}
    cfg = GRPOConfig(output=str(tmp_path / "run"), steps=3, prompts_per_step=4, group_size=4, max_new_tokens=2,
                     lr=1e-2, kl_coef=0.1, lora_r=4, progress=False, save_model=False)
    res = grpo(cfg, model=start, tokenizer=tok, prompts=PROMPTS,
               reward=lambda prompts, completions: [float(c[:1].isdigit()) for c in completions])
    named = dict(res.policy.named_parameters())
    assert named and all(("lora_" in n) == p.requires_grad for n, p in named.items())
    merged_away = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in named.items()
                   if "lora_" not in n}
    assert merged_away and set(merged_away) <= set(base)  # (a tied lm_head is no parameter of its own)
    assert all(torch.equal(p, base[n]) for n, p in merged_away.items())  # the base never moved
    assert any(not torch.all(p == 0) for n, p in named.items() if "lora_B" in n)  # the adapters did
    # The reference is the policy with its adapters off: at step 1 (B = 0) it is the policy exactly.
    assert res.history[0]["kl"] == 0.0 and res.history[-1]["kl"] > 0


def test_grpo_cli_with_lora_saves_an_adapter(tmp_path, saved_model, prompts_file):
    out = tmp_path / "run"
    argv = grpo_argv(saved_model, prompts_file, out, "--lora-r", "2", "--kl-coef", "0.1")
    assert cli.main([a for a in argv if a != "--no-save-model"]) == 0
    assert os.path.isfile(out / "model" / "adapter_config.json")
    assert not os.path.isfile(out / "model" / "config.json")


def test_online_loops_load_with_the_attention_asked_for(tok, tmp_path):
    cfg = GRPOConfig(output=str(tmp_path / "g"), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2,
                     attention="eager", kl_coef=0.1, progress=False, save_model=False)
    res = grpo(cfg, model=tiny(tok), tokenizer=tok, prompts=PROMPTS, reward="regex=1")
    assert res.policy.config._attn_implementation == "eager"
    with pytest.raises(Exception, match="attention"):
        GRPOConfig(attention="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex_attention trains on CUDA")
@pytest.mark.parametrize("command", ["grpo", "iterate"])
def test_flex_attention_training_on_cpu_is_one_line(tmp_path, capsys, saved_model, prompts_file, command):
    argv = grpo_argv(saved_model, prompts_file, tmp_path / "run", "--attention", "flex_attention")
    if command == "iterate":
        argv = ["iterate", "--model", saved_model, "--prompts", prompts_file, "--reward", "regex=1", "--output",
                str(tmp_path / "run"), "--attention", "flex_attention"]
    assert cli.main(argv) == 2
    err = errors(capsys)
    assert len(err) == 1 and "flex_attention: training needs a CUDA GPU" in err[0], err
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_beta_is_another_name_for_kl_coef(tmp_path, saved_model, prompts_file, how):
    out = tmp_path / "run"
    argv = grpo_argv(saved_model, prompts_file, out)
    if how == "flag":
        argv += ["--beta", "0.25"]
    else:
        (tmp_path / "c.yaml").write_text("beta: 0.25\n")
        argv += ["--config", str(tmp_path / "c.yaml")]
    assert cli.main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["kl_coef"] == 0.25 and "beta" not in saved
    assert "kl" in json.loads(open(out / "metrics.jsonl").readline())  # a reference was used


@pytest.mark.parametrize("argv, words", [
    (["--beta", "0.1", "--kl-coef", "0.2"], "both set kl_coef"),
    (["--beta", "-1"], "kl_coef"),
])
def test_kl_coef_under_two_names_or_out_of_range_is_refused(tmp_path, capsys, saved_model, prompts_file, argv,
                                                           words):
    assert cli.main(grpo_argv(saved_model, prompts_file, tmp_path / "run", *argv)) == 2
    err = errors(capsys)
    assert len(err) == 1 and words in err[0], err
    assert not os.path.exists(tmp_path / "run")


def test_reference_is_another_name_for_ref_update(tmp_path):
    parser = cli.build_parser()
    from prefalign.online.cli import from_flags

    (tmp_path / "c.yaml").write_text("reference: moving\n")
    by_flag = from_flags(IterativeConfig, parser.parse_args(["iterate", "--reference", "moving"]))
    by_file = from_flags(IterativeConfig, parser.parse_args(["iterate"]), str(tmp_path / "c.yaml"))
    assert by_flag.ref_update == by_file.ref_update == "moving"
    assert IterativeConfig().ref_update == "fixed"


def test_iterate_moving_reference_through_the_new_name(tok, tmp_path):
    cfg = IterativeConfig(output=str(tmp_path / "i"), rounds=1, prompts_per_round=4, samples=2, max_new_tokens=2,
                          dpo_steps=1, batch_size=1, ref_update="moving", attention="eager", progress=False,
                          save_model=False)
    res = iterate(cfg, model=tiny(tok), tokenizer=tok, prompts=PROMPTS, reward=lambda p, c: [float(len(x)) for x in c])
    assert res.policy.config._attn_implementation == "eager"
    assert yaml.safe_load((tmp_path / "i" / "config.yaml").read_text())["ref_update"] == "moving"
