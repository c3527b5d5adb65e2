"""The offline micro-step: one optimizer step's forward and backward passes, shared by
training (`forward_backward`) and evaluation (`micro_step` + `normalise`), so both score
examples and normalise their sums the same way.

One optimizer step consumes `batch_size x grad_accum x processes` examples. Every process
knows the whole step's examples, so the loss denominators need no communication; only the
metric sums and the gradients are all-reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from prefalign import objective, prepare
from prefalign.config import TrainConfig


def all_reduce_grads(params, world: int) -> None:
    """Average gradients over processes in one flat buffer (plain DDP semantics)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def logp_kw(setup: prepare.Setup, cfg: TrainConfig) -> dict:
    """The log-prob settings every policy forward of the run takes."""
    return dict(pad_id=setup.tokenizer.pad_token_id, chunk_size=cfg.chunk_size, packing=cfg.packing,
                token_budget=cfg.token_budget)


def micro_step(setup: prepare.Setup, cfg: TrainConfig, items, autocast_ctx, kl: torch.Tensor | None = None):
    """Forward one micro-batch: (loss summed over its examples, metric sums).

    `kl`: KTO's reference point for the step (see `kto_kl`); computed here from the micro-batch
    alone when not given (evaluation)."""
    kw = logp_kw(setup, cfg)
    if setup.spec is None:  # SFT
        with autocast_ctx():
            pol = objective.completion_logps(setup.policy, [i.prompt_ids for i in items],
                                             [i.completion_ids for i in items], **kw)
        return objective.sft_loss(pol)
    if setup.spec.kind == "unpaired":
        prompts = [i.prompt_ids for i in items]
        comps = [i.completion_ids for i in items]
        desirable = torch.tensor([bool(i.label) for i in items], device=setup.policy.device)
        ref = setup.reference.completion_logps(prompts, comps)  # first: see below
        with autocast_ctx():
            pol = objective.completion_logps(setup.policy, prompts, comps, **kw)
        if kl is None:
            kl = kto_kl(setup, cfg, items, autocast_ctx, rank=0, world=1)
        return objective.kto_loss(setup.spec, cfg, pol, ref, desirable, kl)
    # The reference first: its forward's temporaries are gone before the policy's saved
    # activations pile up, so the two never coexist at the step's memory peak.
    ref = setup.reference.pair_logps(items)
    with autocast_ctx():
        pol = objective.pair_logps(setup.policy, items, **kw)
        prompt = objective.prompt_logps(setup.policy, items, **kw) if setup.spec.needs_prompt_logps else None
    if ref is not None:
        ref = objective.PairLogps(*(t.to(pol.chosen.device) for t in ref))
    return objective.paired_loss(setup.spec, cfg, pol, ref, setup.loss_state, prompt)


def kto_kl(setup: prepare.Setup, cfg: TrainConfig, items, autocast_ctx, rank: int, world: int) -> torch.Tensor:
    """KTO's reference point: KL(policy || ref) estimated on mismatched (prompt_i, completion_i-1)
    pairs of the whole optimizer step, so it does not depend on how the step is split into
    micro-batches or processes. Each process scores every world-th mismatched pair; the sum is
    all-reduced. No gradient flows through it."""
    mine = list(range(rank, len(items), world))
    prompts = [items[i].prompt_ids for i in mine]
    shifted = [items[i - 1].completion_ids for i in mine]  # i - 1 = -1 wraps to the last item
    total = torch.zeros((), dtype=torch.float64, device=setup.policy.device)
    bs = cfg.batch_size
    with torch.no_grad():
        for lo in range(0, len(mine), bs):
            with autocast_ctx():
                pol = objective.completion_logps(setup.policy, prompts[lo:lo + bs], shifted[lo:lo + bs],
                                                 **logp_kw(setup, cfg))
            ref = setup.reference.completion_logps(prompts[lo:lo + bs], shifted[lo:lo + bs])
            total += (pol.sum - ref.sum.to(pol.sum.device)).double().sum()
    if world > 1:
        dist.all_reduce(total)
    return (total / len(items)).float()


def normalise(sums: dict, n: float, kto: bool) -> dict:
    """Metric sums over `n` examples -> means. Counts stay counts; KTO's per-side rewards and
    log-probs are means over that side's examples (desirable = chosen, undesirable = rejected)."""
    out = {}
    for k, v in sums.items():
        if kto and k.startswith(("rewards/", "logps/")) and not k.startswith("count/"):
            denom = sums["count/desirable"] if k.endswith("chosen") else sums["count/undesirable"]
            out[k] = v / denom if denom > 0 else float("nan")
        elif k.startswith("count/"):
            out[k] = v
        else:
            out[k] = v / n
    if kto:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def loss_denominator(setup: prepare.Setup, items) -> int:
    """What a step's (or an evaluation's) summed loss is divided by: SFT's scored completion
    tokens, the other losses' examples."""
    return objective.scored_tokens(items) if setup.spec is None else len(items)


def reduce(sums: dict, device, world: int) -> dict:
    """The metric sums of all processes, summed (one all-reduce of one vector)."""
    keys = sorted(sums)
    vec = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))


def forward_backward(setup: prepare.Setup, cfg: TrainConfig, step_items, autocast_ctx, params, rank: int,
                     world: int, sharded: bool = False):
    """Gradients of one optimizer step's examples (this process's micro-batches), averaged over
    processes and clipped; returns the step's metrics (global means) and the gradient norm.
    `sharded`: FSDP averages the gradients itself (reduce-scatter in each backward)."""
    per_micro, per_step = cfg.batch_size, len(step_items)
    denom = loss_denominator(setup, step_items) / world  # of the whole step, as evaluation divides
    sums: dict = {}
    loss_value = 0.0
    kto = setup.spec is not None and setup.spec.kind == "unpaired"
    kl = kto_kl(setup, cfg, step_items, autocast_ctx, rank, world) if kto else None
    for j in range(cfg.grad_accum):
        lo = (j * world + rank) * per_micro
        loss, m = micro_step(setup, cfg, step_items[lo:lo + per_micro], autocast_ctx, kl)
        (loss / denom).backward()
        loss_value += loss.item() / denom
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if world > 1 and not sharded:
        all_reduce_grads(params, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already the global norm
        grad_norm = grad_norm.full_tensor()
    # Each process's loss_value is its share scaled by world/denominator: the sum over
    # processes (in reduce) divided by world is the step's mean loss.
    sums["loss"] = loss_value
    reduced = reduce(sums, params[0].device, world)
    record = normalise({k: v for k, v in reduced.items() if k != "loss"}, per_step, kto)
    record["loss"] = reduced["loss"] / world
    return record, grad_norm
