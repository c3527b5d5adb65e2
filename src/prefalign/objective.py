"""From a micro-batch of tokenized items to a loss and its metrics.

The one bridge between the data, the log-prob math and the pure losses. Each
function returns a loss that is a SUM over the micro-batch's examples (the loop
divides by the examples in the whole optimizer step, so 8 x 1 equals 2 x 4) and
a dict of metric sums with a count, so means are exact across micro-batches and
processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from prefalign import logprobs
from prefalign.data.batching import pad_pairs, pad_sequences
from prefalign.errors import UserError
from prefalign.losses import SFT, SFT_PARAMS, CombinedLoss, LossSpec, check_params, combined, get_loss


class PairLogps(NamedTuple):
    chosen: torch.Tensor            # [B] summed log-probs
    rejected: torch.Tensor          # [B]
    chosen_count: torch.Tensor      # [B] completion tokens
    rejected_count: torch.Tensor    # [B]


def pair_logps(model, items, *, pad_id: int, packing: bool, token_budget: int, chunk_size: int) -> PairLogps:
    """Summed chosen/rejected log-probs of each pair under `model` (grad flows if enabled)."""
    if packing:
        from prefalign.data.packing import budget_for, pack_pairs, packed_pair_logps

        lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in items]
        if token_budget > 0 and max(lengths) > token_budget:
            raise UserError(f"token_budget {token_budget} is smaller than one packed pair ({max(lengths)} tokens: "
                            f"prompt + chosen + rejected); raise --token-budget or leave it at 0")
        budget = budget_for(token_budget, model, lengths)
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
        from prefalign.data.packing import budget_for, pack_completions, packed_logps

        budget = budget_for(token_budget, model, [len(p) + len(c) for p, c in zip(prompts, completions)])
        return packed_logps(model, pack_completions(prompts, completions, budget), chunk_size=chunk_size or None)
    batch = pad_sequences(prompts, completions, pad_id)
    return logprobs.sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels,
                                   chunk_size=chunk_size or None)


# Config fields that are shorthands for a loss parameter (TRL's keys); None = not set.
FIELD_PARAMS = {"beta": "beta", "label_smoothing": "label_smoothing", "gamma": "gamma",
                "desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight",
                "ipo_average_logps": "average_logps"}


@dataclass(frozen=True)
class LossPlan:
    """The loss of a run: its terms with their weights and FULL parameters (the loss's own
    defaults, updated only with what the user set). ``kind`` and ``needs_reference`` tell
    the trainer what to compute; ``build`` gives the callable (see ``losses.combined``)."""

    name: str  # as the user wrote it: "dpo", "dpo,sft", "sigmoid,bco_pair,sft"
    weights: dict
    params: dict  # term -> its parameters
    kind: str
    needs_reference: bool

    @property
    def spec(self) -> LossSpec:
        """The first preference term's spec (the loss itself for a single loss)."""
        return next(get_loss(t) for t in self.weights if t != SFT)

    @property
    def needs_prompt_logps(self) -> bool:
        """Whether a term scores the prompts too (ORPO with nll_tokens=all, as TRL)."""
        return any(p.get("nll_tokens") == "all" for p in self.params.values())

    @property
    def prepend_bos(self) -> bool:
        """Whether the data gets a BOS in front of every prompt (prompt_bos=always, TRL's CPO/ORPO)."""
        return any(p.get("prompt_bos") == "always" for p in self.params.values())

    def build(self, extra: dict | None = None) -> CombinedLoss:
        """The weighted sum; ``extra``: term -> state arguments for this call (bco's delta)."""
        extra = extra or {}
        return combined(self.weights, {t: {**p, **extra.get(t, {})} for t, p in self.params.items()})


def _names_and_weights(cfg) -> dict:
    names = [n.strip() for n in str(cfg.loss).split(",") if n.strip()]
    if not names:
        raise UserError("config: loss is empty; give a loss name (see `prefalign losses`)")
    if cfg.loss_weights:
        try:
            weights = [float(w) for w in str(cfg.loss_weights).split(",")]
        except ValueError:
            raise UserError(f"config: loss_weights must be comma-separated numbers; got {cfg.loss_weights!r}") from None
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            # nan/inf would train nothing (every step skipped as non-finite); a negative weight maximises its loss
            raise UserError(f"config: loss_weights must be finite and >= 0, not all 0; got {cfg.loss_weights!r}")
        if len(weights) != len(names):
            raise UserError(f"config: {len(weights)} loss_weights for {len(names)} losses ({cfg.loss})")
    else:
        weights = [1.0] * len(names)
    if len(set(names)) != len(names):
        raise UserError(f"config: loss {cfg.loss!r} names a loss twice")
    out = dict(zip(names, weights))
    if cfg.rpo_alpha > 0:
        if SFT in out:
            raise UserError("config: rpo_alpha adds an 'sft' term, and loss already has one; give one of them")
        out[SFT] = cfg.rpo_alpha
    return out


