"""PPO-RLHF: the pure pieces (losses/ppo.py) against hand values and naive loops, the value model's
per-token layout, one update packed == padded, and `prefalign ppo` runs end to end, resumed exactly."""

import contextlib
import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForSequenceClassification

from prefalign import cli
from prefalign.demo.model import build_config, build_model
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.errors import UserError
from prefalign.losses.ppo import (AdaptiveKL, clipped_policy_loss, clipped_value_loss, explained_variance, gae,
                                  kl_penalty_rewards, whiten)
from prefalign.online.ppo import Actors, PPOConfig, make_rollout, minibatch_step, ppo
from prefalign.online.value import ValueModel, build_value_model, completion_token_values, value_source

torch.set_num_threads(1)
D = torch.float64


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok, seed=0):
    return build_model(tok, seed=seed, hidden_size=32, intermediate_size=64, initializer_range=0.2)


# ------------------------------------------------------------------------------------------ pure pieces


def naive_gae(r, v, n, gamma, lam):
    """Textbook GAE on one row of n real tokens, Python floats."""
    adv = [0.0] * n
    nxt_v = nxt_a = 0.0
    for t in reversed(range(n)):
        delta = r[t] + gamma * nxt_v - v[t]
        adv[t] = delta + gamma * lam * nxt_a
        nxt_v, nxt_a = v[t], adv[t]
    return adv, [a + b for a, b in zip(adv, v)]


def test_gae_hand_computed():
    # row 0: 3 tokens, score 1 at the end; row 1: one token, garbage in its padding must not leak.
    r = torch.tensor([[0.0, 0.0, 1.0], [2.0, 5.0, 5.0]], dtype=D)
    v = torch.tensor([[0.5, 0.2, 0.1], [0.5, 9.0, 9.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    # t=2: 1 - 0.1 = 0.9; t=1: 0.9*0.1 - 0.2 + 0.72*0.9 = 0.538; t=0: 0.9*0.2 - 0.5 + 0.72*0.538 = 0.06736
    want = torch.tensor([[0.06736, 0.538, 0.9], [1.5, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(adv, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.56736, 0.738, 1.0], [2.0, 0.0, 0.0]], dtype=D), atol=1e-12, rtol=0)


def test_gae_equals_naive_loop_on_ragged_rows():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4]
    r, v = torch.randn(4, 5, generator=g, dtype=D), torch.randn(4, 5, generator=g, dtype=D)
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    for gamma, lam in ((0.9, 0.8), (1.0, 1.0), (0.5, 0.0)):
        adv, ret = gae(r, v, mask, gamma, lam)
        for i, n in enumerate(lengths):
            a, R = naive_gae(r[i].tolist(), v[i].tolist(), n, gamma, lam)
            torch.testing.assert_close(adv[i, :n], torch.tensor(a, dtype=D), atol=1e-12, rtol=0)
            torch.testing.assert_close(ret[i, :n], torch.tensor(R, dtype=D), atol=1e-12, rtol=0)
            assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)
    # gamma = lam = 1: the Monte-Carlo return minus the value
    adv, _ = gae(r, v, mask, 1.0, 1.0)
    torch.testing.assert_close(adv[0, 1], r[0, 1:].sum() - v[0, 1], atol=1e-12, rtol=0)


def test_kl_penalty_per_token_and_score_only_at_the_last_token():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 7.0, 7.0]], dtype=D)   # padding holds garbage
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, 3.0, 3.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    rewards, kl = kl_penalty_rewards(lp, ref, torch.tensor([10.0, -4.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 10.0], [-4.0 + 0.02, 0.0, 0.0]], dtype=D))
    # the row sums are score - kl_coef * KL
    torch.testing.assert_close(rewards.sum(1), torch.tensor([10.0 - 0.1 * -0.5, -4.0 - 0.1 * -0.2], dtype=D))
    with pytest.raises(ValueError, match="at least one token"):
        kl_penalty_rewards(lp, ref, torch.zeros(2), torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool), 0.1)


def test_whiten_over_the_masked_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    w = whiten(x, mask, eps=0.0)
    torch.testing.assert_close(w[mask], (real - real.mean()) / real.std(), atol=1e-12, rtol=0)   # unbiased std
    assert torch.all(w[~mask] == 0)
    kept = whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept[mask], (real - real.mean()) / real.std() + real.mean(), atol=1e-12, rtol=0)


