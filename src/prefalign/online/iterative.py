"""Iterative (online) DPO: generate from the current policy, score, pair, DPO, repeat.

    result = iterate(IterativeConfig(output="runs/iter", rounds=3, samples=8, min_gap=0.5),
                     model=sft_model, tokenizer=tok, prompts=rows, reward="exact_answer")

Round k (1-based):
  1. prompts_per_round prompts (a seeded permutation, fresh each pass over the prompts)
     -> `samples` completions each from the current policy (prefalign.sampling).
  2. Scores from the reward function(s) (or a judge wrapped as one).
  3. Pairs: best vs worst of each group, kept when the reward gap is >= min_gap
     (online.pairs.build_pairs) -> OUTPUT/round-k/pairs.jsonl.
  4. DPO (or any paired loss) on those pairs through the offline trainer
     (prefalign.trainer.train, OUTPUT/round-k holds its metrics and plots), starting from the
     current policy.
  5. The reference for the next round (ref_update): "fixed" keeps the initial policy (the KL is to the
     start, as in offline DPO); "moving" uses the policy at the start of each round, so each
     round is a DPO step of size ~1/beta away from the last one (Xu et al. 2023, "Some things
     are more CRINGE than others"; Xiong et al. 2024, "Iterative Preference Learning").

OUTPUT/metrics.jsonl has one line per round: the reward of the round's samples (the policy
before that round's update), the pairs built, the DPO figures of the round's last step,
generation/scoring/training seconds and peak memory. `reward/after` on the last round is the
final policy's reward on fresh samples.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from prefalign import hardware, prepare
from prefalign.errors import UserError
from prefalign.metrics import MetricsLog, peak_memory_mb, write_jsonl
from prefalign.online.common import PromptSet, begin, claimed, load_policy, make_reward, plot_run, prompt_set
from prefalign.online.pairs import build_pairs
from prefalign.online.settings import REFERENCES, IterativeConfig  # noqa: F401 (the settings live apart: the CLI imports them without torch)
from prefalign.sampling import SamplingConfig, generate
from prefalign.schedule import step_indices


@dataclass
class IterativeResult:
    output: str
    rounds: int
    history: list                     # one record per round
    train_history: list               # every logged DPO step of every round, with "round" and a global "step"
    policy: object
    tokenizer: object


def sample_and_score(policy, tok, pset: PromptSet, idx: list[int], n: int, sampling: dict, seed: int, score_fn,
                     autocast_ctx):
    """(Generations, RewardScores) for the prompts idx, n samples each."""
    p_ids, p_texts, extra = pset.select(idx, repeat=n)
    with autocast_ctx():
        gens = generate(policy, tok, p_ids, SamplingConfig(**sampling, n=n, seed=seed))
    return gens, score_fn.score(p_texts, gens.texts, extra)


@dataclass
class _Run:
    """What the rounds work with, set up once."""

    policy: torch.nn.Module
    tokenizer: object
    prompts: PromptSet
    score_fn: object
    needs_ref: bool                   # the loss uses a reference
    fixed_ref: torch.nn.Module | None  # ref_update fixed: the start policy, frozen
    autocast_ctx: object
    sampling: dict
    dpo_steps: int = 0                # DPO steps of the rounds so far (train_history's global step)


def iterate(cfg: IterativeConfig, *, model=None, tokenizer=None, prompts=None, reward=None) -> IterativeResult:
    """Run iterative DPO. prompts / reward / model objects override the config's paths and specs."""
    from prefalign.config import check_attention
    from prefalign.models import save_model

    cfg.validate()
    check_attention(cfg.attention)  # each round trains: refused now, not after round 1's sampling
    # once; each round's DPO gets the concrete value (the caller's config object is left as given)
    cfg = dataclasses.replace(cfg, precision=hardware.announce(cfg.precision))
    with claimed(cfg):  # OUTPUT/.lock from before loading to the end, as `prefalign train`
        run = _set_up(cfg, model, tokenizer, prompts, reward)
        begin(cfg.output, cfg)
        log = MetricsLog(cfg.output, True)
        history, train_history = [], []
        for k in range(1, cfg.rounds + 1):
            record = _round(cfg, run, k, train_history)
            log.write(record)
            history.append(record)
            if cfg.progress:
                print(f"round {k}/{cfg.rounds}: reward {record['reward/mean']:.3f}, {record['pairs']} pairs, "
                      f"dpo loss {record.get('dpo/loss', float('nan')):.4f}", flush=True)
        log.close()
        plot_run(cfg.output, history, [("reward", ["reward/mean", "reward/after"]), ("pairs", ["pairs"])])
        if train_history:
            plot_run(cfg.output, train_history, [("dpo_loss", ["loss"]), ("dpo_rewards", ["rewards/margins"])])
        if cfg.save_model:
            save_model(run.policy, run.tokenizer, os.path.join(cfg.output, "model"))
    return IterativeResult(cfg.output, cfg.rounds, history, train_history, run.policy, run.tokenizer)


