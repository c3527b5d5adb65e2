"""Tests for prefalign.losses.

(a) hand-derived numbers on small cases, (b) a naive per-pair reference written here in
elementary torch ops (values and gradients, fp64 to 1e-9, fp32 to 1e-6, odd batch
sizes), (c) invariants of each loss, the registry and `combined`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prefalign.errors import UserError
from prefalign.losses import LOSSES, LossOutput, combined, get_loss, input_keys, log_odds
from prefalign.losses import pairwise, unpaired

CANONICAL = sorted({spec.name for spec in LOSSES.values()})
REF_PAIRED = [n for n in CANONICAL if LOSSES[n].kind == "paired" and LOSSES[n].needs_reference]


def lg1pe(x: float) -> float:
    """log(1 + e^x) = -log sig(-x), in plain math."""
    return math.log1p(math.exp(x))


def sg(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------ (a) hand numbers
# One pair: policy_chosen=-1, policy_rejected=-2, ref_chosen=-1.5, ref_rejected=-1.8,
# beta=0.5  =>  r_w = 0.5, r_l = -0.2, h = 0.7, beta*h = 0.35, beta*r_w = 0.25,
# beta*r_l = -0.1.
PAIR = (-1.0, -2.0, -1.5, -1.8)
HAND = [
    ("dpo", {}, lg1pe(-0.35)),
    ("dpo", {"label_smoothing": 0.2}, 0.8 * lg1pe(-0.35) + 0.2 * lg1pe(0.35)),
    ("robust", {"label_smoothing": 0.2}, (0.8 * lg1pe(-0.35) - 0.2 * lg1pe(0.35)) / 0.6),
    ("hinge", {}, 0.65),  # 1 - 0.35
    ("ipo", {}, 0.09),  # (0.7 - 1/(2*0.5))^2
    # logit beta*r - delta: chosen 0.25-0.05 = 0.2; rejected -0.1-0.05 = -0.15
    ("bco_pair", {"delta": 0.05}, lg1pe(-0.2) + lg1pe(-0.15)),
    ("nca_pair", {}, lg1pe(-0.25) + 0.5 * lg1pe(0.25) + 0.5 * lg1pe(-0.1)),
    ("sppo_hard", {}, 0.89),  # (0.5 - 1)^2 + (-0.2 + 1)^2 = 0.25 + 0.64
    ("apo_zero", {}, 1 / (1 + math.exp(0.25)) + 1 / (1 + math.exp(0.1))),
    ("apo_down", {}, 1 / (1 + math.exp(-0.25)) + 1 / (1 + math.exp(0.35))),
    (
        "exo_pair",
        {"label_smoothing": 0.1},
        sg(0.35) * (math.log(sg(0.35)) - math.log(0.9))
        + sg(-0.35) * (math.log(sg(-0.35)) - math.log(0.1)),
    ),
    ("discopop", {}, (1 - sg(7.0)) * lg1pe(-0.35) + sg(7.0) * math.exp(-0.35)),  # 0.35/0.05
]


@pytest.mark.parametrize("name,hyper,expected", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_hand_numbers_paired(name, hyper, expected):
    x = [torch.tensor([v], dtype=torch.float64) for v in PAIR]
    out = get_loss(name).fn(*x, beta=0.5, **hyper)
    assert isinstance(out, LossOutput)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.25, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-12)


def test_hand_numbers_aot():
    # row 0 as PAIR; row 1: policy (-3, -1), ref (-2, -2.5).
    x = [torch.tensor(v, dtype=torch.float64) for v in ([-1, -3], [-2, -1], [-1.5, -2], [-1.8, -2.5])]
    # aot: policy margins (1, -2) -> sorted (-2, 1); ref margins (0.3, 0.5) -> (0.3, 0.5);
    # beta*(u - v) = (-1.15, 0.25).
    out = pairwise.aot(*x, beta=0.5)
    assert out.losses.tolist() == pytest.approx([lg1pe(1.15), lg1pe(-0.25)], rel=1e-12)
    # aot_unpaired: r_w (0.5, -1) -> (-1, 0.5); r_l (-0.2, 1.5) -> (-0.2, 1.5);
    # beta*(diff) = (-0.4, -0.5).
    out = pairwise.aot_unpaired(*x, beta=0.5)
    assert out.losses.tolist() == pytest.approx([lg1pe(0.4), lg1pe(0.5)], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5], rel=1e-12)  # per row


def test_hand_numbers_reference_free():
    # simpo: beta (avg_w - avg_l) - gamma = 2 * 0.5 - 0.5 = 0.5
    out = pairwise.simpo(torch.tensor([-0.8]), torch.tensor([-1.3]), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(lg1pe(-0.5), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-1.6, rel=1e-6)
    # orpo: p_w = 0.6, p_l = 0.2: odds 1.5 and 0.25, odds ratio 6, loss = beta log(7/6)
    avg = torch.tensor([math.log(0.6), math.log(0.2)], dtype=torch.float64)
    out = pairwise.orpo(avg[:1], avg[1:], beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * math.log(7 / 6), rel=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(0.1 * math.log(0.2), rel=1e-12)


def test_hand_numbers_unpaired():
    # r = (0.5, -0.2), beta = 0.5
    p = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    r = torch.tensor([-1.5, -1.8], dtype=torch.float64)
    d = torch.tensor([True, False])
    kl = torch.tensor(0.1, dtype=torch.float64)
    out = unpaired.kto(p, r, d, kl, beta=0.5, undesirable_weight=2.0)
    # desirable: 1 - sig(0.5 (0.5 - 0.1)) = 1/(1+e^0.2); undesirable: 2 (1 - sig(0.5 (0.1 + 0.2)))
    expected = [1 / (1 + math.exp(0.2)), 2 / (1 + math.exp(0.15))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.1], rel=1e-12)


# -------------------------------------------------------------- (b) naive reference
# Per-pair formulas on 0-d tensors with elementary ops only (no logsigmoid, no where).


def sig(x):
    return 1 / (1 + torch.exp(-x))


def logsig(x):
    return torch.log(sig(x))


# Each takes one pair's log-ratios w = r_w, l = r_l (0-d tensors) and beta b.
NAIVE_PAIRED = {
    "dpo": lambda w, l, b: -(0.9 * logsig(b * (w - l)) + 0.1 * logsig(-b * (w - l))),
    "robust": lambda w, l, b: (-0.9 * logsig(b * (w - l)) + 0.1 * logsig(-b * (w - l))) / 0.8,
    "hinge": lambda w, l, b: torch.clamp(1 - b * (w - l), min=0),
    "ipo": lambda w, l, b: (w - l - 1 / (2 * b)) ** 2,
    "bco_pair": lambda w, l, b: -logsig(b * w - 0.3) - logsig(0.3 - b * l),
    "nca_pair": lambda w, l, b: -logsig(b * w) - 0.5 * logsig(-b * w) - 0.5 * logsig(-b * l),
    "sppo_hard": lambda w, l, b: (w - 1 / (2 * b)) ** 2 + (l + 1 / (2 * b)) ** 2,
    "apo_zero": lambda w, l, b: 1 - sig(b * w) + sig(b * l),
    "apo_down": lambda w, l, b: sig(b * w) + 1 - sig(b * (w - l)),
    "exo_pair": lambda w, l, b: (
        sig(b * (w - l)) * (torch.log(sig(b * (w - l))) - math.log(1 - 1e-3))
        + (1 - sig(b * (w - l))) * (torch.log(1 - sig(b * (w - l))) - math.log(1e-3))
    ),
    "discopop": lambda w, l, b: (
        (1 - sig(b * (w - l) / 0.05)) * -logsig(b * (w - l))
        + sig(b * (w - l) / 0.05) * torch.exp(-b * (w - l))
    ),
}
# Hyper-parameters the implementation gets so that it matches the constants above.
NAIVE_HYPER = {
    "dpo": {"label_smoothing": 0.1},
    "robust": {"label_smoothing": 0.1},
    "bco_pair": {"delta": 0.3},
}
BETA = {"dpo": 0.1, "robust": 0.1, "hinge": 0.3, "ipo": 0.1, "sppo_hard": 0.1, "discopop": 0.1}


def naive_aot(pc, pr, rc, rr, b, unpaired_variant):
    """Sort by Python's sorted() and match order statistics one by one."""
    B = pc.shape[0]
    if unpaired_variant:
        a, c = pc - rc, pr - rr
    else:
        a, c = pc - pr, rc - rr
    ia = sorted(range(B), key=lambda i: a[i].item())
    ic = sorted(range(B), key=lambda i: c[i].item())
    return torch.stack([-logsig(b * (a[ia[k]] - c[ic[k]])) for k in range(B)])


