"""The Bradley-Terry reward-model loss (InstructGPT; TRL's RewardTrainer).

For a pair with scalar scores r_c (chosen) and r_r (rejected), an optional margin m and a
centering coefficient c:

    loss = -log sigmoid(r_c - r_r - m)  +  c * (r_c + r_r)^2

averaged over the pairs of a step. The first term is the negative log-likelihood of the
preference under Bradley-Terry, P(chosen > rejected) = sigmoid(r_c - r_r); a margin m > 0 asks
the chosen score to lead by at least m (Llama 2's graded preferences). Bradley-Terry only sees
differences, so the scores can drift together without bound; the centering term (TRL's
center_rewards_coefficient, following Eisenstein et al. 2023) pulls the mean score of each pair
towards 0. Since (r_c + r_r)^2 is per pair, its mean over the step equals TRL's
c * mean((r_c + r_r)^2) and the step's loss does not depend on how it is split into micro-batches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class RewardLoss(NamedTuple):
    losses: Tensor    # [B] per-pair loss (the step's loss is their mean)
    correct: Tensor   # [B] 1.0 where r_c > r_r (pairwise accuracy)
    margins: Tensor   # [B] r_c - r_r


def bradley_terry(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                  center_coef: float = 0.0) -> RewardLoss:
    """Per-pair loss -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2 of [B] scores (fp32)."""
    chosen, rejected = chosen.float(), rejected.float()
    diff = chosen - rejected
    # logsigmoid, not log(sigmoid(.)): exact for large |diff| where sigmoid rounds to 0 or 1.
    losses = -F.logsigmoid(diff if margin is None else diff - margin.to(diff))
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return RewardLoss(losses, (diff > 0).float(), diff.detach())


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Fraction of pairs whose chosen completion scores higher (ties count as wrong)."""
    return (chosen > rejected).float().mean().item() if chosen.numel() else float("nan")