def _route(weights: dict, given: dict) -> dict:
    """term -> the parameters given for it. `LOSS.KEY` names the term; a plain KEY goes to
    every term that has it (`beta` to dpo and bco_pair of 'dpo,bco_pair,sft')."""
    valid = {t: (SFT_PARAMS if t == SFT else get_loss(t).params) for t in weights}
    out: dict = {t: {} for t in weights}
    for key, value in given.items():
        term, dot, k = key.rpartition(".")
        if dot:
            if term not in weights:
                raise UserError(f"loss_params: {key!r} names {term!r}, which is not in loss {','.join(weights)}")
            targets = [term]
        else:
            k, targets = key, [t for t in weights if key in valid[t]]
        if not targets:  # check_params words the error, with the valid keys
            check_params(",".join(weights), {f"{t}.{p}" if len(weights) > 1 else p: 0
                                             for t in weights for p in valid[t]}, {key: value})
        for t in targets:
            out[t][k] = value
    return out


def loss_plan(cfg) -> LossPlan | None:
    """The run's loss from the config (None: plain SFT); UserError for a bad name, weight,
    or parameter (unknown key, wrong type), naming what is valid."""
    weights = _names_and_weights(cfg)
    given = {p: getattr(cfg, f) for f, p in FIELD_PARAMS.items() if getattr(cfg, f, None) is not None}
    given.update(cfg.loss_params or {})
    if list(weights) == [SFT]:
        if given:
            raise UserError(f"config: loss sft takes no loss parameters; got {', '.join(sorted(given))}")
        return None
    per_term = _route(weights, given)
    unpaired = [t for t in weights if t != SFT and get_loss(t).kind == "unpaired"]
    if unpaired:
        if len(weights) > 1:
            raise UserError(f"config: {unpaired[0]} is unpaired and cannot be combined with other losses")
        spec = get_loss(unpaired[0])
        params = check_params(unpaired[0], spec.params, per_term[unpaired[0]])
        one = torch.full((1,), -1.0)
        _dry_run(cfg.loss, lambda: spec.fn(one, one, torch.tensor([True]), 0.0, **params))
        return LossPlan(cfg.loss, weights, {unpaired[0]: params}, "unpaired", spec.needs_reference)
    fn = combined(weights, per_term)  # checks names and parameters
    _dry_run(cfg.loss, lambda: fn({k: torch.full((1,), -1.0) for k in fn.required}))
    full = {name: params for name, _, _, params in fn.terms}
    return LossPlan(cfg.loss, weights, full, "paired", fn.needs_reference)


def _dry_run(name: str, call) -> None:
    """Call the loss once on a dummy row, so a value it refuses (robust's label_smoothing >=
    0.5, ...) is a config error now rather than a traceback at the first step."""
    try:
        call()
    except ValueError as e:
        raise UserError(f"config: loss {name}: {e}") from None


def record_loss_params(values: dict, plan: LossPlan | None) -> dict:
    """`values` (a config as a dict) with loss_params holding every parameter the loss runs
    with, defaults included (LOSS.KEY in a combination): the run's config.yaml says what ran
    and, read back with --config, runs it again."""
    if plan is None:
        return values
    single = len(plan.params) == 1
    flat = {(k if single else f"{t}.{k}"): v for t, p in plan.params.items() for k, v in p.items()}
    return {**values, "loss_params": flat}


def _bco_deltas(plan: LossPlan, state: dict | None, device) -> dict:
    """bco_pair's delta from the running mean reward kept in `state` (with running_delta)."""
    if state is None or not plan.params.get("bco_pair", {}).get("running_delta"):
        return {}
    seen = state.get("reward_count", 0)
    return {"bco_pair": {"delta": torch.tensor(state["reward_sum"] / seen if seen else 0.0, device=device)}}


