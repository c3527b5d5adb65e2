"""Unpaired (binary-feedback) losses: each row is one completion labelled desirable or not.

Inputs are [B] summed log-probs ``policy_logps = log pi(y|x)``, ``ref_logps =
log pi_ref(y|x)`` and a bool [B] ``desirable``; r = policy_logps - ref_logps.

Reward convention (LossOutput has no row mask): ``chosen_rewards`` and
``rejected_rewards`` are both beta * r for *every* row, the same tensor. The caller
masks them: rewards/chosen = chosen_rewards[desirable], rewards/rejected =
rejected_rewards[~desirable] (a batch may hold only one kind).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.loss_table import takes_defaults

from .pairwise import LossOutput, check_batch


def _unpaired_logratios(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor) -> Tensor:
    """r = policy_logps - ref_logps, after checking shapes and that desirable is bool."""
    check_batch(policy_logps, ref_logps, desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    return policy_logps - ref_logps


def _unpaired_output(losses: Tensor, beta: float, r: Tensor) -> LossOutput:
    rewards = (beta * r).detach()
    return LossOutput(losses, rewards, rewards)


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """The KTO reference point z: mean(log pi(y'|x) - log pi_ref(y'|x)) over mismatched
    (x, y') pairs, detached and clamped at 0 (a KL is never negative).

    Under data parallelism the trainer averages this over all processes before ``kto``.
    """
    check_batch(policy_kl_logps, ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


@takes_defaults
def kto(
    policy_logps,
    ref_logps,
    desirable,
    kl,
    beta,
    desirable_weight,
    undesirable_weight,
):
    """KTO: prospect-theoretic loss on unpaired desirable/undesirable completions.

        z = max(kl, 0)  (detached: the reference point carries no gradient)
        desirable:   loss = w_d (1 - sig(beta (r - z)))
        undesirable: loss = w_u (1 - sig(beta (z - r)))

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization".
    ``kl`` is a scalar tensor (or float), e.g. from ``kto_kl_estimate``.
    Rewards: beta * r for every row in both fields (see the module docstring; the caller
    masks by ``desirable``).
    Shapes: [B], [B], bool [B], scalar -> LossOutput of [B].
    """
    r = _unpaired_logratios(policy_logps, ref_logps, desirable)
    z = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach().clamp(min=0)
    # 1 - sig(x) written as sig(-x): exact where sig(x) rounds to 1.
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (r - z)),
        undesirable_weight * torch.sigmoid(-beta * (z - r)),
    )
    return _unpaired_output(losses, beta, r)

