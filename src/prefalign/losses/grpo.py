"""GRPO: group-relative advantages and the clipped policy-gradient surrogate, as pure functions.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) samples a group of G completions
per prompt, scores them, and uses each completion's reward relative to its group as the
advantage of every one of its tokens, in a PPO-style clipped objective (no value model).

Variants implemented through options:
  - Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783):
    no std scaling of advantages (scale="none") and a constant normalizer
    (aggregation="dr_grpo"), which removes the length and difficulty biases.
  - DAPO (Yu et al. 2025, arXiv:2503.14476): token-level mean over the whole batch
    (aggregation="dapo") and a decoupled upper clip range (clip_eps_high).

Shapes: B completions (= P prompts x G samples, grouped: row p*G + g), T completion tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages. rewards [P*G] (grouped by prompt) -> advantages [P*G].

        A_i = (r_i - mean_group(r)) / (s + eps)

    s = std of r_i's group     (scale="group", GRPO)
        std of all P*G rewards (scale="batch", less noisy for small groups)
        1, and no eps          (scale="none",  Dr. GRPO)

    The std is the unbiased (n - 1) estimate; a group of one has advantage 0.
    A group whose rewards are all equal gets advantage 0 whatever the scale: it carries
    no signal about which completion is better.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [P*G] with G={group_size}, got shape {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)                                 # [P, G]
    centered = r - r.mean(dim=1, keepdim=True)                       # [P, G]
    if scale == "none" or group_size == 1:
        return centered.flatten()
    if scale == "group":
        std = r.std(dim=1, keepdim=True)                             # [P, 1]
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return (centered / (std + eps)).flatten()


class GRPOOutput(NamedTuple):
    loss: Tensor               # scalar, what to backpropagate
    per_token_loss: Tensor     # [B, T] (zero where mask is 0)
    per_token_kl: Tensor       # [B, T] k3 estimate of KL(pi || pi_ref), detached (zeros when beta == 0 or no ref)
    kl: Tensor                 # scalar: mean of per_token_kl over completion tokens (detached)
    clip_fraction: Tensor      # scalar: share of tokens whose gradient the clip removed (detached)
    low_clip_fraction: Tensor  # scalar: ratio < 1 - eps with A < 0
    high_clip_fraction: Tensor # scalar: ratio > 1 + eps_high with A > 0
    ratio_mean: Tensor         # scalar: mean importance ratio over tokens (detached)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
) -> GRPOOutput:
    """The clipped surrogate with an optional KL penalty.

    logps      [B, T] log pi_theta(o_t | q, o_<t) of the sampled tokens (with grad)
    old_logps  [B, T] the same under the policy that sampled them (no grad); None means
               "one update per generation", i.e. old = logps.detach() and the ratio is 1
    ref_logps  [B, T] under the reference policy; needed when beta > 0
    advantages [B]    one per completion, broadcast over its tokens (see group_advantages)
    mask       [B, T] 1 on completion tokens, 0 on padding

    Per token, with ratio rho_t = exp(logps - old_logps) and A the completion's advantage:

        surrogate_t = min(rho_t * A, clip(rho_t, 1 - eps, 1 + eps_high) * A)
        kl_t        = exp(ref - logp) - (ref - logp) - 1           (k3: unbiased, >= 0)
        loss_t      = -surrogate_t + beta * kl_t

    eps_high defaults to eps (symmetric PPO clip); DAPO's "clip-higher" sets it larger.
    Aggregation over the tokens (m = mask, |o_i| = sum_t m_it, L = max_completion_length):

        grpo:    1/B sum_i [ 1/|o_i| sum_t m_it loss_it ]     (each sequence weighs the same)
        dapo:    sum_it m_it loss_it / sum_it m_it             (each token weighs the same)
        dr_grpo: sum_it m_it loss_it / (B * L)                 (a constant normalizer; L defaults to T)

    Clip fraction counts tokens where the clipped branch is the minimum and strictly smaller,
    i.e. the clip zeroes the gradient: (rho < 1 - eps and A < 0) or (rho > 1 + eps_high and A > 0).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the KL term compares to the reference)")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()

    A = advantages.to(logps.dtype)[:, None]                          # [B, 1]
    ratio = torch.exp(logps - old_logps)                             # [B, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(ratio * A, clipped * A)                # [B, T]
    per_token_loss = -surrogate

    if beta > 0:
        d = ref_logps - logps                                        # [B, T] log(pi_ref / pi)
        kl = torch.exp(d) - d - 1
        per_token_loss = per_token_loss + beta * kl
    elif ref_logps is not None:  # reported, not trained on
        d = ref_logps - logps.detach()
        kl = torch.exp(d) - d - 1
    else:
        kl = torch.zeros_like(logps)
    per_token_loss = per_token_loss * mask

    B, T = logps.shape
    n_tokens = mask.sum().clamp(min=1)
    if aggregation == "grpo":
        loss = (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif aggregation == "dapo":
        loss = per_token_loss.sum() / n_tokens
    else:
        loss = per_token_loss.sum() / (B * (max_completion_length or T))

    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (A < 0)).to(mask.dtype) * mask
        high = ((ratio > 1 + eps_high) & (A > 0)).to(mask.dtype) * mask
        kl = (kl * mask).detach()
        return GRPOOutput(
            loss=loss,
            per_token_loss=per_token_loss,
            per_token_kl=kl,
            kl=kl.sum() / n_tokens,
            clip_fraction=(low + high).sum() / n_tokens,
            low_clip_fraction=low.sum() / n_tokens,
            high_clip_fraction=high.sum() / n_tokens,
            ratio_mean=(ratio.detach() * mask).sum() / n_tokens,
        )