def test_clipped_policy_loss_hand_values_and_gradients():
    # ratios 1.5, 0.5, 1.1, 0.5 (+ a padded token); eps 0.2
    old = torch.zeros(1, 5, dtype=D)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]], dtype=D)).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0, 5.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    out = clipped_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 2.2, 0.8 (clipped)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8) / 4, abs=1e-12)
    out.loss.backward()
    # d/dlogp of -A r = -A r where the unclipped branch is taken, 0 where the clip holds
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.5, 2.2, 0.0, 0.0]], dtype=D) / 4, atol=1e-12, rtol=0)
    assert out.clip_frac.item() == pytest.approx(0.5)
    logr = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5], dtype=D))
    assert out.approx_kl.item() == pytest.approx(0.5 * (logr ** 2).mean().item(), abs=1e-12)
    assert out.ratio_mean.item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.5) / 4)


def test_clipped_value_loss_hand_values_and_gradients():
    v = torch.tensor([[1.0, 0.6, 0.0, 42.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]], dtype=D)
    ret = torch.ones(1, 4, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    out = clipped_value_loss(v, old, ret, mask, clip_range=0.2)
    # errors (unclipped, clipped): (0, 0.09) -> 0.09; (0.16, 0.16); (1, 0.49) -> 1
    assert out.loss.item() == pytest.approx(0.5 * (0.09 + 0.16 + 1.0) / 3, abs=1e-12)
    out.loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -0.8, -2.0, 0.0]], dtype=D) * 0.5 / 3, atol=1e-12, rtol=0)
    assert out.clip_frac.item() == pytest.approx(1 / 3)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, mask) == pytest.approx(0.0)
    assert explained_variance(ret.flip(1), ret, mask) < 0


def test_adaptive_kl_controller():
    c = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert c.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))   # error clipped at +0.2
    c = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert c.update(6.6, 100) == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))
    c = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert c.update(0.0, 500) == pytest.approx(0.1 * (1 - 0.2 * 500 / 10000))   # clipped at -0.2
    fixed = AdaptiveKL(0.1)
    assert fixed.update(100.0, 100) == 0.1
    c2 = AdaptiveKL(0.5, target=6.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value


# ------------------------------------------------------------------------------------------ value model, one update


PROMPTS = [[1, 5, 6, 15], [1, 7, 16], [1, 8, 15], [1, 7, 16]]          # a duplicated prompt: shares a segment
COMPS = [[5, 6, 2], [7, 2], [8], [9, 10, 11, 2]]


def test_value_model_per_token_layout_packed_padded_and_naive(tok):
    value = ValueModel(copy.deepcopy(tiny(tok).base_model))
    torch.nn.init.normal_(value.head.weight, generator=torch.Generator().manual_seed(1))
    packed = completion_token_values(value, PROMPTS, COMPS, pad_id=0, packing=True)
    padded = completion_token_values(value, PROMPTS, COMPS, pad_id=0, packing=False)
    assert packed.shape == (4, 4)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPS)):   # V(s_t) is read where a_t is predicted
        h = value.body(input_ids=torch.tensor([p + c])).last_hidden_state[0]
        want = value.head(h[len(p) - 1:-1]).squeeze(-1)
        torch.testing.assert_close(packed[i, :len(c)], want, atol=1e-5, rtol=1e-5)
        assert torch.all(packed[i, len(c):] == 0)


class Recorder:
    """An optimizer stand-in with the two parameter groups: records the gradients at step()."""

    def __init__(self, actors):
        self.param_groups = [{"params": list(actors.policy.parameters())}, {"params": list(actors.value.parameters())}]
        self.grads = []

    def step(self):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])

    def zero_grad(self, set_to_none=True):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None


class NoSched:
    def step(self):
        pass


_null = contextlib.nullcontext


def _one_update(tok, packing, micro_batch=0):
    policy = tiny(tok)
    actors = Actors(policy, ValueModel(copy.deepcopy(policy.base_model))).eval()
    torch.nn.init.normal_(actors.value.head.weight, std=0.5, generator=torch.Generator().manual_seed(2))
    ref = tiny(tok, seed=1).eval()
    cfg = PPOConfig(output="unused", prompts_per_step=4, packing=packing, micro_batch=micro_batch, max_grad_norm=0.0,
                    gamma=0.9, lam=0.8)
    roll, stats = make_rollout(actors, ref, cfg, _null, 0, PROMPTS, COMPS, torch.tensor([1.0, 0.0, 2.0, -1.0]),
                               kl_coef=0.1)
    # move the policy off the rollout's so that ratios differ from 1 and some clip
    with torch.no_grad():
        for p in actors.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    opt = Recorder(actors)
    metrics = minibatch_step(actors, opt, NoSched(), cfg, _null, 0, roll, [3, 1, 0, 2])
    return roll, stats, metrics, opt.grads[0]




