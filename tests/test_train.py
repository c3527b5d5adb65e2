"""The offline loop: accumulation invariance, exact resume, LoRA and reference strategies,
every loss through the loop, the CLI end to end with a reload in transformers."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from prefalign import config, logprobs, trainer
from prefalign.cli import main
from prefalign.losses import LOSSES
from tiny import make_model, make_tokenizer

WORDS = "the quick brown fox jumps over lazy dog answer question paris four five sea sky poem".split()


def _text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_pairs(path, n=16, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            row = {"prompt": _text(rng, 2, 6) + " ?", "chosen": " " + _text(rng, 1, 5), "rejected": " " + _text(rng, 1, 5)}
            if row["chosen"] == row["rejected"]:
                row["rejected"] += " no"
            fh.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model_dir = d / "model"
    make_model("llama", seed=0).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    return {"model": str(model_dir), "data": write_pairs(d / "pairs.jsonl", 16),
            "eval": write_pairs(d / "eval.jsonl", 6, seed=1)}


def cfg_for(run_files, out, **kw):
    values = dict(model=run_files["model"], data=run_files["data"], output=str(out), lr=1e-3, lr_schedule="constant",
                  max_steps=2, batch_size=4, max_length=64, progress=False, seed=0,
                  packing=False)
    values.update(kw)
    return config.build(values)


def weights(path):
    return load_file(os.path.join(path, "model", "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_invariance(run_files, tmp_path, packing):
    """8 pairs x 1 micro-batch == 2 pairs x 4 micro-batches: same loss, same weights after a step."""
    a = trainer.train(cfg_for(run_files, tmp_path / "a", max_steps=1, batch_size=8, grad_accum=1, packing=packing))
    b = trainer.train(cfg_for(run_files, tmp_path / "b", max_steps=1, batch_size=2, grad_accum=4, packing=packing))
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-6)
    assert a.history[0]["rewards/margins"] == pytest.approx(b.history[0]["rewards/margins"], abs=1e-7)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_kto_accumulation_invariance(run_files, tmp_path):
    """KTO's KL reference point is estimated over the whole step, so 8 x 1 == 2 x 4 holds for KTO too."""
    a = trainer.train(cfg_for(run_files, tmp_path / "a", loss="kto", max_steps=2, batch_size=8, grad_accum=1))
    b = trainer.train(cfg_for(run_files, tmp_path / "b", loss="kto", max_steps=2, batch_size=2, grad_accum=4))
    for x, y in zip(a.history, b.history):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-6)
    assert a.history[1]["kl"] != 0  # after one update the policy has moved: a real estimate
    # Adam divides by sqrt(v) + eps, so gradient entries near eps turn float rounding of the summed
    # micro-batches into update differences of a few 1e-6; 1e-5 is 1% of one lr-sized update.
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"), atol=1e-5)


def test_step1_is_before_the_first_update(run_files, tmp_path):
    """Step 1 logs the first batch's forward before any update: policy == reference, so rewards are 0."""
    r = trainer.train(cfg_for(run_files, tmp_path / "o", max_steps=2))
    first = r.history[0]
    assert first["step"] == 1
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # -log sigmoid(0)
    assert r.history[1]["rewards/margins"] != pytest.approx(0, abs=1e-7)
    lines = [json.loads(x) for x in open(tmp_path / "o" / "metrics.jsonl")]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logps/chosen_mean", "logratio/pairs", "grad_norm", "lr",
                "pairs_per_s", "tokens_per_s", "peak_memory_mb"):
        assert key in lines[0], key
    assert (tmp_path / "o" / "plots" / "loss.png").exists()


def test_resume_equals_uninterrupted(run_files, tmp_path):
    full = trainer.train(cfg_for(run_files, tmp_path / "full", max_steps=6, save_every=3))
    part = trainer.train(cfg_for(run_files, tmp_path / "part", max_steps=6, save_every=3))
    # Simulate a crash after step 3: drop everything past the step-3 checkpoint, then resume.
    ckpts = sorted(os.listdir(tmp_path / "part" / "checkpoints"))
    assert ckpts == ["step-000003", "step-000006"]
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "part" / "model")
    resumed = trainer.train(cfg_for(run_files, tmp_path / "part", max_steps=6, save_every=3, resume="auto"))
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"), atol=0)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert resumed.history[-1]["loss"] == full.history[-1]["loss"]


