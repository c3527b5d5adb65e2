"""The GRPO loop: sample a group per prompt from the current policy, score, update, repeat.

    result = grpo(GRPOConfig(output="runs/grpo", steps=50, group_size=8, kl_coef=0.04),
                  model=policy, tokenizer=tok, prompts=[{"prompt": "12+7=", "answer": 19}, ...],
                  reward="exact_answer")

One step (one generation batch):
  1. P prompts (a seeded permutation, a fresh one each epoch) -> G samples each from the
     current policy (prefalign.sampling, KV cache): B = P * G completions, grouped by prompt.
  2. Rewards r [B] from the reward function(s); advantages A [B] group-normalized
     (losses.grpo.group_advantages: scale "group" | "batch" | "none").
  3. mu optimizer steps on that batch. The log-probs of the sampling policy ("old") are
     the detached log-probs of the first pass (the policy has not moved yet), so they cost
     no extra forward; the reference log-probs (kl_coef > 0) are computed once per batch.
     The reference: ref_model if given, else the initial policy (with LoRA: the policy with
     its adapters off, no copy; else a frozen copy).
     Each optimizer step runs the batch in micro-batches whose losses are re-weighted so
     the gradient equals the full-batch gradient of the chosen aggregation.

Per-token log-probs come from hidden states through the chunked head (logprobs.token_logps):
the [B, T, V] logits are never built. With packing (the default) the completions of a
micro-batch that share a prompt are one segment [prompt | completion 1 | ... | completion G]
(data.packing.pack_groups): the prompt is computed once per group, and no padding is run.
A micro-batch that splits a group packs each part with its own copy of the prompt. Policy,
reference and old-policy log-probs all take the same path (packed or padded). Sampling temperature T is applied to the head
(scale / T), so the trained distribution is the one that was sampled (TRL does the same).

Metrics (OUTPUT/metrics.jsonl, one line per step): reward/mean, reward/std, rewards/<name>,
kl (k3, mean per completion token, only when kl_coef > 0), completion_length, clip_fraction,
entropy, time/generation, time/scoring, time/training, peak_memory_mb, grad_norm.
`entropy` is a Monte-Carlo estimate: minus the mean log-prob of the sampled tokens under the
sampling policy (exact in expectation for top_p = 1, top_k = 0; a lower-variance full-softmax
entropy would need the [N, V] logits this module avoids).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

from prefalign import hardware, optim, prepare
from prefalign.errors import UserError
from prefalign.lean import lean_mlps
from prefalign.losses.grpo import group_advantages, grpo_loss
from prefalign.metrics import Console, MetricsLog, peak_memory_mb
from prefalign.online.common import (
    PromptSet, begin, claimed, completion_token_logps, initial_reference, load_policy, make_reward, plot_run,
    prompt_set, reference_mode,
)
from prefalign.online.settings import GRPOConfig  # noqa: F401 (the settings live apart: the CLI imports them without torch)
from prefalign.sampling import SamplingConfig, generate
from prefalign.schedule import lr_lambda, step_indices


@dataclass
class GRPOResult:
    output: str
    steps: int
    history: list
    policy: object
    tokenizer: object


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Run:
    """What the loop works with, set up once."""

    policy: torch.nn.Module
    tokenizer: object
    prompts: PromptSet
    score_fn: object
    ref: torch.nn.Module | None       # None: kl_coef 0; the policy itself: LoRA with its adapters off
    autocast_ctx: object
    opt: torch.optim.Optimizer
    sched: object
    params: list


def grpo(cfg: GRPOConfig, *, model=None, tokenizer=None, prompts=None, reward=None, ref_model=None) -> GRPOResult:
    """Run GRPO. prompts / reward / model objects override the config's paths and specs."""
    from prefalign.models import save_model

    from prefalign.config import check_attention

    cfg.validate()
    check_attention(cfg.attention)  # before the output directory is touched
    # config.yaml records what ran; the caller's config object is left as given
    cfg = dataclasses.replace(cfg, precision=hardware.announce(cfg.precision))
    with claimed(cfg):  # OUTPUT/.lock from before loading to the end, as `prefalign train`
        run = _set_up(cfg, model, tokenizer, prompts, reward, ref_model)
        begin(cfg.output, cfg)
        history = _train(cfg, run)
        plot_run(cfg.output, history, [("reward", ["reward/mean", "reward/std"]), ("kl", ["kl"]),
                                       ("loss", ["loss"]), ("length", ["completion_length"]),
                                       ("clip", ["clip_fraction", "entropy"])])
        if cfg.save_model:
            save_model(run.policy, run.tokenizer, os.path.join(cfg.output, "model"))
    return GRPOResult(cfg.output, cfg.steps, history, run.policy, run.tokenizer)