def _set_up(cfg: IterativeConfig, model, tokenizer, prompts, reward) -> _Run:
    """Policy, prompts, reward and (ref_update fixed) the frozen start policy."""
    from prefalign.losses import get_loss
    from prefalign.models import freeze

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg, model, tokenizer)
    policy.to(device)
    pset = prompt_set(prompts, cfg.prompts, tok, cfg.max_prompt_length)
    if len(pset) < cfg.prompts_per_round:
        raise UserError(f"{len(pset)} prompts, fewer than prompts_per_round ({cfg.prompts_per_round})")
    score_fn = make_reward(reward if reward is not None else cfg.reward, cfg.reward_weights)
    needs_ref = get_loss(cfg.loss).needs_reference
    fixed_ref = freeze(copy.deepcopy(policy)) if needs_ref and cfg.ref_update == "fixed" else None
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return _Run(policy, tok, pset, score_fn, needs_ref, fixed_ref, prepare.autocast(cfg, device), sampling)


def _round(cfg: IterativeConfig, run: _Run, k: int, train_history: list) -> dict:
    """Round k (1-based): sample, score, pair, DPO from the current policy (run.policy moves on).
    Appends the round's DPO steps to train_history; returns the round's record."""
    rdir = os.path.join(cfg.output, f"round-{k}")
    t0 = time.perf_counter()
    idx = step_indices(len(run.prompts), k - 1, cfg.prompts_per_round, cfg.seed)
    gens, scores = sample_and_score(run.policy, run.tokenizer, run.prompts, idx, cfg.samples, run.sampling,
                                    cfg.seed * 1_000_003 + k, run.score_fn, run.autocast_ctx)
    t1 = time.perf_counter()
    rows = build_pairs([run.prompts.raw[i] for i in idx], gens.texts, scores.total, cfg.samples, cfg.min_gap,
                       cfg.pairs_per_prompt, extra={c: [v[i] for i in idx] for c, v in run.prompts.extra.items()})
    path = write_jsonl(os.path.join(rdir, "pairs.jsonl"), rows)
    r = torch.tensor(scores.total)
    record = {"step": k, "round": k, "reward/mean": r.mean().item(), "reward/std": r.std().item(),
              "pairs": len(rows), "completion_length": gens.num_tokens / len(gens),
              "time/generation": gens.seconds, "time/scoring": t1 - t0 - gens.seconds}
    t2 = time.perf_counter()
    if len(rows) < cfg.batch_size:
        # Nothing to learn from this round (all samples scored alike): say so, keep going.
        print(f"round {k}: {len(rows)} pairs, fewer than one batch ({cfg.batch_size}); DPO skipped")
        record["skipped"] = 1
    else:
        record.update(_dpo(cfg, run, k, rdir, path, train_history))
    record["time/training"] = time.perf_counter() - t2
    if k == cfg.rounds:  # how the final policy does on fresh samples (the next round's prompts)
        idx = step_indices(len(run.prompts), k, cfg.prompts_per_round, cfg.seed)
        _, after = sample_and_score(run.policy, run.tokenizer, run.prompts, idx, cfg.samples, run.sampling,
                                    cfg.seed * 1_000_003 + k + 1, run.score_fn, run.autocast_ctx)
        record["reward/after"] = sum(after.total) / len(after.total)
    record["peak_memory_mb"] = peak_memory_mb()
    return record


def _dpo(cfg: IterativeConfig, run: _Run, k: int, rdir: str, pairs: str, train_history: list) -> dict:
    """Round k's DPO through the offline trainer, from run.policy (replaced by the result)."""
    from prefalign.models import freeze
    from prefalign.trainer import train

    if cfg.ref_update == "fixed":
        ref = run.fixed_ref
    else:  # moving: the policy this round starts from
        ref = freeze(copy.deepcopy(run.policy)) if run.needs_ref else None
    res = train(cfg.train_config(rdir, pairs, k), model=run.policy, tokenizer=run.tokenizer, ref_model=ref)
    run.policy = res.policy
    for rec in res.history:
        train_history.append({**rec, "round": k, "round_step": rec["step"], "step": run.dpo_steps + rec["step"]})
    run.dpo_steps += res.steps
    last = res.history[-1] if res.history else {}
    figures = {f"dpo/{m}": last[m] for m in ("loss", "rewards/accuracies", "rewards/margins", "logratio/pairs")
               if isinstance(last.get(m), float)}
    return {**figures, "dpo/steps": res.steps}
