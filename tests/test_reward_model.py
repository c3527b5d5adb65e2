"""`prefalign reward` (a Bradley-Terry reward model) and the `rm:PATH` reward spec.

The loss against hand-derived values and a naive reference (forward and backward); held-out
accuracy on the demo task's kind of pairs; the saved folder loads with
AutoModelForSequenceClassification and scores the same; a resumed run ends with exactly the
weights of an uninterrupted one; `rm:PATH` scores as the model does, and drives a GRPO run.
(`rm:PATH` on classifiers not trained by prefalign: tests/test_rewards.py.)
"""

import json
import math
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from prefalign.cli import main
from prefalign.errors import UserError
from prefalign.losses.reward import bradley_terry
from prefalign.online.rewards import load_reward
from prefalign.reward_config import RewardConfig
from prefalign.reward_model import RewardModelScorer, load_scorer, sequence_scores
from prefalign.reward_train import train_reward
from test_train import assert_same_weights, run_files  # noqa: F401 (run_files: fixture)


# ----------------------------------------------------------------------------------------------
# The loss


def test_loss_hand_derived_values():
    # pair 1: d = 1, m = 0.5: -log s(0.5) = log(1 + e^-0.5) = 0.474077; centering 0.1 * (1 + 0)^2 = 0.1
    # pair 2: d = -1, m = 0:  log(1 + e) = 1.313262;                    centering 0.1 * 1^2 = 0.1
    # pair 3: d = 0, m = 1:   -log s(-1) = log(1 + e) = 1.313262;       centering 0.1 * (-4)^2 = 1.6
    chosen = torch.tensor([1.0, 0.0, -2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    out = bradley_terry(chosen, rejected, torch.tensor([0.5, 0.0, 1.0]), center_coef=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.574077, 1.413262, 2.913262]), atol=1e-6, rtol=0)
    assert out.correct.tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    assert out.margins.tolist() == [1.0, -1.0, 0.0]
    out.losses.mean().backward()
    # d/dr_c = (-(1 - s(d - m)) + 2c (r_c + r_r)) / 3; d/dr_r = (+(1 - s(d - m)) + 2c (r_c + r_r)) / 3.
    # pair 1: 1 - s(0.5) = 0.377541, 2c(r_c + r_r) = 0.2
    torch.testing.assert_close(chosen.grad[0], torch.tensor((-0.377541 + 0.2) / 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(rejected.grad[0], torch.tensor((0.377541 + 0.2) / 3), atol=1e-6, rtol=0)


def _naive(chosen, rejected, margin, coef):
    """The formula in plain Python: mean of -log(1 / (1 + exp(-(c - r - m)))) + coef * (c + r)^2."""
    terms = [-math.log(1 / (1 + math.exp(-(c - r - m)))) + coef * (c + r) ** 2
             for c, r, m in zip(chosen, rejected, margin)]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("coef,with_margin", [(0.0, False), (0.0, True), (0.05, False), (0.05, True)])
def test_loss_and_gradient_equal_naive_reference(coef, with_margin):
    g = torch.Generator().manual_seed(3)
    chosen, rejected = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(2))
    margin = torch.rand(7, generator=g, dtype=torch.float64) if with_margin else torch.zeros(7, dtype=torch.float64)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss = bradley_terry(c, r, margin if with_margin else None, coef).losses.mean()
    values = [chosen.tolist(), rejected.tolist()]
    assert loss.item() == pytest.approx(_naive(*values, margin.tolist(), coef), abs=1e-6)
    loss.backward()
    eps = 1e-6  # central differences of the naive formula, one score at a time
    for side, grad in ((0, c.grad), (1, r.grad)):
        for i in range(7):
            up, down = [list(v) for v in values], [list(v) for v in values]
            up[side][i] += eps
            down[side][i] -= eps
            numeric = (_naive(*up, margin.tolist(), coef) - _naive(*down, margin.tolist(), coef)) / (2 * eps)
            assert grad[i].item() == pytest.approx(numeric, abs=1e-5)


def test_loss_is_finite_for_large_score_gaps():
    out = bradley_terry(torch.tensor([200.0, -200.0]), torch.tensor([0.0, 0.0]))
    assert out.losses[0].item() == 0.0 and out.losses[1].item() == pytest.approx(200.0)


# ----------------------------------------------------------------------------------------------
# Training on the demo task's pairs


def demo_pairs(problems, seed):
    """The demo task's failure modes as rejected completions: a wrong answer (the careless teacher's
    slips: forgotten carry, off by one, swapped digits) or, half the time, a run-on (the right answer,
    then a new problem started, as an undertrained sampler writes). Chosen: the right answer."""
    from prefalign.demo import task

    rng = random.Random(seed)
    rows = []
    for p in problems:
        kinds = [k for k in task.NOISE_KINDS if k != "forgot_carry" or p.carries]
        wrong = task.format_completion(task.wrong_answer(p, rng.choice(kinds), rng))
        if rng.random() < 0.5:
            wrong = task.format_completion(p.answer) + "+" + str(rng.randrange(10))
        rows.append({"prompt": p.prompt, "chosen": task.format_completion(p.answer), "rejected": wrong})
    return rows


def write_rows(path, rows):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_reward_model_learns_demo_pairs_above_chance(tmp_path):
    """Held-out prompts (disjoint from training ones): accuracy > 0.6 after 8 steps of 32 pairs. An
    untrained score head is at chance (0.5 in expectation); the run-on half alone is learnable to
    near 100%, so a working loop lands near 0.75 (0.80, 0.75, 0.74 measured for seeds 0-2), and 0.6 leaves room for
    seeds while a loop that learns nothing (100 pairs: sd 0.05 around 0.5) stays below it."""
    from prefalign.demo import task
    from prefalign.demo.model import build_model
    from prefalign.demo.tokenizer import build_tokenizer

    splits = task.make_splits(0, n_heldout=100)
    train = write_rows(tmp_path / "train.jsonl", demo_pairs(task.sample_problems(splits.train, 256, 0), 0))
    held_out = write_rows(tmp_path / "heldout.jsonl", demo_pairs(splits.heldout, 1))
    tok = build_tokenizer()
    cfg = RewardConfig(data=train, eval_data=held_out, output=str(tmp_path / "rm"), max_steps=8, batch_size=32,
                       lr=3e-3, lr_schedule="constant", max_length=16, progress=False)
    result = train_reward(cfg, model=build_model(tok), tokenizer=tok)
    assert result.final_eval["rewards/accuracies"] > 0.6, result.final_eval
    assert result.final_eval["loss"] < math.log(2)
    logged = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, 9)) + [8]  # the last line: the held-out figures
    assert logged[-1]["eval/rewards/accuracies"] == result.final_eval["rewards/accuracies"]