def test_lora_trains_only_adapters_and_adapters_off_is_the_base(run_files, tmp_path):
    base = make_model("llama", seed=0)
    r = trainer.train(cfg_for(run_files, tmp_path / "lora", lora_r=4, max_steps=2, lr=1e-2))
    policy = r.policy
    assert r.history[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # adapters-off reference == start
    for name, p in policy.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    changed = [n for n, p in policy.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed, "LoRA B matrices start at zero and must have moved"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with policy.disable_adapter(), torch.no_grad():
        off = logprobs.sequence_logps(policy, ids, mask, labels).sum
    with torch.no_grad():
        ref = logprobs.sequence_logps(base, ids, mask, labels).sum
        on = logprobs.sequence_logps(policy, ids, mask, labels).sum
    torch.testing.assert_close(off, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(on, ref, atol=1e-4)
    assert os.path.isfile(tmp_path / "lora" / "model" / "adapter_model.safetensors")


def test_precomputed_reference_equals_live(run_files, tmp_path):
    live = trainer.train(cfg_for(run_files, tmp_path / "live", max_steps=3, reference="copy"))
    pre = trainer.train(cfg_for(run_files, tmp_path / "pre", max_steps=3, reference="precomputed"))
    for a, b in zip(live.history, pre.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert any(f.startswith("ref-") for f in os.listdir(tmp_path / "pre" / "ref_cache"))


def test_packed_step_equals_padded_step(run_files, tmp_path):
    """Prefix-shared packing changes the layout, not the math: same loss and weights after 2 steps."""
    a = trainer.train(cfg_for(run_files, tmp_path / "pad", max_steps=2, packing=False))
    b = trainer.train(cfg_for(run_files, tmp_path / "pack", max_steps=2, packing=True, token_budget=96))
    for x, y in zip(a.history, b.history):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["logps/chosen"] == pytest.approx(y["logps/chosen"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "pad"), weights(tmp_path / "pack"), atol=1e-5)


def assert_trend(values, sign, what):
    """values moved in direction sign (+1 up, -1 down) from first to last by more than the
    largest step-to-step move against it in the same run: the trend beats the run's own noise."""
    steps = [sign * (b - a) for a, b in zip(values, values[1:])]
    gain, worst_setback = sign * (values[-1] - values[0]), max([0.0] + [-d for d in steps])
    assert gain > worst_setback, f"{what} did not move {'up' if sign > 0 else 'down'}: {values}"


def margin_direction(spec, first):
    """Which way gradient descent on the loss moves the chosen-minus-rejected margin from the
    run's starting point: minus the sign of d loss / d margin there. Reference losses start at
    logratios 0 (policy == reference); reference-free ones at the run's first mean log-probs.
    Monotone losses give +1; DiscoPOP's log-ratio modulation gives -1 at margin 0 (with its
    tau of 0.05 the mixing term's slope beats the logistic one), so it is not hard-coded."""
    if spec.kind == "unpaired":
        return 1  # KTO raises desirable rewards and lowers undesirable ones by construction
    t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    if spec.needs_reference:
        chosen = rejected = torch.zeros(1, dtype=torch.float64)
        rest = [chosen, rejected]
    else:
        chosen, rejected = (torch.tensor([first[k]], dtype=torch.float64)
                            for k in ("logps/chosen_mean", "logps/rejected_mean"))
        rest = []
    loss = spec.fn(chosen + t, rejected - t, *rest).losses.sum()
    (slope,) = torch.autograd.grad(loss, t)
    assert slope.item() != 0, f"{spec.name}: the loss is flat in the margin at the start"
    return -1 if slope.item() > 0 else 1


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains(run_files, tmp_path, loss):
    """A learnable toy: the same 4 pairs (8 KTO examples) in every step. The loss must go down
    and the reward margin move the way the loss's own gradient says, beyond the run's noise."""
    spec = LOSSES[loss]
    # packing on: KTO's unpaired rows and the pairs both go through the packed path
    r = trainer.train(cfg_for(run_files, tmp_path / loss, data=write_pairs(tmp_path / "four.jsonl", 4), loss=loss,
                              max_steps=6, batch_size=8 if spec.kind == "unpaired" else 4, save_model=False,
                              packing=True))
    assert [h["step"] for h in r.history] == list(range(1, 7))
    assert_trend([h["loss"] for h in r.history], -1, f"{loss}: loss")
    assert_trend([h["rewards/margins"] for h in r.history], margin_direction(spec, r.history[0]), f"{loss}: margin")
    if spec.kind == "paired":
        assert 0 <= r.history[-1]["rewards/accuracies"] <= 1


def test_sft_loop_lowers_nll(run_files, tmp_path):
    r = trainer.train(cfg_for(run_files, tmp_path / "sft", loss="sft", reference="auto", max_steps=8, lr=3e-3))
    assert r.history[-1]["loss"] < r.history[0]["loss"]


def test_cli_trains_and_the_model_reloads(run_files, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--eval-data", run_files["eval"],
               "--output", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--no-progress",
               "--max-length", "64"])
    assert rc == 0
    assert "done: 3 steps" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    rebuilt = make_model("llama", seed=0)
    rebuilt.load_state_dict(weights(out))  # the saved tensors, into a model we built ourselves
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 7, 8, 9]])
    with torch.no_grad():
        a = logprobs.sequence_logps(reloaded, ids, torch.ones_like(ids), labels).sum
        b = logprobs.sequence_logps(rebuilt, ids, torch.ones_like(ids), labels).sum
        start = logprobs.sequence_logps(make_model("llama", seed=0), ids, torch.ones_like(ids), labels).sum
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(a, start, atol=1e-4), "the saved model must be the trained one"
    # A second run into the same directory is refused without --overwrite, and the first is kept.
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
               "--max-steps", "1", "--no-progress"])
    assert rc == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").exists()