def naive_batch(name, x, beta):
    """The naive reference for a whole batch: a loop over pairs (or order statistics)."""
    if name in ("aot", "aot_unpaired"):
        return naive_aot(*x, beta, unpaired_variant=name == "aot_unpaired")
    if name == "simpo":
        w, l = x
        return torch.stack([-logsig(beta * (w[i] - l[i]) - 0.5) for i in range(len(w))])
    if name == "orpo":
        w, l = x
        lo = lambda a: torch.log(torch.exp(a) / (1 - torch.exp(a)))  # noqa: E731
        return torch.stack([-beta * logsig(lo(w[i]) - lo(l[i])) for i in range(len(w))])
    if name == "kto":
        p, r, d = x
        rows = []
        for i in range(len(p)):
            ri = p[i] - r[i]
            if d[i]:  # kl = 0.2, w_d = 1.5, w_u = 0.7
                rows.append(1.5 * (1 - sig(beta * (ri - 0.2))))
            else:
                rows.append(0.7 * (1 - sig(beta * (0.2 - ri))))
        return torch.stack(rows)
    pc, pr, rc, rr = x
    f = NAIVE_PAIRED[name]
    return torch.stack([f(pc[i] - rc[i], pr[i] - rr[i], beta) for i in range(len(pc))])