# ----------------------------------------------------------------------------------------------
# Saving, loading, scoring


def items_of(path, tok):
    from prefalign.data.formats import load_examples
    from prefalign.data.tokenize import tokenize_examples

    return tokenize_examples(load_examples(path, kind="paired").examples, tok, max_length=64).items


@pytest.mark.parametrize("lora_r", [0, 4])
def test_saved_model_loads_and_scores_the_same(run_files, tmp_path, lora_r):  # noqa: F811
    cfg = RewardConfig(model=run_files["model"], data=run_files["data"], output=str(tmp_path / "rm"), max_steps=2,
                       batch_size=4, lr=1e-2, max_length=64, progress=False, lora_r=lora_r, margin_column="",
                       center_coef=0.01)
    result = train_reward(cfg)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model").eval()
    assert type(loaded).__name__ == "LlamaForSequenceClassification" and loaded.config.num_labels == 1
    items = items_of(run_files["eval"], result.tokenizer)
    seqs = [it.prompt_ids + it.chosen_ids for it in items] + [it.prompt_ids + it.rejected_ids for it in items]
    with torch.no_grad():
        trained = sequence_scores(result.model.eval(), seqs)
        again = sequence_scores(loaded, seqs)
        alone = torch.cat([sequence_scores(loaded, [s]) for s in seqs])  # padding does not move a score
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, trained, atol=1e-5, rtol=1e-5)
    if lora_r:  # the adapters and the head trained, and were merged into what was saved
        assert any("lora_" in n for n, p in result.model.named_parameters() if p.requires_grad)
        assert any("score" in n for n, p in result.model.named_parameters() if p.requires_grad)


