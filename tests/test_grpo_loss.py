"""prefalign.losses.grpo: advantages and the clipped surrogate against hand-computed values and a naive loop."""

import math

import pytest
import torch

from prefalign.losses.grpo import group_advantages, grpo_loss

EPS = 1e-4  # group_advantages' default


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    # Group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3). Group 2: all equal -> 0.
    s = math.sqrt(1 / 3)
    want = [0.5 / (s + EPS), -0.5 / (s + EPS), -0.5 / (s + EPS), 0.5 / (s + EPS), 0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor(want))
    # none (Dr. GRPO): only centred.
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    # batch: centred per group, divided by the std of all 8 rewards (mean 1.25).
    sb = math.sqrt((2 * 0.25**2 + 2 * 1.25**2 + 4 * 0.75**2) / 7)
    torch.testing.assert_close(group_advantages(r, 4, scale="batch"),
                               torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) / (sb + EPS))


def test_group_advantages_edge_cases():
    assert torch.equal(group_advantages(torch.tensor([3.0, 5.0]), 1), torch.zeros(2))  # a group of one
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 2, scale="global")


# Hand example: 2 completions, T = 3, row 1 has one padding token.
#   row 0, A = +1, ratios [1.0, 1.5, 0.5]: surrogate min(rA, clip(r)A) = [1.0, 1.2 (clipped high), 0.5]
#   row 1, A = -2, ratios [1.1, 0.7, pad]: surrogate = [-2.2, -1.6 (clipped low)]
#   per-token loss = -surrogate: row 0 [-1, -1.2, -0.5] (sum -2.7), row 1 [2.2, 1.6] (sum 3.8)
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


def hand_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.0]], dtype=torch.float64)
    return old + RATIOS.log(), old


@pytest.mark.parametrize("aggregation, kw, want", [
    ("grpo", {}, ((-2.7 / 3) + (3.8 / 2)) / 2),   # 0.5
    ("dapo", {}, 1.1 / 5),                          # sum over tokens / 5 tokens
    ("dr_grpo", {}, 1.1 / (2 * 3)),                 # / (B * T)
    ("dr_grpo", {"max_completion_length": 10}, 1.1 / (2 * 10)),
])
def test_grpo_loss_by_hand(aggregation, kw, want):
    logps, old = hand_inputs()
    out = grpo_loss(logps, old, None, ADV, MASK, clip_eps=0.2, aggregation=aggregation, **kw)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-1, -1.2, -0.5], [2.2, 1.6, 0]], dtype=torch.float64))
    assert out.clip_fraction.item() == pytest.approx(2 / 5)
    assert out.low_clip_fraction.item() == pytest.approx(1 / 5)
    assert out.high_clip_fraction.item() == pytest.approx(1 / 5)
    assert out.kl.item() == 0 and out.ratio_mean.item() == pytest.approx((1 + 1.5 + .5 + 1.1 + .7) / 5)


def test_clip_higher_by_hand():
    # eps_high = 0.6: ratio 1.5 with A > 0 is no longer clipped -> row 0 losses [-1, -1.5, -0.5].
    logps, old = hand_inputs()
    out = grpo_loss(logps, old, None, ADV, MASK, clip_eps=0.2, clip_eps_high=0.6)
    assert out.loss.item() == pytest.approx(((-3.0 / 3) + (3.8 / 2)) / 2)
    assert out.clip_fraction.item() == pytest.approx(1 / 5) and out.high_clip_fraction.item() == 0


