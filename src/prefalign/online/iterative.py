"""Iterative (online) DPO: generate from the current policy, score, pair, DPO, repeat.

    result = iterate(IterativeConfig(output="runs/iter", rounds=3, samples=8, min_gap=0.5),
                     model=sft_model, tokenizer=tok, prompts=rows, reward="exact_answer")

Round k (1-based):
  1. prompts_per_round prompts (a seeded permutation, fresh each pass over the prompts)
     -> `samples` completions each from the current policy (online.generate).
  2. Scores from the reward function(s) (or a judge wrapped as one).
  3. Pairs: best vs worst of each group, kept when the reward gap is >= min_gap
     (online.pairs.build_pairs) -> OUTPUT/round-k/pairs.jsonl.
  4. DPO (or any paired loss) on those pairs through the offline trainer
     (prefalign.trainer.train, OUTPUT/round-k holds its metrics and plots), starting from the
     current policy.
  5. The reference for the next round: "fixed" keeps the initial policy (the KL is to the
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
import os
import time
from dataclasses import dataclass

import torch

from prefalign import hardware
from prefalign.errors import UserError
from prefalign.metrics import MetricsLog, peak_memory_mb
from prefalign.online.generate import SamplingConfig, generate
from prefalign.online.grpo import (
    PromptSet, autocast_for, load_policy, load_prompts, make_reward, plot_run, prepare_output, write_config,
)
from prefalign.online.pairs import build_pairs, write_pairs
from prefalign.online.settings import REFERENCES, IterativeConfig  # noqa: F401 (the settings live apart: the CLI imports them without torch)
from prefalign.schedule import step_indices


@dataclass
class IterativeResult:
    output: str
    rounds: int
    history: list                     # one record per round
    train_history: list               # every logged DPO step of every round, with "round" and a global "step"
    policy: object
    tokenizer: object


def sample_and_score(policy, tok, pset: PromptSet, idx: list[int], n: int, sampling: dict, seed: int, score_fn, ac):
    """(Generations, RewardScores, texts of the prompts [P*n], extra [P*n]) for the prompts idx."""
    p_ids, p_texts, extra = pset.select(idx, repeat=n)
    with ac():
        gens = generate(policy, tok, p_ids, SamplingConfig(**sampling, n=n, seed=seed))
    return gens, score_fn.score(p_texts, gens.texts, extra)


def iterate(cfg: IterativeConfig, *, model=None, tokenizer=None, prompts=None, reward=None) -> IterativeResult:
    """Run iterative DPO. prompts / reward / model objects override the config's paths and specs."""
    from prefalign.models import freeze, save_model
    from prefalign.losses import get_loss
    from prefalign.trainer import train

    cfg.validate()
    cfg.precision = hardware.announce(cfg.precision)  # once; each round's DPO gets the concrete value
    prepare_output(cfg.output, cfg.overwrite)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg, model, tokenizer)
    policy.to(device)
    pset = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts if prompts is not None else cfg.prompts,
                                                                       tok, cfg.max_prompt_length)
    if len(pset) < cfg.prompts_per_round:
        raise UserError(f"{len(pset)} prompts, fewer than prompts_per_round ({cfg.prompts_per_round})")
    score_fn = make_reward(reward if reward is not None else cfg.reward, cfg.reward_weights)
    needs_ref = get_loss(cfg.loss).needs_reference
    fixed_ref = freeze(copy.deepcopy(policy)) if needs_ref and cfg.reference == "fixed" else None
    write_config(cfg.output, cfg)

    ac = autocast_for(cfg.precision, device)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    log = MetricsLog(cfg.output, True)
    history, train_history, offset = [], [], 0
    for k in range(1, cfg.rounds + 1):
        rdir = os.path.join(cfg.output, f"round-{k}")
        t0 = time.perf_counter()
        idx = step_indices(len(pset), k - 1, cfg.prompts_per_round, cfg.seed)
        gens, scores = sample_and_score(policy, tok, pset, idx, cfg.samples, sampling, cfg.seed * 1_000_003 + k,
                                        score_fn, ac)
        t1 = time.perf_counter()
        rows = build_pairs([pset.raw[i] for i in idx], gens.texts, scores.total, cfg.samples, cfg.min_gap,
                           cfg.pairs_per_prompt, extra={c: [v[i] for i in idx] for c, v in pset.extra.items()})
        path = write_pairs(os.path.join(rdir, "pairs.jsonl"), rows)
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
            ref = fixed_ref if cfg.reference == "fixed" else (freeze(copy.deepcopy(policy)) if needs_ref else None)
            res = train(cfg.train_config(rdir, path, k), model=policy, tokenizer=tok, ref_model=ref)
            policy = res.policy
            for rec in res.history:
                train_history.append({**rec, "round": k, "round_step": rec["step"], "step": offset + rec["step"]})
            offset += res.steps
            last = res.history[-1] if res.history else {}
            record.update({f"dpo/{m}": last[m] for m in ("loss", "rewards/accuracies", "rewards/margins", "logratio/pairs")
                           if isinstance(last.get(m), float)})
            record["dpo/steps"] = res.steps
        record["time/training"] = time.perf_counter() - t2
        if k == cfg.rounds:  # how the final policy does on fresh samples (the next round's prompts)
            idx = step_indices(len(pset), k, cfg.prompts_per_round, cfg.seed)
            _, after = sample_and_score(policy, tok, pset, idx, cfg.samples, sampling, cfg.seed * 1_000_003 + k + 1,
                                        score_fn, ac)
            record["reward/after"] = sum(after.total) / len(after.total)
        record["peak_memory_mb"] = peak_memory_mb()
        log.write(record)
        history.append(record)
        if cfg.progress:
            print(f"round {k}/{cfg.rounds}: reward {record['reward/mean']:.3f}, {len(rows)} pairs, "
                  f"dpo loss {record.get('dpo/loss', float('nan')):.4f}", flush=True)
    log.close()
    plot_run(cfg.output, history, [("reward", ["reward/mean", "reward/after"]), ("pairs", ["pairs"])])
    if train_history:
        plot_run(cfg.output, train_history, [("dpo_loss", ["loss"]), ("dpo_rewards", ["rewards/margins"])])
    if cfg.save_model:
        save_model(policy, tok, os.path.join(cfg.output, "model"))
    return IterativeResult(cfg.output, cfg.rounds, history, train_history, policy, tok)
