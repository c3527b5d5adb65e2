"""Paired preference losses: pure functions of [B] tensors.

Notation (see docs/design.md): policy pi, frozen reference pi_ref, chosen y_w,
rejected y_l. Inputs are per-sequence log-probs, shape [B], one entry per pair:

    policy_chosen   = log pi(y_w|x)        ref_chosen   = log pi_ref(y_w|x)
    policy_rejected = log pi(y_l|x)        ref_rejected = log pi_ref(y_l|x)

    chosen log-ratio   r_w = policy_chosen   - ref_chosen
    rejected log-ratio r_l = policy_rejected - ref_rejected
    margin             h   = r_w - r_l

Every loss returns ``LossOutput(losses [B], chosen_rewards [B], rejected_rewards [B])``:
the per-pair loss (not reduced; the trainer takes the mean) and the implicit rewards
beta * r_w, beta * r_l, detached (they are metrics, never a path for gradients).
SimPO and ORPO take per-token mean log-probs and no reference; their rewards are
beta * mean log-prob.

All log-sigmoids go through ``F.logsigmoid`` (no overflow for large |x|), and
1 - sigmoid(x) is written sigmoid(-x) (no cancellation near x >> 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.loss_table import takes_defaults


class LossOutput(NamedTuple):
    """What every loss returns; all three are [B]."""

    losses: Tensor  # per-example loss, not reduced
    chosen_rewards: Tensor  # detached
    rejected_rewards: Tensor  # detached


# --------------------------------------------------------------------------- helpers


def check_batch(*tensors: Tensor) -> None:
    """Raise ValueError unless all tensors are 1-D with the same length (a caller bug)."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"losses expect 1-D tensors of one shape [B], got shapes {shapes}")


def logratios(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> tuple[Tensor, Tensor]:
    """(r_w, r_l) = (policy_chosen - ref_chosen, policy_rejected - ref_rejected), checked [B]."""
    check_batch(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def output(losses: Tensor, beta: float, chosen: Tensor, rejected: Tensor) -> LossOutput:
    """Package losses with rewards beta*chosen, beta*rejected (detached)."""
    return LossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def _smoothed_logistic(x: Tensor, eps: float) -> Tensor:
    """-(1-eps) log sig(x) - eps log sig(-x): logistic loss against the soft label 1-eps."""
    loss = -F.logsigmoid(x)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-x)
    return loss


# ------------------------------------------------------------------- reference losses


@takes_defaults
def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing):
    """DPO (sigmoid) loss; conservative DPO (cDPO) when label_smoothing = e > 0.

        loss = -(1-e) log sig(beta h) - e log sig(-beta h)      (e = 0: -log sig(beta h))

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
    a Reward Model"; cDPO: Mitchell 2023, "A note on DPO with noisy preferences".
    Shapes: four [B] summed log-probs -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return output(_smoothed_logistic(beta * (rw - rl), label_smoothing), beta, rw, rl)


@takes_defaults
def robust(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing):
    """Robust DPO: an unbiased estimate of the clean DPO loss when labels flip with rate e.

        loss = [-(1-e) log sig(beta h) + e log sig(-beta h)] / (1 - 2e),   0 <= e < 1/2

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback". Shapes: four [B] -> LossOutput of [B].
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    x = beta * (rw - rl)
    e = label_smoothing
    losses = (-(1 - e) * F.logsigmoid(x) + e * F.logsigmoid(-x)) / (1 - 2 * e)
    return output(losses, beta, rw, rl)