@pytest.mark.parametrize("micro_batch", [0, 3])
def test_one_ppo_update_packed_equals_padded(tok, micro_batch):
    r1, s1, m1, g1 = _one_update(tok, packing=False)
    r2, s2, m2, g2 = _one_update(tok, packing=True, micro_batch=micro_batch)
    for name in ("old_logps", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(r1, name), getattr(r2, name), atol=1e-5, rtol=1e-5, msg=name)
    for k in ("kl", "entropy", "explained_variance"):
        assert s1[k] == pytest.approx(s2[k], abs=1e-5), k
    for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-5), k
    assert m1["clip_frac"] > 0 and m1["value_loss"] > 0
    assert len(g1) == len(g2) and any(float(g.abs().sum()) > 0 for g in g1[-2:])   # the value head learns
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_value_model_starts_from_a_reward_model(tok, tmp_path):
    rm = LlamaForSequenceClassification(build_config(tok, hidden_size=32, intermediate_size=64, num_labels=1))
    rm.save_pretrained(tmp_path / "rm")
    assert value_source("", ["exact_answer", f"rm:{tmp_path / 'rm'}"]) == str(tmp_path / "rm")
    assert value_source("other", [f"rm:{tmp_path / 'rm'}"]) == "other"
    value = build_value_model(str(tmp_path / "rm"), tiny(tok), tok)
    torch.testing.assert_close(value.head.weight, rm.score.weight)   # the RM's trained head, not a fresh one
    torch.testing.assert_close(value.body.embed_tokens.weight, rm.model.embed_tokens.weight)
    ids = torch.tensor([[1, 5, 6, 15, 7]])
    h = rm.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(value(ids, None, None, torch.tensor([4])), rm.score(h[0, 4:]).squeeze(-1))
    fresh = build_value_model("", tiny(tok), tok)
    assert torch.all(fresh.head.weight == 0)
    with pytest.raises(UserError, match="value model"):
        build_value_model(str(tmp_path / "nowhere"), tiny(tok), tok)


# ------------------------------------------------------------------------------------------ runs


def starts7(prompts, completions):
    return [float(c.startswith("7")) for c in completions]


SUMS = [f"{a}+{b}=" for a in range(10) for b in range(10)]
RUN = dict(prompts_per_step=16, max_new_tokens=2, lr=1e-2, value_lr=1e-2, ppo_epochs=2, mini_batch=8,
           progress=False, save_model=False)
KEYS = ("reward/mean", "reward/std", "kl", "kl_coef", "non_score_reward", "entropy", "policy_loss", "value_loss",
        "clip_frac", "value_clip_frac", "approx_kl", "explained_variance", "completion_length", "time/generation",
        "time/training", "lr", "grad_norm", "value_grad_norm", "peak_memory_mb")


@pytest.mark.slow
def test_ppo_raises_a_learnable_reward_and_logs_every_metric(tok, tmp_path):
    """reward = 1 when the completion starts with "7": about 1 in 19 at the start."""
    cfg = PPOConfig(output=str(tmp_path / "run"), steps=8, kl_coef=0.05, kl_target=1.0, kl_horizon=100, **RUN)
    result = ppo(cfg, model=tiny(tok), tokenizer=tok, prompts=SUMS, reward=starts7)
    rewards = [r["reward/mean"] for r in result.history]
    assert rewards[0] < 0.2 and min(rewards[-3:]) > 0.6, rewards
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(1, 9))
    for key in KEYS:
        assert all(math.isfinite(r[key]) for r in lines), key
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)      # the policy is the reference at step 1
    assert lines[-1]["kl"] > 1.0                               # it moved away to earn the reward
    # above its target the adaptive controller raises kl_coef
    assert lines[-1]["kl_coef"] > lines[0]["kl_coef"] == 0.05
    assert os.path.isfile(tmp_path / "run" / "plots" / "reward.png")


