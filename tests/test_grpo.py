"""The GRPO loop (prefalign.online.grpo) against hand computations on tiny models."""

import contextlib
import json
import math

import pytest
import torch

from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.errors import UserError
from prefalign.online.common import completion_token_logps
from prefalign.online.grpo import GRPOConfig, grpo, update

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok, seed=0):
    return build_model(tok, seed=seed, hidden_size=32, intermediate_size=64, initializer_range=0.2)


def naive_token_logps(model, prompts, completions, temperature=1.0):
    """Full-logits reference: one row at a time, no padding, no chunking. -> list of [len(c)]."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0].float() / temperature           # [T, V]
        lp = torch.log_softmax(logits[len(p) - 1:-1], -1)                      # predicts c
        out.append(lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
    return out


PROMPTS = [[1, 5, 6, 15], [1, 7, 16]]                                  # "<s>12+", "<s>3=" (ids)
COMPS = [[5, 6, 2], [7, 2], [8], [9, 10, 11, 2],                      # 2 prompts x G = 2 ... as 4 rows
         ]


def batch(G=2):
    prompts = [PROMPTS[i // G] for i in range(2 * G)]
    return prompts, COMPS[: 2 * G]


class Recorder:
    """An optimizer stand-in: records the gradient at each step, then takes an SGD step."""

    def __init__(self, params, lr=0.0):
        self.params, self.lr, self.grads, self.snapshots = params, lr, [], []

    def step(self):
        self.snapshots.append([p.detach().clone() for p in self.params])
        self.grads.append([p.grad.detach().clone() for p in self.params])
        with torch.no_grad():
            for p in self.params:
                p -= self.lr * p.grad

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class NoSched:
    def step(self):
        pass


def run_update(model, ref, cfg, adv, lr=0.0):
    params = list(model.parameters())
    opt = Recorder(params, lr)
    prompts, comps = batch()
    m = update(model, ref, opt, NoSched(), params, cfg, contextlib.nullcontext, 0, prompts, comps, adv)
    return m, opt


def cfg_(**kw):
    base = dict(output="unused", max_new_tokens=4, max_grad_norm=0.0, group_size=2, prompts_per_step=2)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logps_equal_full_logits(tok, temperature, packing):
    model = tiny(tok)
    prompts, comps = batch()
    lp, mask = completion_token_logps(model, prompts, comps, pad_id=0, temperature=temperature, packing=packing)
    want = naive_token_logps(model, prompts, comps, temperature)
    assert lp.shape == (4, 4) and mask.sum().item() == sum(map(len, comps))
    for i, w in enumerate(want):
        torch.testing.assert_close(lp[i, :len(w)], w, atol=1e-5, rtol=1e-5)
        assert torch.all(lp[i, len(w):] == 0)


def naive_loss(model, adv, aggregation, old=None, ref=None, beta=0.0, eps=0.2, L=4):
    """The GRPO objective written out token by token from the formula."""
    prompts, comps = batch()
    lps = naive_token_logps(model, prompts, comps)
    refs = naive_token_logps(ref, prompts, comps) if ref is not None else None
    per_seq, total, n_tok = [], 0.0, 0
    for i, lp in enumerate(lps):
        o = old[i] if old is not None else lp.detach()
        ratio = torch.exp(lp - o)
        loss_t = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[i])
        if beta:
            d = refs[i] - lp
            loss_t = loss_t + beta * (torch.exp(d) - d - 1)
        per_seq.append(loss_t.mean())
        total = total + loss_t.sum()
        n_tok += len(lp)
    if aggregation == "grpo":
        return torch.stack(per_seq).mean(), lps
    if aggregation == "dapo":
        return total / n_tok, lps
    return total / (len(lps) * L), lps


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("micro_batch", [0, 1, 3])
def test_loop_gradient_equals_hand_computed(tok, aggregation, micro_batch):
    # rewards [1, 0 | 0.5, 0.5]: group 1 has A = +-1/sqrt(2) / (std + eps), group 2 has A = 0
    from prefalign.losses.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = group_advantages(rewards, 2)
    s = math.sqrt(0.5)  # std of (1, 0), unbiased
    torch.testing.assert_close(adv, torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0]))

    model = tiny(tok)
    m, opt = run_update(model, None, cfg_(aggregation=aggregation, micro_batch=micro_batch), adv)
    want, _ = naive_loss(model, adv, aggregation)
    grads = torch.autograd.grad(want, list(model.parameters()))
    for g, w in zip(opt.grads[0], grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    assert m["loss"] == pytest.approx(want.item(), abs=1e-6)
    assert "kl" not in m  # kl_coef 0: no reference, no KL
    # entropy estimate: minus the mean sampled-token log-prob (old policy), over all tokens
    _, lps = naive_loss(model, adv, aggregation)
    assert m["entropy"] == pytest.approx(-torch.cat(lps).mean().item(), rel=1e-5)


def test_kl_term_equals_naive_computation(tok):
    model, ref = tiny(tok, seed=0), tiny(tok, seed=1)
    for p in ref.parameters():
        p.requires_grad_(False)
    adv = torch.tensor([1.0, -1.0, 0.3, -0.3])
    beta = 0.5
    m, opt = run_update(model, ref, cfg_(kl_coef=beta, aggregation="grpo"), adv)
    want, lps = naive_loss(model, adv, "grpo", ref=ref, beta=beta)
    refs = naive_token_logps(ref, *batch())
    kl = torch.cat([torch.exp(r - l) - (r - l) - 1 for l, r in zip(lps, refs)])
    assert m["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert m["loss"] == pytest.approx(want.item(), rel=1e-5)
    grads = torch.autograd.grad(want, list(model.parameters()))
    for g, w in zip(opt.grads[0], grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_several_updates_use_old_logps_of_the_sampling_policy(tok):
    # mu = 2: the second step's ratio is pi_new / pi_old with pi_old the policy before step 1.
    model = tiny(tok)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with torch.no_grad():
        old = [lp.clone() for lp in naive_token_logps(model, *batch())]
    m, opt = run_update(model, None, cfg_(mu=2, clip_eps=0.05), adv, lr=0.5)
    # rebuild the model as it was at the second step and compute the clipped loss by hand
    second = tiny(tok)
    with torch.no_grad():
        for p, snap in zip(second.parameters(), opt.snapshots[1]):
            p.copy_(snap)
    want, lps = naive_loss(second, adv, "grpo", old=old, eps=0.05)
    grads = torch.autograd.grad(want, list(second.parameters()))
    for g, w in zip(opt.grads[1], grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    assert m["clip_fraction"] > 0  # lr 0.5 moves the policy past the 5% clip on some tokens


@pytest.mark.parametrize("aggregation,micro_batch", [("grpo", 0), ("dapo", 3)])
def test_packed_update_equals_padded(tok, aggregation, micro_batch):
    # kl_coef > 0 (reference log-probs), mu = 2 (old-policy log-probs) and, with micro_batch 3,
    # a micro-batch that splits the second group: every log-prob takes the packed path.
    results = {}
    for packing in (False, True):
        model, ref = tiny(tok, seed=0), tiny(tok, seed=1)
        for p in ref.parameters():
            p.requires_grad_(False)
        cfg = cfg_(packing=packing, kl_coef=0.3, mu=2, clip_eps=0.05, aggregation=aggregation, micro_batch=micro_batch)
        results[packing] = run_update(model, ref, cfg, torch.tensor([1.0, -1.0, 0.5, -0.5]), lr=0.5)
    (m0, opt0), (m1, opt1) = results[False], results[True]
    assert m1.keys() == m0.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-5), k
    assert m0["clip_fraction"] > 0  # the second step's ratio moved past the clip: old log-probs matter
    for step in range(2):
        for g1, g0 in zip(opt1.grads[step], opt0.grads[step]):
            torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-5)


def test_token_budget_too_small_is_a_user_error(tok):
    model = tiny(tok)
    with pytest.raises(UserError, match="token budget"):
        run_update(model, None, cfg_(token_budget=8), torch.tensor([1.0, -1.0, 0.5, -0.5]))


def test_grpo_run_raises_a_trivially_learnable_reward(tok, tmp_path):
    """reward = 1 when the completion starts with "7": about 1 in 19 at the start."""
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    starts7 = lambda prompts, completions: [float(c.startswith("7")) for c in completions]  # noqa: E731
    cfg = GRPOConfig(output=str(tmp_path / "run"), steps=10, prompts_per_step=8, group_size=8, max_new_tokens=2,
                     lr=1e-2, kl_coef=0.1, mu=2, progress=False, save_model=False)
    result = grpo(cfg, model=tiny(tok), tokenizer=tok, prompts=prompts, reward=starts7)
    rewards = [r["reward/mean"] for r in result.history]
    assert rewards[0] < 0.2 and max(rewards[-3:]) > 0.5, rewards
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == 10
    for key in ("reward/mean", "reward/std", "kl", "completion_length", "clip_fraction", "entropy",
                "time/generation", "time/training", "peak_memory_mb", "loss"):
        assert key in lines[-1], key


def test_kl_coef_zero_loads_no_reference(tok, tmp_path, monkeypatch):
    import prefalign.models

    def no_ref(*a, **k):
        raise AssertionError("kl_coef 0 must not build a reference")

    monkeypatch.setattr(prefalign.models, "freeze", no_ref)
    cfg = GRPOConfig(output=str(tmp_path), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2,
                     progress=False, save_model=False, kl_coef=0.0)
    res = grpo(cfg, model=tiny(tok), tokenizer=tok, prompts=["1+1=", "2+2="], reward="regex=1")
    assert "kl" not in res.history[0]


@pytest.mark.parametrize("kw, match", [
    (dict(group_size=1), "group_size"), (dict(scale="std"), "scale"), (dict(aggregation="sum"), "aggregation"),
    (dict(kl_coef=-1), "kl_coef"), (dict(temperature=0), "temperature"), (dict(mu=0), "mu"), (dict(lr=0), "lr"),
    (dict(reward=["a", "b"], reward_weights=[1.0]), "reward weights"),
])
def test_config_validation(kw, match):
    with pytest.raises(UserError, match=match):
        GRPOConfig(**kw)


def test_existing_run_needs_overwrite(tok, tmp_path):
    cfg = dict(output=str(tmp_path), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2,
               progress=False, save_model=False)
    grpo(GRPOConfig(**cfg), model=tiny(tok), tokenizer=tok, prompts=["1+1=", "2+2="], reward="regex=1")
    with pytest.raises(UserError, match="already holds a run"):
        grpo(GRPOConfig(**cfg), model=tiny(tok), tokenizer=tok, prompts=["1+1=", "2+2="], reward="regex=1")