def _set_up(cfg: GRPOConfig, model, tokenizer, prompts, reward, ref_model) -> _Run:
    """Policy (LoRA if asked), prompts, reward, reference, optimizer: everything before step 1."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg, model, tokenizer, qlora=cfg.qlora)
    policy = prepare.with_lora(cfg, policy, qlora=cfg.qlora)
    lean_mlps(policy)  # bitwise the same gradients, half the MLP activations (prefalign.lean)
    policy.to(device).train()
    pset = prompt_set(prompts, cfg.prompts, tok, cfg.max_prompt_length)
    if len(pset) < cfg.prompts_per_step:
        raise UserError(f"{len(pset)} prompts, fewer than prompts_per_step ({cfg.prompts_per_step})")
    score_fn = make_reward(reward if reward is not None else cfg.reward, cfg.reward_weights)
    ref = None if cfg.kl_coef == 0 else initial_reference(cfg, policy, tok, ref_model, device)  # 0: nothing loaded
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = optim.adamw(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.steps * cfg.mu))
    return _Run(policy, tok, pset, score_fn, ref, prepare.autocast(cfg, device), opt, sched, params)


def _train(cfg: GRPOConfig, run: _Run) -> list[dict]:
    """cfg.steps GRPO steps; the logged records (OUTPUT/metrics.jsonl, the console)."""
    log = MetricsLog(cfg.output, True)
    console = Console(cfg.steps, cfg.progress, label="grpo", messages=True)
    console.KEYS = ("reward/mean", "kl", "completion_length", "clip_fraction")
    history = []
    for step in range(cfg.steps):
        record = _step(cfg, run, step)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(record)
            history.append(record)
            console.update(step + 1, record)
    console.close()
    log.close()
    return history


def _step(cfg: GRPOConfig, run: _Run, step: int) -> dict:
    """One generation batch: sample P x G completions, score them, cfg.mu updates. -> its record."""
    t0 = time.perf_counter()
    idx = step_indices(len(run.prompts), step, cfg.prompts_per_step, cfg.seed)
    p_ids, p_texts, extra = run.prompts.select(idx, repeat=cfg.group_size)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, n=cfg.group_size, seed=cfg.seed * 1_000_003 + step)
    with run.autocast_ctx():
        gens = generate(run.policy, run.tokenizer, p_ids, sampling, batch_size=cfg.generation_batch_size)
    t1 = time.perf_counter()
    scores = run.score_fn.score(p_texts, gens.texts, extra,
                                rows=[f"prompt {i + 1}, sample {k + 1}" for i in idx for k in range(cfg.group_size)])
    rewards = torch.tensor(scores.total, dtype=torch.float32)                           # [B]
    if not torch.isfinite(rewards).all():  # the reward checks above should make this unreachable
        raise UserError(f"step {step + 1}: non-finite rewards {rewards.tolist()[:8]}; no update made")
    adv = group_advantages(rewards, cfg.group_size, cfg.scale).to(next(run.policy.parameters()).device)  # [B]
    t2 = time.perf_counter()
    record = update(run.policy, run.ref, run.opt, run.sched, run.params, cfg, run.autocast_ctx,
                    run.tokenizer.pad_token_id, [list(p) for p in p_ids for _ in range(cfg.group_size)],
                    gens.token_ids, adv)
    record["step"] = step + 1
    record.update(_step_figures(cfg, gens, rewards, scores))
    record.update({"time/generation": t1 - t0, "time/scoring": t2 - t1,
                   "time/training": time.perf_counter() - t2, "lr": run.sched.get_last_lr()[0],
                   "peak_memory_mb": peak_memory_mb()})
    return record


def _step_figures(cfg: GRPOConfig, gens, rewards, scores) -> dict:
    """The step's sample figures: rewards (and each component), groups with no signal, lengths."""
    lengths = torch.tensor([len(t) for t in gens.token_ids], dtype=torch.float32)
    groups = rewards.view(-1, cfg.group_size)
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        **{f"rewards/{k}": sum(v) / len(v) for k, v in scores.components.items() if len(scores.components) > 1},
        "frac_groups_zero_std": (groups.std(dim=1) == 0).float().mean().item(),
        "completion_length": lengths.mean().item(),
        "completion_length/max": lengths.max().item(),
        "truncated_fraction": sum(r == "length" for r in gens.finish_reasons) / len(gens),
    }


