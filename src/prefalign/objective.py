"""From a micro-batch of tokenized items to a loss and its metrics.

The one bridge between the data, the log-prob math and the pure losses. Each
function returns a loss that is a SUM over the micro-batch's examples (the loop
divides by the examples in the whole optimizer step, so 8 x 1 equals 2 x 4) and
a dict of metric sums with a count, so means are exact across micro-batches and
processes.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from prefalign import logprobs
from prefalign.data.batching import pad_pairs, pad_sequences
from prefalign.errors import UserError
from prefalign.losses import LossSpec


class PairLogps(NamedTuple):
    chosen: torch.Tensor            # [B] summed log-probs
    rejected: torch.Tensor          # [B]
    chosen_count: torch.Tensor      # [B] completion tokens
    rejected_count: torch.Tensor    # [B]


def pair_logps(model, items, *, pad_id: int, packing: bool, token_budget: int, chunk_size: int) -> PairLogps:
    """Summed chosen/rejected log-probs of each pair under `model` (grad flows if enabled)."""
    if packing:
        from prefalign.data.packing import pack_pairs, packed_pair_logps

        longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in items)
        if token_budget and longest > token_budget:
            raise UserError(f"token_budget {token_budget} is smaller than one packed pair ({longest} tokens: "
                            f"prompt + chosen + rejected); raise --token-budget or leave it at 0")
        budget = token_budget or longest
        packed = pack_pairs(items, budget)
        c, r = packed_pair_logps(model, packed, chunk_size=chunk_size or None)
        return PairLogps(c.sum, r.sum, c.count, r.count)
    batch = pad_pairs(items, pad_id)
    out = logprobs.sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels,
                                  chunk_size=chunk_size or None)
    b = len(items)  # rows 0..B-1 chosen, B..2B-1 rejected
    return PairLogps(out.sum[:b], out.sum[b:], out.count[:b], out.count[b:])


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], *, pad_id: int,
                     chunk_size: int, packing: bool = False, token_budget: int = 0) -> logprobs.SeqLogps:
    """Summed log-probs of single completions (SFT, KTO, GRPO), packed or padded."""
    if packing:
        from prefalign.data.packing import pack_completions, packed_logps

        budget = token_budget or max(len(p) + len(c) for p, c in zip(prompts, completions))
        return packed_logps(model, pack_completions(prompts, completions, budget), chunk_size=chunk_size or None)
    batch = pad_sequences(prompts, completions, pad_id)
    return logprobs.sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels,
                                   chunk_size=chunk_size or None)


def loss_kwargs(spec: LossSpec, cfg) -> dict:
    """The hyper-parameters of the config that this loss function accepts."""
    params = inspect.signature(spec.fn).parameters
    known = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "gamma": cfg.gamma,
             "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight}
    return {k: v for k, v in known.items() if k in params}


def _uses_means(spec: LossSpec, cfg) -> bool:
    return spec.inputs == "mean" or (spec.name == "ipo" and cfg.ipo_average_logps)


def paired_loss(spec: LossSpec, cfg, policy: PairLogps, ref: PairLogps | None, state: dict | None = None):
    """(loss sum over the micro-batch, metric sums) for a paired loss.

    `state` carries what a loss keeps across steps: bco_pair's running mean reward delta
    (the mean of all chosen and rejected rewards seen so far, as in the BCO paper)."""
    pc_mean = policy.chosen / policy.chosen_count
    pr_mean = policy.rejected / policy.rejected_count
    if _uses_means(spec, cfg):
        pol = (pc_mean, pr_mean)
        refs = (ref.chosen / ref.chosen_count, ref.rejected / ref.rejected_count) if ref is not None else None
    else:
        pol = (policy.chosen, policy.rejected)
        refs = (ref.chosen, ref.rejected) if ref is not None else None
    args = pol + refs if spec.needs_reference else pol
    kwargs = loss_kwargs(spec, cfg)
    takes_delta = "delta" in inspect.signature(spec.fn).parameters
    if takes_delta and state is not None:
        seen = state.get("reward_count", 0)
        kwargs["delta"] = torch.tensor(state["reward_sum"] / seen if seen else 0.0, device=args[0].device)
    out = spec.fn(*args, **kwargs)
    if takes_delta and state is not None and torch.is_grad_enabled():  # evaluation must not move it
        rewards = torch.cat([out.chosen_rewards, out.rejected_rewards])
        state["reward_sum"] = state.get("reward_sum", 0.0) + rewards.sum().item()
        state["reward_count"] = state.get("reward_count", 0) + rewards.numel()
    loss = out.losses.sum()
    nll = -pc_mean  # [B] per-token NLL of the chosen completion
    if spec.name == "orpo":  # ORPO = NLL(chosen) + the odds-ratio term the loss returns
        loss = loss + nll.sum()
    if cfg.rpo_alpha > 0:
        loss = loss + cfg.rpo_alpha * nll.sum()
    m = _reward_metrics(out.chosen_rewards, out.rejected_rewards)
    m.update({
        "logps/chosen": policy.chosen.detach().sum(),
        "logps/rejected": policy.rejected.detach().sum(),
        "logps/chosen_mean": pc_mean.detach().sum(),
        "logps/rejected_mean": pr_mean.detach().sum(),
        "nll/chosen": nll.detach().sum(),
        "lengths/chosen": policy.chosen_count.float().sum(),
        "lengths/rejected": policy.rejected_count.float().sum(),
    })
    if ref is not None:
        # Log-ratio of the policy to the reference on the training completions: a cheap drift
        # signal, not the KL on the policy's own samples (that is `prefalign eval`'s job).
        m["kl/pairs"] = ((policy.chosen - ref.chosen) + (policy.rejected - ref.rejected)).detach().sum() / 2
    return loss, m


def _reward_metrics(chosen_rewards, rejected_rewards) -> dict:
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
    }


def kto_loss(spec: LossSpec, cfg, policy: logprobs.SeqLogps, ref: logprobs.SeqLogps, desirable: torch.Tensor,
             kl: torch.Tensor):
    """(loss sum, metric sums) for KTO on unpaired rows with their KL baseline."""
    out = spec.fn(policy.sum, ref.sum, desirable, kl, **loss_kwargs(spec, cfg))
    loss = out.losses.sum()
    d = desirable.float()
    m = {
        "kl": kl.detach() * len(d),
        "rewards/chosen": (out.chosen_rewards * d).sum(),
        "rewards/rejected": (out.rejected_rewards * (1 - d)).sum(),
        "count/desirable": d.sum(),
        "count/undesirable": (1 - d).sum(),
        "logps/chosen": (policy.sum.detach() * d).sum(),
        "logps/rejected": (policy.sum.detach() * (1 - d)).sum(),
    }
    return loss, m


def sft_loss(policy: logprobs.SeqLogps):
    """(summed completion NLL, metric sums): the loop divides by the step's token count."""
    loss = -policy.sum.sum()
    return loss, {"logps/chosen": policy.sum.detach().sum(),
                  "lengths/chosen": policy.count.float().sum()}