def paired_loss(plan: LossPlan, cfg, policy: PairLogps, ref: PairLogps | None, state: dict | None = None,
                prompt: logprobs.SeqLogps | None = None):
    """(loss sum over the micro-batch, metric sums) for a paired loss or combination.

    `state` carries what a loss keeps across steps: bco_pair's running mean reward delta
    (the mean of all chosen and rejected rewards seen so far, as in the BCO paper).
    `prompt`: the policy's log-probs of the prompts (`prompt_logps`), when the plan needs them."""
    pc_mean = policy.chosen / policy.chosen_count
    pr_mean = policy.rejected / policy.rejected_count
    inputs = {"policy_chosen": policy.chosen, "policy_rejected": policy.rejected, "policy_chosen_avg": pc_mean,
              "policy_rejected_avg": pr_mean, "chosen_count": policy.chosen_count}
    if prompt is not None:
        inputs.update({"prompt_logps": prompt.sum, "prompt_count": prompt.count})
    if ref is not None:
        inputs.update({"ref_chosen": ref.chosen, "ref_rejected": ref.rejected,
                       "ref_chosen_avg": ref.chosen / ref.chosen_count,
                       "ref_rejected_avg": ref.rejected / ref.rejected_count})
    out = plan.build(_bco_deltas(plan, state, policy.chosen.device))(inputs)
    if "bco_pair" in plan.params and state is not None and torch.is_grad_enabled():  # eval must not move it
        beta = plan.params["bco_pair"]["beta"]
        rewards = beta * torch.cat([policy.chosen - ref.chosen, policy.rejected - ref.rejected]).detach()
        state["reward_sum"] = state.get("reward_sum", 0.0) + rewards.sum().item()
        state["reward_count"] = state.get("reward_count", 0) + rewards.numel()
    nll = -pc_mean  # [B] per-token NLL of the chosen completion
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
        # The mean log-ratio log pi/pi_ref of the training completions: a drift signal, not a KL
        # (it goes negative; the KL on the policy's own samples is `prefalign eval`'s job).
        m["logratio/pairs"] = ((policy.chosen - ref.chosen) + (policy.rejected - ref.rejected)).detach().sum() / 2
    return out.losses.sum(), m


def _reward_metrics(chosen_rewards, rejected_rewards) -> dict:
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
    }


def kto_loss(plan: LossPlan, cfg, policy: logprobs.SeqLogps, ref: logprobs.SeqLogps, desirable: torch.Tensor,
             kl: torch.Tensor):
    """(loss sum, metric sums) for KTO on unpaired rows with their KL baseline."""
    (params,) = plan.params.values()  # an unpaired loss is never combined
    out = plan.spec.fn(policy.sum, ref.sum, desirable, kl, **params)
    loss = out.losses.sum()
    d = desirable.float()
    m = {
        # `kl`: the estimate, which may be negative (a drift signal even below 0); `kl/clamped`:
        # max(kl, 0), the reference point the loss uses and what TRL logs as `kl`.
        "kl": kl.detach() * len(d),
        "kl/clamped": kl.detach().clamp(min=0) * len(d),
        "rewards/chosen": (out.chosen_rewards * d).sum(),
        "rewards/rejected": (out.rejected_rewards * (1 - d)).sum(),
        # The implicit reward's sign agrees with the label: KTO's counterpart of pairwise accuracy.
        "accuracy/reward_sign": ((out.chosen_rewards > 0).float() == d).float().sum(),
        "count/desirable": d.sum(),
        "count/undesirable": (1 - d).sum(),
        "logps/chosen": (policy.sum.detach() * d).sum(),
        "logps/rejected": (policy.sum.detach() * (1 - d)).sum(),
    }
    return loss, m


def prompt_logps(model, items, **kw) -> logprobs.SeqLogps:
    """log pi(prompt[1:] | prompt[0]) of each item: the prompt tokens an NLL over the whole
    sequence scores besides the completion's (TRL's ORPO NLL)."""
    return completion_logps(model, [i.prompt_ids[:1] for i in items], [i.prompt_ids[1:] for i in items], **kw)


def scored_tokens(items) -> int:
    """The completion tokens SFT scores in `items`: the loss's denominator, the same in
    training and evaluation. Each completion token is predicted from the one before it,
    so a completion with no prompt loses its first token."""
    return sum(len(i.completion_ids) - (0 if len(i.prompt_ids) else 1) for i in items)


def sft_loss(policy: logprobs.SeqLogps):
    """(summed completion NLL, metric sums): the loop divides by the step's `scored_tokens`."""
    loss = -policy.sum.sum()
    return loss, {"logps/chosen": policy.sum.detach().sum(),
                  "lengths/chosen": policy.count.float().sum()}
