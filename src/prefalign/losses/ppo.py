"""PPO for RLHF as pure functions: KL-penalised per-token rewards, GAE, whitening, the clipped
policy and value losses, and the adaptive KL controller.

Papers: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347);
Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation" (arXiv:1506.02438); Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences" (arXiv:1909.08593: the KL-penalised reward and the adaptive KL controller);
Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155); Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO" (arXiv:2403.17031), whose conventions (and TRL's PPOTrainer's) these follow.

The episode: a prompt, then completion tokens a_0 .. a_{n-1}; token a_t is the action taken in
state s_t = (prompt, a_<t). It ends after the last completion token (EOS or the length limit),
so the value after it is 0.

Shapes: B completions, T completion tokens (right-padded); mask [B, T] is 1 on the first n_i
tokens of row i and 0 after them (every row has n_i >= 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * m) / sum(m) over all positions: a token mean. x, mask [B, T] -> scalar."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """The unbiased (n - 1) variance of the masked entries of x; 0 when fewer than 2."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 2:
        return x.new_zeros(())
    centred = (x - masked_mean(x, mask)) * mask
    return (centred ** 2).sum() / (n - 1)


def kl_penalty_rewards(logps: Tensor, ref_logps: Tensor, scores: Tensor, mask: Tensor,
                       kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards of Ziegler et al.: (rewards [B, T], kl [B, T]).

        kl_t = log pi_old(a_t | s_t) - log pi_ref(a_t | s_t)        (the sampled log-ratio, k1)
        r_t  = -kl_coef * kl_t  +  [t == n_i - 1] * score_i

    logps, ref_logps [B, T] (sampling policy and reference, no grad), scores [B] (the reward
    function's score of each whole completion), mask [B, T]. The score lands on the LAST
    completion token only; padding gets nothing (both outputs are 0 there). Summed over a
    row, sum_t r_t = score_i - kl_coef * KL_i with KL_i = sum_t kl_t, the Monte-Carlo estimate
    of KL(pi || pi_ref) over the whole completion that the adaptive controller targets.
    """
    m = mask.to(logps.dtype)
    lengths = mask.sum(dim=1).long()                                       # [B]
    if (lengths < 1).any():
        raise ValueError("every completion needs at least one token (the score goes on its last)")
    kl = (logps - ref_logps) * m                                           # [B, T]
    rewards = -kl_coef * kl
    rows = torch.arange(logps.shape[0], device=logps.device)
    rewards = rewards.index_put((rows, lengths - 1), scores.to(logps.dtype), accumulate=True)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: (advantages [B, T], returns [B, T]).

        delta_t = r_t + gamma * V_{t+1} - V_t                (V_{t+1} = 0 after the last token)
        A_t     = delta_t + gamma * lam * A_{t+1}            (A_{t+1} = 0 after the last token)
        R_t     = A_t + V_t                                  (the value target, TD(lambda) return)

    rewards, values [B, T] (values of the rollout, no grad); mask [B, T]. Padding positions
    come out 0. gamma = 1, lam = 1 gives A_t = sum_{k >= t} r_k - V_t (Monte-Carlo return).
    """
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values * m
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_value = r.new_zeros(B)                                            # [B]
    next_adv = r.new_zeros(B)                                              # [B]
    for t in reversed(range(T)):
        # After a row's last token the next mask is 0: its value and advantage there are 0 already.
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m[:, t]
        next_value, next_adv = v[:, t], adv[:, t]
    return adv, (adv + v) * m


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var), 0 on padding.

    shift_mean False keeps the mean (TRL whitens rewards that way). Advantages are whitened over
    the whole batch, so their scale does not depend on the reward's scale or on kl_coef.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


class PolicyLoss(NamedTuple):
    loss: Tensor           # scalar token mean of the clipped surrogate loss (with grad)
    clip_frac: Tensor      # share of tokens where the clipped branch is taken (detached)
    approx_kl: Tensor      # 1/2 mean (log pi - log pi_old)^2 over tokens: KL(old || new) to 2nd order (detached)
    ratio_mean: Tensor     # mean importance ratio over tokens (detached)


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                        clip_eps: float = 0.2) -> PolicyLoss:
    """The PPO clipped surrogate, as a loss to minimise (a token mean over the batch).

        rho_t  = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
        loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        loss   = sum_t m_t loss_t / sum_t m_t

    logps [B, T] (with grad), old_logps [B, T] (the rollout's), advantages [B, T] (per token,
    whitened), mask [B, T]. clip_frac counts tokens whose clipped branch is strictly larger,
    i.e. those the clip gives no gradient.
    """
    A = advantages.to(logps.dtype)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)                                           # [B, T]
    unclipped = -A * ratio
    clipped = -A * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        return PolicyLoss(loss, masked_mean((clipped > unclipped).to(logps.dtype), mask),
                          0.5 * masked_mean(log_ratio.detach() ** 2, mask), masked_mean(ratio.detach(), mask))


class ValueLoss(NamedTuple):
    loss: Tensor           # scalar (with grad)
    clip_frac: Tensor      # share of tokens where the clipped error is the larger (detached)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float = 0.2) -> ValueLoss:
    """The clipped value loss of PPO's reference implementation (OpenAI baselines, TRL).

        V_clip_t = V_old_t + clip(V_t - V_old_t, -c, c)
        loss     = 1/2 * sum_t m_t max((V_t - R_t)^2, (V_clip_t - R_t)^2) / sum_t m_t

    values [B, T] (with grad), old_values [B, T] (the rollout's), returns [B, T] (GAE targets),
    mask [B, T]. The max is pessimistic: a value that moved more than c from the rollout's
    gets no gradient from the side the clip holds.
    """
    v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err, err_clip = (values - returns) ** 2, (v_clip - returns) ** 2       # [B, T]
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        return ValueLoss(loss, masked_mean((err_clip > err).to(values.dtype), mask))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 = a perfect value model, 0 = no better
    than a constant, < 0 = worse. NaN when the returns have no variance."""
    var = float(masked_var(returns, mask))
    return 1.0 - float(masked_var(returns - values, mask)) / var if var > 0 else float("nan")


@dataclass
class AdaptiveKL:
    """The KL coefficient, fixed or adaptive (Ziegler et al. 2019, section 2.2).

    With a target KL* and a horizon H, after each batch of n completions whose mean KL (the
    sum over a completion's tokens, as kl_penalty_rewards) was KL:

        e        = clip(KL / KL* - 1, -0.2, 0.2)
        kl_coef <- kl_coef * (1 + e * n / H)

    target None: a fixed coefficient (update does nothing).
    """

    value: float
    target: float | None = None
    horizon: float = 10000.0

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