def make_inputs(name, B, seed):
    """fp64 inputs (exactly representable in fp32) for the loss `name`."""
    g = torch.Generator().manual_seed(seed)
    spec = LOSSES[name]
    if spec.kind == "unpaired":
        p = -(torch.rand(B, generator=g, dtype=torch.float64) * 8 + 0.5)
        r = p + torch.randn(B, generator=g, dtype=torch.float64)
        d = torch.rand(B, generator=g) < 0.5
        tensors, extra = [p, r], [d]
    elif spec.inputs == "mean":  # per-token means in (-3, -0.02)
        tensors = [-(torch.rand(B, generator=g, dtype=torch.float64) * 3 + 0.02) for _ in range(2)]
        extra = []
    else:  # summed log-probs in (-8.5, -0.5); reference near the policy
        pc, pr = (-(torch.rand(B, generator=g, dtype=torch.float64) * 8 + 0.5) for _ in range(2))
        rc = pc + torch.randn(B, generator=g, dtype=torch.float64)
        rr = pr + torch.randn(B, generator=g, dtype=torch.float64)
        tensors, extra = [pc, pr, rc, rr], []
    tensors = [t.float().double() for t in tensors]  # round to fp32 values
    return tensors, extra


def call_impl(name, tensors, extra, beta):
    spec = LOSSES[name]
    if name == "kto":
        kl = torch.tensor(0.2, dtype=torch.float64)
        return spec.fn(*tensors, *extra, kl, beta=beta, desirable_weight=1.5, undesirable_weight=0.7)
    return spec.fn(*tensors, *extra, beta=beta, **NAIVE_HYPER.get(name, {}))


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-6)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize("B", [1, 3, 7])
@pytest.mark.parametrize("name", CANONICAL)
def test_against_naive_reference(name, B, dtype, tol):
    beta = BETA.get(name, {"simpo": 2.0}.get(name, 0.5))
    base, extra = make_inputs(name, B, seed=1000 * B + CANONICAL.index(name))
    # Implementation in `dtype`; the reference in fp64 on the same (fp32-representable) values.
    x = [t.to(dtype).requires_grad_() for t in base]
    xr = [t.clone().requires_grad_() for t in base]
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)  # distinct per-row weights
    out = call_impl(name, x, extra, beta)
    ref = naive_batch(name, xr + extra, beta)
    assert out.losses.shape == (B,) and out.losses.dtype == dtype
    torch.testing.assert_close(out.losses.double(), ref, rtol=tol, atol=tol)
    g = torch.autograd.grad((out.losses * weights.to(dtype)).sum(), x)
    gr = torch.autograd.grad((ref * weights).sum(), xr)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


# ------------------------------------------------------------------- (c) invariants


def rand_pairs(B=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * scale) for _ in range(4)]