def reward_args(run_files, out, *extra):
    return ["reward", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
            "--batch-size", "4", "--lr", "1e-2", "--lr-schedule", "constant", "--max-length", "64",
            "--no-progress", "--center-coef", "0.01", *extra]


def model_weights(out):
    return load_file(os.path.join(out, "model", "model.safetensors"))


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_resumed_runs_end_with_the_weights_of_an_uninterrupted_one(run_files, tmp_path, capsys):  # noqa: F811
    whole = tmp_path / "whole"
    assert main(reward_args(run_files, whole, "--max-steps", "6", "--save-every", "3")) == 0
    # A run killed after its step-3 checkpoint: the later checkpoint and the model never written.
    crashed = tmp_path / "crashed"
    shutil.copytree(whole, crashed)
    shutil.rmtree(crashed / "model")
    shutil.rmtree(crashed / "checkpoints" / "step-000006")
    assert main(reward_args(run_files, crashed, "--max-steps", "6", "--save-every", "3", "--resume", "auto")) == 0
    # A run of 2 steps, continued to 6 (16 pairs of 4: the continuation crosses an epoch boundary).
    split = tmp_path / "split"
    assert main(reward_args(run_files, split, "--max-steps", "2")) == 0
    # The continuation names only the run: its settings come from its config.yaml.
    assert main(["reward", "--output", str(split), "--resume", "auto", "--max-steps", "6", "--no-progress"]) == 0
    for out in (crashed, split):
        assert_same_weights(model_weights(out), model_weights(whole), atol=0)
        assert [r["step"] for r in metrics(out)] == list(range(1, 7))
        assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(whole)]
    capsys.readouterr()
    # The same directory again: refused without --resume / --overwrite; a changed run refused on resume.
    assert main(reward_args(run_files, whole, "--max-steps", "6")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(reward_args(run_files, split, "--max-steps", "8", "--resume", "auto", "--lr", "2e-2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run changed (lr: 0.01 -> 0.02)" in err[0], err


def test_bf16_autocast_scores_like_fp32_and_keeps_fp32_weights(run_files, tmp_path):  # noqa: F811
    """--precision bf16: matmuls under autocast, the weights (master copy) and the scores stay fp32.
    Step 1's loss is computed by the same initial model in both runs, so it agrees to bf16's rounding;
    config.yaml and the run summary record the precision that ran; --attention reaches the model."""
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(reward_args(run_files, out, "--max-steps", "3", "--precision", precision,
                                "--attention", "eager")) == 0
        runs[precision] = out
    fp32, bf16 = metrics(runs["fp32"]), metrics(runs["bf16"])
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2) and bf16[0]["loss"] != fp32[0]["loss"]
    weights = model_weights(runs["bf16"])
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w, model_weights(runs["fp32"])[k]) for k, w in weights.items())
    import yaml

    saved = yaml.safe_load(open(runs["bf16"] / "config.yaml"))
    assert saved["precision"] == "bf16" and saved["attention"] == "eager"
    loaded = AutoModelForSequenceClassification.from_pretrained(runs["bf16"] / "model")
    assert loaded.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex_attention trains on CUDA")