def update(policy, ref, opt, sched, params, cfg: GRPOConfig, autocast_ctx, pad_id: int, prompt_ids, completion_ids,
           adv) -> dict:
    """cfg.mu optimizer steps on one generation batch. Returns the step's training metrics.

    prompt_ids [B] (one per completion), completion_ids [B], adv [B]. Micro-batch losses are
    weighted so their sum is the full-batch loss of the aggregation:
      grpo, dr_grpo: mean over completions -> weight b / B
      dapo:          mean over all tokens  -> weight (tokens in the micro-batch) / (tokens in the batch)
    """
    B = len(completion_ids)
    mb = cfg.micro_batch or B
    micros = [list(range(s, min(s + mb, B))) for s in range(0, B, mb)]
    n_tok = sum(len(c) for c in completion_ids)
    weights = [(sum(len(completion_ids[i]) for i in m) / n_tok) if cfg.aggregation == "dapo" else len(m) / B
               for m in micros]
    kw = dict(pad_id=pad_id, chunk_size=cfg.chunk_size, temperature=cfg.temperature, packing=cfg.packing,
              token_budget=cfg.token_budget)

    def inputs(m):
        return [prompt_ids[i] for i in m], [completion_ids[i] for i in m]

    ref_lps = [None] * len(micros)
    if ref is not None:
        with reference_mode(ref, policy), autocast_ctx():
            ref_lps = [completion_token_logps(ref, *inputs(m), **kw)[0] for m in micros]
    old_lps = [None] * len(micros)  # None: the first pass, where old = current (ratio 1)
    sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "grad_norm": 0.0}
    entropy_sum = 0.0
    for it in range(cfg.mu):
        for j, m in enumerate(micros):
            with autocast_ctx():
                lp, mask = completion_token_logps(policy, *inputs(m), **kw)                # [b, Tc]
            out = grpo_loss(lp, old_lps[j], ref_lps[j], adv[m], mask, clip_eps=cfg.clip_eps,
                            clip_eps_high=cfg.clip_eps_high or None, beta=cfg.kl_coef,
                            aggregation=cfg.aggregation, max_completion_length=cfg.max_new_tokens)
            (out.loss * weights[j]).backward()
            tok_share = float(mask.sum()) / n_tok  # token-weighted means across micro-batches
            if it == 0:
                if cfg.mu > 1:
                    old_lps[j] = lp.detach()
                entropy_sum += -float((lp.detach() * mask).sum()) / n_tok
            sums["loss"] += out.loss.item() * weights[j] / cfg.mu
            for k in ("kl", "clip_fraction", "ratio_mean"):
                sums[k] += float(getattr(out, k)) * tok_share / cfg.mu
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        sums["grad_norm"] += float(grad_norm) / cfg.mu
        if math.isfinite(float(grad_norm)):
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    sums["entropy"] = entropy_sum
    if ref is None:
        del sums["kl"]  # no reference, no KL (kl_coef 0 loads none)
    return sums