def test_merged_lora_weights_reload_and_match_the_adapter(run_files, tmp_path):
    from transformers import AutoModelForCausalLM

    r = trainer.train(cfg_for(run_files, tmp_path / "m", lora_r=4, max_steps=2, lr=1e-2, merge_lora=True))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10]])
    with torch.no_grad():
        a = logprobs.sequence_logps(r.policy, ids, torch.ones_like(ids), labels).sum
        b = logprobs.sequence_logps(merged, ids, torch.ones_like(ids), labels).sum
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_eval_command_reports_held_out_metrics(run_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
                 "--max-steps", "4", "--lr", "1e-2", "--no-progress", "--max-length", "64"]) == 0
    rc = main(["eval", "--model", str(out / "model"), "--ref-model", run_files["model"], "--data", run_files["eval"],
               "--samples", "4", "--max-new-tokens", "4", "--json", str(tmp_path / "eval.json")])
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["pairs"] == 6
    assert res["rewards/margins"] != 0
    assert res["rewards/margins"] == pytest.approx(res["rewards/chosen"] - res["rewards/rejected"], abs=1e-6)
    assert res["rewards/accuracies"] * 6 == pytest.approx(round(res["rewards/accuracies"] * 6))  # a share of 6 pairs
    # the DPO loss is the mean of softplus(-margin_i), convex: never below softplus(-mean margin) (Jensen)
    assert res["loss"] >= torch.nn.functional.softplus(torch.tensor(-res["rewards/margins"])).item() - 1e-6
    assert res["kl/sampled"] == res["kl/sampled"] and res["lengths/sampled"] > 0  # finite, sampled
    # the reference against itself: zero margins, zero KL
    rc = main(["eval", "--model", run_files["model"], "--ref-model", run_files["model"], "--data", run_files["eval"],
               "--samples", "4", "--max-new-tokens", "4", "--json", str(tmp_path / "self.json")])
    same = json.loads((tmp_path / "self.json").read_text())
    assert same["rewards/margins"] == pytest.approx(0, abs=1e-6) and same["kl/sampled"] == pytest.approx(0, abs=1e-5)


def test_bf16_autocast_tracks_fp32(run_files, tmp_path):
    """bf16 autocast: fp32 master weights, fp32 log-prob sums, step-1 figures within bf16 error of fp32."""
    a = trainer.train(cfg_for(run_files, tmp_path / "fp32", max_steps=2, packing=True))
    b = trainer.train(cfg_for(run_files, tmp_path / "bf16", max_steps=2, packing=True, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in b.policy.parameters())
    assert b.history[0]["logps/chosen"] == pytest.approx(a.history[0]["logps/chosen"], rel=2e-2)
    assert b.history[0]["logps/chosen"] != a.history[0]["logps/chosen"]  # autocast really ran in bf16
    assert torch.isfinite(torch.tensor(b.history[-1]["loss"]))


def test_tensorboard_logs_the_same_scalars(run_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = trainer.train(cfg_for(run_files, tmp_path / "tb", max_steps=3, tensorboard=True, save_model=False))
    events = EventAccumulator(str(tmp_path / "tb" / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert losses == pytest.approx([h["loss"] for h in r.history], rel=1e-6)
    assert "rewards/margins" in events.Tags()["scalars"]