def test_flex_attention_on_cpu_is_refused_before_anything_is_written(run_files, tmp_path, capsys):  # noqa: F811
    assert main(reward_args(run_files, tmp_path / "flex", "--max-steps", "1", "--attention", "flex_attention")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention flex_attention" in err[0] and "CUDA" in err[0], err
    assert not os.path.exists(tmp_path / "flex")


def test_bad_rows_and_margins_are_user_errors(run_files, tmp_path, capsys):  # noqa: F811
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c", "m": 1},
                                              {"prompt": "a", "chosen": " b"}])
    assert main(reward_args(run_files, tmp_path / "o1", "--data", bad, "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl" in err[0] and "row 2" in err[0], err
    rows = [{"prompt": f"p{i} ?", "chosen": " yes", "rejected": " no", "m": 0.5} for i in range(4)]
    rows[2]["m"] = "high"
    margins = write_rows(tmp_path / "m.jsonl", rows)
    assert main(reward_args(run_files, tmp_path / "o2", "--data", margins, "--margin-column", "m",
                            "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 3" in err[0] and "'m'" in err[0] and "finite number" in err[0], err
    assert not os.path.exists(tmp_path / "o2")  # a failed start leaves nothing behind


# ----------------------------------------------------------------------------------------------
# The rm:PATH reward


@pytest.fixture(scope="module")
def trained_rm(run_files, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("rm") / "run"
    cfg = RewardConfig(model=run_files["model"], data=run_files["data"], output=str(out), max_steps=2, batch_size=4,
                       lr=1e-2, max_length=64, progress=False)
    train_reward(cfg)
    return str(out / "model")


def test_rm_spec_scores_as_the_model_does(run_files, trained_rm):  # noqa: F811
    rows = [json.loads(line) for line in open(run_files["eval"])]
    prompts, completions = [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    reward = load_reward(f"rm:{trained_rm}")
    got = reward(prompts, completions)
    scorer = load_scorer(trained_rm, batch_size=3)  # other batches, other padding: the same scores
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm).eval()
    items = items_of(run_files["eval"], scorer.tokenizer)  # the training data's tokens
    with torch.no_grad():
        direct = sequence_scores(model, [it.prompt_ids + it.chosen_ids for it in items]
                                 + [it.prompt_ids + it.rejected_ids for it in items]).tolist()
    assert got == pytest.approx(direct, abs=1e-5)
    assert scorer(prompts, completions) == pytest.approx(direct, abs=1e-5)
    assert isinstance(scorer, RewardModelScorer) and len(got) == 12


def test_rm_spec_refuses_what_is_not_a_reward_model(run_files, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match=r"rm:.*not a reward model \(LlamaForCausalLM\)") as e:
        load_reward(f"rm:{run_files['model']}")
    assert "\n" not in str(e.value) and "`prefalign reward`" in str(e.value)  # one line, naming the fixes
    assert "AutoModelForSequenceClassification folder" in str(e.value)
    with pytest.raises(UserError, match="no such directory"):
        load_reward(f"rm:{tmp_path / 'nothing'}")


def test_grpo_runs_on_a_reward_model(run_files, trained_rm, tmp_path, capsys):  # noqa: F811
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} ?"} for i in range(4)])
    out = tmp_path / "grpo"
    rc = main(["grpo", "--model", run_files["model"], "--prompts", prompts, "--reward", f"rm:{trained_rm}",
               "--output", str(out), "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
               "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(logged) == 2 and all(math.isfinite(r["reward/mean"]) for r in logged)
    assert any(r["reward/std"] > 0 for r in logged)  # real scores, not a constant


def test_rm_spec_renders_chat_when_the_reward_model_trained_on_conversations(tmp_path):
    """Trained on conversations, the reward model scores (prompt, completion) text through its chat
    template: the same tokens, so the same scores, as the training pairs had."""
    from tiny import make_model, make_tokenizer

    tok = make_tokenizer(chat_template=True)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1 ?"}],
             "chosen": [{"role": "assistant", "content": f"It is {i + 1}."}],
             "rejected": [{"role": "assistant", "content": "I do not know."}]} for i in range(4)]
    data = write_rows(tmp_path / "chat.jsonl", rows)
    cfg = RewardConfig(data=data, output=str(tmp_path / "rm"), max_steps=1, batch_size=4, lr=1e-2, max_length=64,
                       progress=False)
    result = train_reward(cfg, model=make_model("llama", seed=0), tokenizer=tok)
    items = items_of(data, tok)
    with torch.no_grad():
        direct = sequence_scores(result.model.eval(), [it.prompt_ids + it.chosen_ids for it in items]).tolist()
    got = load_reward(f"rm:{tmp_path / 'rm' / 'model'}")([r["prompt"][0]["content"] for r in rows],
                                                           [r["chosen"][0]["content"] for r in rows])
    assert got == pytest.approx(direct, abs=1e-5)
    plain = RewardModelScorer(result.model, tok, {"chat": False, "max_length": 64})
    assert plain.tokenize(["a"], ["b"]) != load_scorer(str(tmp_path / "rm" / "model")).tokenize(["a"], ["b"])