def with_margin(h):
    """Inputs whose log-ratio margin is exactly h (ref = 0, rejected = 0)."""
    h = torch.as_tensor(h, dtype=torch.float64)
    z = torch.zeros_like(h)
    return [h.clone().requires_grad_(), z.clone(), z.clone(), z.clone()]


def test_dpo_no_smoothing_is_logsigmoid():
    x = rand_pairs(7, seed=1)
    h = (x[0] - x[2]) - (x[1] - x[3])
    for beta in (0.01, 0.1, 1.0):
        out = pairwise.dpo(*x, beta=beta)
        torch.testing.assert_close(out.losses, -F.logsigmoid(beta * h), rtol=0, atol=0)


def test_robust_and_aot_without_smoothing_reduce_to_dpo():
    x = rand_pairs(7, seed=2)
    dpo = pairwise.dpo(*x, beta=0.2).losses
    torch.testing.assert_close(pairwise.robust(*x, beta=0.2).losses, dpo)
    one = [t[:1] for t in x]  # a single pair: sorting is the identity
    torch.testing.assert_close(pairwise.aot(*one, beta=0.2).losses, dpo[:1])
    torch.testing.assert_close(pairwise.aot_unpaired(*one, beta=0.2).losses, dpo[:1])


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_ipo_minimum_at_half_inverse_beta(beta):
    h_star = 1 / (2 * beta)
    x = with_margin([h_star])
    out = pairwise.ipo(*x, beta=beta)
    (g,) = torch.autograd.grad(out.losses.sum(), x[0])
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)
    assert g.item() == pytest.approx(0.0, abs=1e-12)
    for dh in (-1e-2, 1e-2, 1.0):
        assert pairwise.ipo(*with_margin([h_star + dh]), beta=beta).losses.item() > 0


def test_sppo_hard_minimum():
    beta = 0.25
    # r_w = 1/(2 beta) and r_l = -1/(2 beta)
    x = [torch.tensor([2.0]), torch.tensor([-2.0]), torch.zeros(1), torch.zeros(1)]
    assert pairwise.sppo_hard(*x, beta=beta).losses.item() == 0.0


def test_hinge_zero_beyond_margin():
    beta = 0.5
    x = with_margin([2.0, 3.0, 10.0, 1.9])  # beta h = 1, 1.5, 5, 0.95
    out = pairwise.hinge(*x, beta=beta)
    (g,) = torch.autograd.grad(out.losses.sum(), x[0])
    assert out.losses[:3].tolist() == [0.0, 0.0, 0.0] and g[1:3].tolist() == [0.0, 0.0]
    assert out.losses[3].item() == pytest.approx(0.05) and g[3].item() == pytest.approx(-beta)


@pytest.mark.parametrize("name", REF_PAIRED)
def test_rewards_are_beta_logratio_and_detached(name):
    x = [t.requires_grad_() for t in rand_pairs(5, seed=3)]
    out = LOSSES[name].fn(*x, beta=0.3)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (x[0] - x[2]).detach())
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (x[1] - x[3]).detach())
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_rewards_are_beta_avg(name):
    w, l = (-(torch.rand(5, dtype=torch.float64) + 0.1) for _ in range(2))
    out = LOSSES[name].fn(w, l, beta=0.7)
    torch.testing.assert_close(out.chosen_rewards, 0.7 * w)
    torch.testing.assert_close(out.rejected_rewards, 0.7 * l)


def test_kto_kl_clamped_and_not_differentiated():
    p = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.2, -1.5, -3.3], dtype=torch.float64)
    d = torch.tensor([True, False, True])
    zero = unpaired.kto(p, r, d, torch.tensor(0.0)).losses
    kl = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    out = unpaired.kto(p, r, d, kl)
    torch.testing.assert_close(out.losses, zero)  # negative KL acts as 0
    g_kl, g_p = torch.autograd.grad(out.losses.sum(), [kl, p], allow_unused=True)
    assert g_kl is None and g_p is not None  # no gradient path through kl
    kl_pos = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    out = unpaired.kto(p, r, d, kl_pos)
    assert torch.autograd.grad(out.losses.sum(), kl_pos, allow_unused=True)[0] is None
    # rewards: beta * r for every row, both fields (the caller masks by `desirable`)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (p - r).detach())
    assert out.rejected_rewards is out.chosen_rewards
    est = unpaired.kto_kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -1.0]))
    assert est.item() == 0.0  # mean -0.75 clamped