@pytest.mark.slow
def test_cli_ppo_with_a_builtin_reward(tok, tmp_path, capsys):
    model_dir = tmp_path / "sft"
    tiny(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n"
                               for a in range(4) for b in range(4)))
    out = tmp_path / "out"
    args = ["ppo", "--model", str(model_dir), "--prompts", str(prompts), "--reward", "exact_answer",
            "--output", str(out), "--steps", "2", "--prompts-per-step", "4", "--max-new-tokens", "3",
            "--ppo-epochs", "2", "--mini-batch", "2", "--lr", "1e-3", "--no-progress"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert "done: 2 steps" in capsys.readouterr().out
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(lines) == 2 and all(math.isfinite(lines[-1][k]) for k in KEYS if k != "explained_variance")
    assert os.path.isfile(out / "model" / "model.safetensors") and os.path.isfile(out / "config.yaml")
    state = json.load(open(out / "checkpoints" / "step-000002" / "state.json"))
    assert state["trainer"]["finished"] and state["trainer"]["kl"]["value"] == 0.05
    names = load_file(out / "checkpoints" / "step-000002" / "weights.safetensors").keys()
    assert any(n.startswith("policy.") for n in names) and "value.head.weight" in names
    # the run directory is guarded: the same command again is refused, naming the way out
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto --steps N (N > 2)" in err


@pytest.mark.slow
def test_lora_policy_is_its_own_reference_and_resumes_exactly(tok, tmp_path):
    """--lora-r: only the adapters train (the value model in full); the reference is the policy with its
    adapters off, no copy, so step 1's KL is exactly 0 and later ones are not; OUTPUT/model is an
    adapter that prefalign loads; 1 step + --resume auto to 2 ends where a 2-step run ends."""
    from prefalign.models import is_peft, load_model

    base = tmp_path / "base"  # from a folder: the saved adapter names its base model
    tiny(tok).save_pretrained(base)
    tok.save_pretrained(base)
    lora = dict(model=str(base), lora_r=4, lora_alpha=8.0, kl_coef=0.1, **dict(RUN, save_model=True))
    whole = ppo(PPOConfig(output=str(tmp_path / "whole"), steps=2, **lora), prompts=SUMS, reward=starts7)
    assert is_peft(whole.policy)
    trained = [n for n, p in whole.policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert any(p.requires_grad for p in whole.value.parameters())
    lines = [json.loads(x) for x in open(tmp_path / "whole" / "metrics.jsonl")]
    assert lines[0]["kl"] == 0.0 and lines[1]["kl"] > 0.0   # adapters off = the start policy, exactly
    assert os.path.isfile(tmp_path / "whole" / "model" / "adapter_config.json")
    loaded = load_model(str(tmp_path / "whole" / "model"))
    ids = torch.tensor([tok("3+4=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, whole.policy.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    ppo(PPOConfig(output=str(tmp_path / "split"), steps=1, save_every=1, **lora), prompts=SUMS, reward=starts7)
    resumed = ppo(PPOConfig(output=str(tmp_path / "split"), steps=2, resume="auto", **lora), prompts=SUMS,
                  reward=starts7)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash:
    """A reward that kills the run (KeyboardInterrupt: no handler runs) when called for step `at`."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return starts7(prompts, completions)


def _weights(result):
    return {**{f"p.{k}": v.clone() for k, v in result.policy.state_dict().items()},
            **{f"v.{k}": v.clone() for k, v in result.value.state_dict().items()}}


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tok, tmp_path):
    cfg = dict(steps=4, save_every=1, kl_target=2.0, kl_horizon=50, **RUN)
    whole = ppo(PPOConfig(output=str(tmp_path / "a"), **cfg), model=tiny(tok), tokenizer=tok, prompts=SUMS,
                reward=starts7)
    with pytest.raises(KeyboardInterrupt):
        ppo(PPOConfig(output=str(tmp_path / "b"), **cfg), model=tiny(tok), tokenizer=tok, prompts=SUMS,
            reward=Crash(at=3))
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step-000001", "step-000002"]
    with pytest.raises(UserError, match="--resume auto"):   # the guard: no silent restart over a run
        ppo(PPOConfig(output=str(tmp_path / "b"), **cfg), model=tiny(tok), tokenizer=tok, prompts=SUMS, reward=starts7)
    counting = Crash(at=0)
    resumed = ppo(PPOConfig(output=str(tmp_path / "b"), resume="auto", **cfg), model=tiny(tok), tokenizer=tok,
                  prompts=SUMS, reward=counting)
    assert counting.calls == 2   # steps 3 and 4 only: it continued from the step-2 checkpoint
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "peak"))}  # noqa: E731
    lines = [[strip(json.loads(x)) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert lines[0] == lines[1] and lines[0][-1]["kl_coef"] != 0.05     # the KL controller state came back too
    again = ppo(PPOConfig(output=str(tmp_path / "b"), resume="auto", **cfg), model=tiny(tok), tokenizer=tok,
                prompts=SUMS, reward=Crash(at=1))   # finished: nothing to do, the reward is never called
    assert again.steps == 4 and [strip(r) for r in again.history] == lines[1]
    # a changed trajectory setting is refused, naming it
    with pytest.raises(UserError, match="clip_eps"):
        ppo(PPOConfig(output=str(tmp_path / "b"), resume="auto", **dict(cfg, steps=5), clip_eps=0.3),
            model=tiny(tok), tokenizer=tok, prompts=SUMS, reward=starts7)


@pytest.mark.parametrize("kw, match", [
    (dict(mini_batch=3, prompts_per_step=8), "mini_batch"), (dict(kl_coef=-1), "kl_coef"), (dict(lam=1.5), "lam"),
    (dict(ppo_epochs=0), "ppo_epochs"), (dict(value_clip=0), "value_clip"), (dict(temperature=0), "temperature"),
    (dict(reward=["a", "b"], reward_weights=[1.0]), "reward weights"),
])
def test_config_validation(kw, match):
    with pytest.raises(UserError, match=match):
        PPOConfig(**kw)


def test_too_few_prompts_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError, match="fewer than prompts_per_step"):
        ppo(PPOConfig(output=str(tmp_path / "r"), steps=1, prompts_per_step=4, progress=False), model=tiny(tok),
            tokenizer=tok, prompts=["1+1="], reward=starts7)
    assert not os.path.exists(tmp_path / "r")   # a failed start leaves nothing behind


SIGNALLING_REWARD = '''
import os, signal
calls = 0


def reward(prompts, completions):
    """starts-with-7, and sends this process PPO_TEST_SIGNAL on call PPO_TEST_AT (a kill mid-step)."""
    global calls
    calls += 1
    if calls == int(os.environ.get("PPO_TEST_AT", "0")):
        os.kill(os.getpid(), getattr(signal, os.environ["PPO_TEST_SIGNAL"]))
    return [float(c.startswith("7")) for c in completions]
'''


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_equal_an_uninterrupted_cli_run(tok, tmp_path):
    import signal
    import subprocess
    import sys

    model_dir = tmp_path / "sft"
    tiny(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SUMS))
    (tmp_path / "rw.py").write_text(SIGNALLING_REWARD)

    def args(out, *extra):
        return ["ppo", "--model", str(model_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--reward",
                f"{tmp_path / 'rw.py'}:reward", "--output", str(tmp_path / out), "--steps", "4",
                "--prompts-per-step", "16", "--max-new-tokens", "2", "--lr", "1e-2", "--ppo-epochs", "2",
                "--mini-batch", "8", "--kl-target", "2", "--kl-horizon", "50", "--no-progress", *extra]

    def killed(out, sig, at, *extra):
        env = {**os.environ, "PPO_TEST_SIGNAL": sig, "PPO_TEST_AT": str(at), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "prefalign.cli", *args(out, *extra)], env=env,
                              capture_output=True, text=True, timeout=300)

    def final(out):
        return load_file(tmp_path / out / "checkpoints" / "step-000004" / "weights.safetensors")

    assert cli.main(args("whole")) == 0
    proc = killed("kill", "SIGKILL", 3, "--save-every", "1")            # dies inside step 3
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "kill" / "model").exists()
    proc = killed("term", "SIGTERM", 2)                                 # finishes step 2, checkpoints, exits
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped at step 2: signal SIGTERM" in proc.stderr
    assert os.listdir(tmp_path / "term" / "checkpoints") == ["step-000002"]
    want = final("whole")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "peak"))}  # noqa: E731
    lines = [strip(json.loads(x)) for x in open(tmp_path / "whole" / "metrics.jsonl")]
    for out in ("kill", "term"):
        assert cli.main(args(out, "--resume", "auto")) == 0
        got = final(out)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), out
        assert [strip(json.loads(x)) for x in open(tmp_path / out / "metrics.jsonl")] == lines, out