@takes_defaults
def hinge(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Hinge (SLiC-style) loss: loss = relu(1 - beta h); zero once beta h >= 1.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"
    (with the reference log-ratio, as in the DPO paper's appendix).
    Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return output(F.relu(1 - beta * (rw - rl)), beta, rw, rl)


@takes_defaults
def ipo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """IPO loss: loss = (h - 1/(2 beta))^2, minimised at h = 1/(2 beta).

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences". Inputs are summed log-probs (the paper's convention); the trainer feeds
    per-token means instead with ``ipo_average_logps``. Shapes: four [B] -> LossOutput [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return output((rw - rl - 1 / (2 * beta)) ** 2, beta, rw, rl)


@takes_defaults
def bco_pair(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, delta=0.0):
    """Pairwise BCO: a binary classifier with logit beta*r - delta; chosen = 1, rejected = 0.

        loss = -log sig(beta r_w - delta) - log sig(-(beta r_l - delta))

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment".
    ``delta`` is the running mean of the rewards beta*r over past batches (both chosen and
    rejected). The loss stays pure: the trainer keeps that running mean and passes it in
    (scalar tensor or float, detached here; 0 at the first step).
    Shapes: four [B] (+ scalar delta) -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    d = torch.as_tensor(delta, dtype=rw.dtype, device=rw.device).detach()
    losses = -F.logsigmoid(beta * rw - d) - F.logsigmoid(-(beta * rl - d))
    return output(losses, beta, rw, rl)


@takes_defaults
def nca_pair(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Pairwise NCA: absolute (not only relative) likelihood targets for each response.

        loss = -log sig(beta r_w) - 1/2 log sig(-beta r_w) - 1/2 log sig(-beta r_l)

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards" (NCA with K = 2, binary preference). Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (
        -F.logsigmoid(beta * rw) - 0.5 * F.logsigmoid(-beta * rw) - 0.5 * F.logsigmoid(-beta * rl)
    )
    return output(losses, beta, rw, rl)


@takes_defaults
def sppo_hard(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """SPPO with hard labels: regress each log-ratio to +-1/(2 beta) (win prob. 1 vs 0).

        loss = (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment"
    (eta = 1/beta, P(y_w > y_l) replaced by the hard labels 1 and 0).
    Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    target = 1 / (2 * beta)
    return output((rw - target) ** 2 + (rl + target) ** 2, beta, rw, rl)


@takes_defaults
def apo_zero(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """APO-zero: push the chosen likelihood up and the rejected down (use when y_w beats
    the model's own outputs).

        loss = (1 - sig(beta r_w)) + sig(beta r_l)

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions". Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return output(torch.sigmoid(-beta * rw) + torch.sigmoid(beta * rl), beta, rw, rl)


@takes_defaults
def apo_down(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """APO-down: push both likelihoods down, the rejected more (use when the model's
    outputs beat y_w).

        loss = sig(beta r_w) + (1 - sig(beta (r_w - r_l)))

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions". Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return output(torch.sigmoid(beta * rw) + torch.sigmoid(-beta * (rw - rl)), beta, rw, rl)


@takes_defaults
def exo_pair(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing
):
    """Pairwise EXO: reverse KL from the model's preference distribution to a soft label.

    With p = sig(beta h) the policy's probability that y_w wins and eps the label
    smoothing (target distribution (1-eps, eps); eps must be > 0 or the KL is infinite):

        loss = KL(p || 1-eps) = p (log p - log(1-eps)) + (1-p) (log(1-p) - log eps)
             = sig(x)(log sig(x) - log(1-eps)) + sig(-x)(log sig(-x) - log eps),  x = beta h

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"
    (eq. 16 with K = 2). label_smoothing = 0 means the default 1e-3 (TRL's convention),
    so a config's shared label_smoothing of 0 (right for dpo) is safe here too.
    Shapes: four [B] -> LossOutput of [B].
    """
    eps = label_smoothing or 1e-3
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs 0 <= label_smoothing < 1, got {label_smoothing}")
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    x = beta * (rw - rl)
    losses = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )
    return output(losses, beta, rw, rl)


@takes_defaults
def discopop(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, discopop_tau
):
    """DiscoPOP / LRML (log-ratio modulated loss): a logistic/exponential blend.

    With rho = beta h and mixing weight m = sig(rho / tau):

        loss = (1 - m) * (-log sig(rho)) + m * exp(-rho)

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for
    Large Language Models" (eq. 5). Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    rho = beta * (rw - rl)
    z = rho / discopop_tau
    # m * exp(-rho) as exp(log m - rho): at rho << 0 exp(-rho) alone overflows and
    # inf * 0 would be nan, while the product itself is tiny (for tau < 1).
    losses = -torch.sigmoid(-z) * F.logsigmoid(rho) + torch.exp(F.logsigmoid(z) - rho)
    return output(losses, beta, rw, rl)


@takes_defaults
def aot(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing):
    """AOT (paired): distributional alignment via 1-D optimal transport over the batch.

    Sort the policy margins u = policy_chosen - policy_rejected and the reference margins
    v = ref_chosen - ref_rejected separately (ascending); the optimal 1-D transport plan
    matches them in sorted order, and each matched pair gets a (smoothed) logistic loss:

        loss_i = -(1-e) log sig(beta (u_(i) - v_(i))) - e log sig(-beta (u_(i) - v_(i)))

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport". Note: loss_i belongs to the i-th order statistic, not to row i, so the
    loss depends on the whole batch (only its mean is meaningful; micro-batching changes
    it). Rewards are per row, beta r_w and beta r_l. Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    u = torch.sort(policy_chosen - policy_rejected, dim=0).values
    v = torch.sort(ref_chosen - ref_rejected, dim=0).values
    return output(_smoothed_logistic(beta * (u - v), label_smoothing), beta, rw, rl)


@takes_defaults
def aot_unpaired(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing
):
    """AOT (unpaired): the chosen log-ratios should dominate the rejected ones in
    distribution (first-order stochastic dominance), without using the pairing.

    Sort r_w and r_l separately (ascending) and match them in sorted order:

        loss_i = -(1-e) log sig(beta (r_w(i) - r_l(i))) - e log sig(-beta (r_w(i) - r_l(i)))

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport". TRL calls this variant "aot_pair" (registered here as an alias). As for
    ``aot``, loss_i belongs to an order statistic, not to row i.
    Shapes: four [B] -> LossOutput of [B].
    """
    rw, rl = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    diff = torch.sort(rw, dim=0).values - torch.sort(rl, dim=0).values
    return output(_smoothed_logistic(beta * diff, label_smoothing), beta, rw, rl)


# ------------------------------------------------------------ reference-free losses


@takes_defaults
def simpo(policy_chosen_avg, policy_rejected_avg, beta, gamma):
    """SimPO: length-normalised, reference-free DPO with a target margin gamma.

        loss = -log sig(beta (avg_w - avg_l) - gamma),   avg = mean per-token log pi(y|x)

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward".
    gamma is the margin itself (the paper's gamma; TRL's gamma_beta_ratio is gamma/beta).
    Rewards: beta * avg. Shapes: two [B] per-token means -> LossOutput of [B].
    """
    check_batch(policy_chosen_avg, policy_rejected_avg)
    losses = -F.logsigmoid(beta * (policy_chosen_avg - policy_rejected_avg) - gamma)
    return output(losses, beta, policy_chosen_avg, policy_rejected_avg)


def log_odds(avg_logp: Tensor) -> Tensor:
    """log(p / (1-p)) for p = exp(avg_logp) <= 1, i.e. avg - log(1 - exp(avg)), stably.

    log(1 - exp(a)) is computed as log(-expm1(a)) for a > -log 2 and log1p(-exp(a))
    otherwise (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"): each branch is
    accurate where the other loses digits. Both branches are finite for a < 0, so
    torch.where's backward sees no inf/nan.
    """
    log1m_p = torch.where(
        avg_logp > -math.log(2.0),
        torch.log(-torch.expm1(avg_logp)),
        torch.log1p(-torch.exp(avg_logp)),
    )
    return avg_logp - log1m_p


@takes_defaults
def orpo(policy_chosen_avg, policy_rejected_avg, beta):
    """ORPO odds-ratio term (the trainer adds the chosen NLL, -policy_chosen_avg).

        loss = -beta log sig(log odds(y_w) - log odds(y_l)),
        odds(y) = p / (1-p), p = exp(avg log pi(y|x))

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (beta is the paper's lambda). Rewards: beta * avg.
    Shapes: two [B] per-token means (all < 0) -> LossOutput of [B].
    """
    check_batch(policy_chosen_avg, policy_rejected_avg)
    diff = log_odds(policy_chosen_avg) - log_odds(policy_rejected_avg)
    return output(-beta * F.logsigmoid(diff), beta, policy_chosen_avg, policy_rejected_avg)