def test_clipped_tokens_get_no_gradient():
    logps, old = hand_inputs()
    logps.requires_grad_(True)
    grpo_loss(logps, old, None, ADV, MASK, aggregation="dapo").loss.backward()
    g = logps.grad
    # d(-rA)/dlogp = -rA / 5 where unclipped; 0 on the clipped tokens and on padding.
    want = torch.tensor([[-1.0 / 5, 0, -0.5 / 5], [2.2 / 5, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(g, want)


def test_old_logps_none_means_ratio_one():
    logps, _ = hand_inputs()
    out = grpo_loss(logps, None, None, ADV, MASK, aggregation="dapo")
    # ratio 1: loss = -mean_t A = -(3 * 1 + 2 * -2) / 5
    assert out.loss.item() == pytest.approx(1 / 5) and out.clip_fraction.item() == 0


def test_kl_term_equals_naive_k3():
    torch.manual_seed(0)
    B, T = 3, 5
    logps = -torch.rand(B, T, dtype=torch.float64) * 3
    ref = logps + torch.randn(B, T, dtype=torch.float64) * 0.5
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    adv = torch.zeros(B, dtype=torch.float64)  # isolate the KL term: the surrogate is 0
    beta = 0.04
    out = grpo_loss(logps, logps.detach(), ref, adv, mask, beta=beta, aggregation="dapo")
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                d = ref[b, t].item() - logps[b, t].item()
                kl = math.exp(d) - d - 1  # k3 estimator of KL(pi || ref)
                assert out.per_token_kl[b, t].item() == pytest.approx(kl, rel=1e-12)
                total, count = total + kl, count + 1
            else:
                assert out.per_token_kl[b, t] == 0
    assert out.kl.item() == pytest.approx(total / count, rel=1e-12)
    assert out.loss.item() == pytest.approx(beta * total / count, rel=1e-12)
    # With beta = 0 the KL is still reported but not in the loss.
    out0 = grpo_loss(logps, logps.detach(), ref, adv, mask, beta=0.0, aggregation="dapo")
    assert out0.loss.item() == 0 and out0.kl.item() == pytest.approx(total / count, rel=1e-12)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, adv, mask, beta=0.1)


def naive_grpo_loss(logps, old, ref, adv, mask, eps_lo, eps_hi, beta, aggregation, L):
    """Token by token, straight from the formulas (a Python loop, scalar autograd)."""
    B, T = logps.shape
    seq_terms, total, ntok = [], 0.0, 0
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            r = torch.exp(logps[b, t] - old[b, t])
            rc = torch.clamp(r, 1 - eps_lo, 1 + eps_hi)
            term = -torch.minimum(r * adv[b], rc * adv[b])
            if beta:
                d = ref[b, t] - logps[b, t]
                term = term + beta * (torch.exp(d) - d - 1)
            s, n = s + term, n + 1
        seq_terms.append(s / max(n, 1))
        total, ntok = total + s, ntok + n
    if aggregation == "grpo":
        return sum(seq_terms) / B
    if aggregation == "dapo":
        return total / ntok
    return total / (B * L)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta, eps_hi", [(0.0, None), (0.1, 0.28)])
def test_gradients_match_naive_loop(aggregation, beta, eps_hi):
    torch.manual_seed(1)
    B, T = 4, 6
    old = -torch.rand(B, T, dtype=torch.float64) * 2
    logps = (old + torch.randn(B, T, dtype=torch.float64) * 0.3).requires_grad_(True)  # some ratios clip
    ref = old + torch.randn(B, T, dtype=torch.float64) * 0.2
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=torch.float64), 2)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    out = grpo_loss(logps, old, ref, adv, mask, clip_eps=0.2, clip_eps_high=eps_hi, beta=beta,
                    aggregation=aggregation, max_completion_length=8)
    (g,) = torch.autograd.grad(out.loss, logps)
    logps2 = logps.detach().clone().requires_grad_(True)
    want = naive_grpo_loss(logps2, old, ref, adv, mask, 0.2, eps_hi if eps_hi else 0.2, beta, aggregation, 8)
    (g2,) = torch.autograd.grad(want, logps2)
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)
    assert out.clip_fraction > 0  # the example exercises the clip
    assert (g[mask == 0] == 0).all()


def test_fp32_matches_fp64():
    torch.manual_seed(2)
    old = -torch.rand(3, 4, dtype=torch.float64)
    logps = old + torch.randn(3, 4, dtype=torch.float64) * 0.1
    ref = old.clone()
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 4)
    a = grpo_loss(logps, old, ref, adv, mask, beta=0.05).loss
    b = grpo_loss(logps.float(), old.float(), ref.float(), adv.float(), mask, beta=0.05).loss
    assert b.dtype == torch.float32 and b.item() == pytest.approx(a.item(), abs=1e-6)