def test_kto_weights_and_validation():
    p, r = torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -1.5])
    d = torch.tensor([True, False])
    base = unpaired.kto(p, r, d, torch.tensor(0.0)).losses
    kl = torch.tensor(0.0)
    out = unpaired.kto(p, r, d, kl, desirable_weight=2.0, undesirable_weight=3.0).losses
    torch.testing.assert_close(out, base * torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="bool"):
        unpaired.kto(p, r, torch.tensor([1, 0]), torch.tensor(0.0))


def test_bco_pair_delta_not_differentiated():
    x = [t.requires_grad_() for t in rand_pairs(3, seed=4)]
    delta = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    out = pairwise.bco_pair(*x, delta=delta)
    assert torch.autograd.grad(out.losses.sum(), delta, allow_unused=True)[0] is None


def test_aot_is_permutation_invariant():
    x = rand_pairs(7, seed=5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    for fn in (pairwise.aot, pairwise.aot_unpaired):
        torch.testing.assert_close(fn(*x).losses, fn(*(t[perm] for t in x)).losses)


def test_extreme_inputs_are_finite():
    h = [1e4, -1e4, 0.0]
    names = ("dpo", "robust", "hinge", "bco_pair", "nca_pair", "apo_zero", "apo_down", "exo_pair")
    for name in names + ("discopop",):
        x = with_margin(h)
        out = LOSSES[name].fn(*x, beta=0.1)
        (g,) = torch.autograd.grad(out.losses.sum(), x[0])
        assert torch.isfinite(out.losses).all() and torch.isfinite(g).all(), name
    assert pairwise.dpo(*with_margin([-1e4]), beta=0.1).losses.item() == pytest.approx(1e3)


def test_orpo_log_odds_stable_near_zero_and_far():
    values = [-1e-12, -1e-6, -0.5, -math.log(2), -2.0, -50.0, -700.0]
    a = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    lo = log_odds(a)
    expected = [v - math.log(-math.expm1(v)) for v in a.tolist()]
    assert lo.tolist() == pytest.approx(expected, rel=1e-12)
    (g,) = torch.autograd.grad(lo.sum(), a)
    assert torch.isfinite(g).all()  # d/da log odds = 1/(1-p)
    torch.testing.assert_close(g, 1 / -torch.expm1(a.detach()))
    out = pairwise.orpo(a[:3], a[4:])  # chosen near p = 1, rejected tiny p
    assert torch.isfinite(out.losses).all()


def test_label_smoothing_ranges():
    x = rand_pairs(3)
    with pytest.raises(ValueError):
        pairwise.exo_pair(*x, label_smoothing=1.0)
    # 0 means the default eps = 1e-3 (a config's shared label_smoothing is 0 for dpo)
    default = pairwise.exo_pair(*x).losses
    torch.testing.assert_close(pairwise.exo_pair(*x, label_smoothing=0.0).losses, default)
    with pytest.raises(ValueError):
        pairwise.robust(*x, label_smoothing=0.5)


def test_shape_mismatch_is_an_error():
    x = rand_pairs(3)
    with pytest.raises(ValueError, match="1-D"):
        pairwise.dpo(x[0], x[1][:2], x[2], x[3])
    with pytest.raises(ValueError, match="1-D"):
        pairwise.simpo(x[0][None], x[1][None])


# --------------------------------------------------------------------- registry


def test_registry_specs():
    for name in CANONICAL:
        spec = LOSSES[name]
        assert spec.name == name == spec.fn.__name__
        assert spec.kind in ("paired", "unpaired") and spec.inputs in ("sum", "mean")
        assert spec.fn.__doc__ and "Shapes" in spec.fn.__doc__
    for name in ("simpo", "orpo"):
        assert LOSSES[name].inputs == "mean" and not LOSSES[name].needs_reference
    assert LOSSES["ipo"].inputs == "sum" and LOSSES["ipo"].needs_reference
    assert LOSSES["kto"].kind == "unpaired"
    assert LOSSES["dpo"].defaults == {"beta": 0.1, "label_smoothing": 0.0}
    assert LOSSES["simpo"].defaults == {"beta": 2.0, "gamma": 0.5}
    assert LOSSES["exo_pair"].defaults["label_smoothing"] == 1e-3
    assert LOSSES["discopop"].defaults["discopop_tau"] == 0.05
    assert "delta" not in LOSSES["bco_pair"].defaults  # state, not a hyper-parameter
    assert input_keys(LOSSES["kto"]) == ("policy_logps", "ref_logps", "desirable", "kl")
    assert input_keys(LOSSES["simpo"]) == ("policy_chosen_avg", "policy_rejected_avg")
    expected = {"dpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto", "bco_pair", "nca_pair",
                "sppo_hard", "apo_zero", "apo_down", "exo_pair", "discopop", "aot", "aot_pair"}
    assert expected <= set(LOSSES)


def test_aliases():
    assert get_loss("sigmoid") is LOSSES["dpo"]
    assert get_loss("aot_pair") is LOSSES["aot_unpaired"]


@pytest.mark.parametrize(
    "typo,suggestion",
    [("dpoo", "dpo"), ("simpoo", "simpo"), ("kto_", "kto"), ("apo-zero", "apo_zero")],
)
def test_get_loss_unknown_suggests(typo, suggestion):
    with pytest.raises(UserError) as e:
        get_loss(typo)
    assert f"did you mean '{suggestion}'" in str(e.value) and repr(typo) in str(e.value)


def test_get_loss_unknown_without_close_match_lists_known():
    with pytest.raises(UserError, match="known losses: .*dpo"):
        get_loss("zzzzzz")


# --------------------------------------------------------------------- combined


def _combined_inputs(B=5):
    pc, pr, rc, rr = rand_pairs(B, seed=6)
    avg = [-(torch.rand(B, dtype=torch.float64) + 0.05) for _ in range(2)]
    return {"policy_chosen": pc, "policy_rejected": pr, "ref_chosen": rc, "ref_rejected": rr,
            "policy_chosen_avg": avg[0], "policy_rejected_avg": avg[1]}


def test_combined_rpo_is_dpo_plus_weighted_nll():
    inp = _combined_inputs()
    rpo = combined({"dpo": 1.0, "sft": 0.5}, {"dpo": {"beta": 0.2}})
    assert rpo.needs_reference and rpo.required == {"policy_chosen", "policy_rejected", "ref_chosen",
                                                     "ref_rejected", "policy_chosen_avg"}
    out = rpo(inp)
    dpo = pairwise.dpo(*(inp[k] for k in input_keys(LOSSES["dpo"])), beta=0.2)
    torch.testing.assert_close(out.losses, dpo.losses - 0.5 * inp["policy_chosen_avg"])
    torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards)


def test_combined_mixes_sum_and_mean_losses():
    inp = _combined_inputs()
    mix = combined({"simpo": 0.3, "ipo": 2.0})
    out = mix(inp)
    simpo = pairwise.simpo(inp["policy_chosen_avg"], inp["policy_rejected_avg"])
    ipo = pairwise.ipo(*(inp[k] for k in input_keys(LOSSES["ipo"])))
    torch.testing.assert_close(out.losses, 0.3 * simpo.losses + 2.0 * ipo.losses)
    torch.testing.assert_close(out.chosen_rewards, simpo.chosen_rewards)  # first term's rewards
    assert not combined({"simpo": 1.0, "sft": 1.0}).needs_reference
    with pytest.raises(ValueError, match="ref_chosen"):
        mix({k: v for k, v in inp.items() if k != "ref_chosen"})


@pytest.mark.parametrize(
    "weights,params,match",
    [
        ({"dpoo": 1.0}, None, "did you mean 'dpo'"),
        ({"sfT": 1.0, "dpo": 1.0}, None, "did you mean 'sft'"),
        ({"kto": 1.0}, None, "unpaired"),
        ({"sft": 1.0}, None, "at least one preference loss"),
        ({}, None, "at least one"),
        ({"dpo": 1.0}, {"dpo": {"gamma": 1.0}}, "no parameter .gamma.; its parameters: beta, label_smoothing"),
        ({"dpo": 1.0}, {"ipo": {"beta": 1.0}}, "no weight"),
    ],
)
def test_combined_errors(weights, params, match):
    with pytest.raises(UserError, match=match):
        combined(weights, params)
