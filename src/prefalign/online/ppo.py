"""The PPO-RLHF loop (Ziegler et al. 2019; Ouyang et al. 2022): sample, score, penalise the KL
to the reference per token, estimate advantages with a value model, take clipped PPO steps.

    result = ppo(PPOConfig(output="runs/ppo", steps=100, prompts_per_step=16, kl_coef=0.05),
                 model=sft_model, tokenizer=tok, prompts=[{"prompt": "12+7=", "answer": 19}, ...],
                 reward="exact_answer")          # or "rm:runs/rm/model", a trained reward model

Four models are resident: the policy (trained), the reference (frozen copy of the start), the
reward (a function or a reward model, under no_grad) and the value model (trained; see
online/value.py for why it is separate and where it starts). With --lora-r the policy trains
LoRA adapters and is its own reference with the adapters off (no copy); the value model, a
model of its own, still trains in full.

One step (one generation batch of P prompts, one completion each):
  1. sample from the current policy (prefalign.sampling, KV cache; seed = f(seed, step));
  2. score each completion: s [P] (online.rewards, any load_reward spec);
  3. rollout, no grad: log-probs of the policy and the reference and the values, per token;
     rewards r_t = -kl_coef (log pi - log pi_ref) plus s at the last token
     (losses.ppo.kl_penalty_rewards); GAE advantages and returns (losses.ppo.gae); advantages
     whitened over the batch;
  4. ppo_epochs passes over the batch in a seeded random order, mini_batch completions per
     optimizer step (micro_batch per forward/backward): clipped surrogate for the policy,
     clipped value loss for the value model, one AdamW with a parameter group per model,
     gradients clipped per model;
  5. the adaptive KL controller (if kl_target) updates kl_coef from the batch's KL.

Log-probs take the path GRPO's do (grpo.completion_token_logps: packed segments or padded rows,
the chunked head, logits / temperature); values take the same layout (value.completion_token_values).
Dropout is off in every model (as TRL does), so the rollout's log-probs are those of the policy
being trained and the first mini-batch's ratio is exactly 1 on the rollout's layout.

Metrics (OUTPUT/metrics.jsonl): reward/mean, reward/std, kl (per completion, summed over its
tokens: the quantity kl_target controls), kl_coef, non_score_reward, entropy (Monte-Carlo:
minus the mean log-prob of the sampled tokens), policy_loss, value_loss, clip_frac,
value_clip_frac, approx_kl, explained_variance (of the rollout's values for the returns),
completion_length, times, lr, grad norms. Checkpoints hold both models, the optimizer, the
scheduler, the RNG and the KL controller: `--resume auto` continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prefalign import checkpoint, fields, fingerprint, hardware, optim, prepare, rundir, signals
from prefalign.errors import UserError
from prefalign.lean import lean_mlps
from prefalign.losses.ppo import (AdaptiveKL, clipped_policy_loss, clipped_value_loss, explained_variance, gae,
                                  kl_penalty_rewards, masked_mean, whiten)
from prefalign.metrics import Console, MetricsLog, peak_memory_mb, read_jsonl
from prefalign.online.common import (PromptSet, completion_token_logps, initial_reference, load_policy, load_prompts,
                                     make_reward, plot_run, reference_mode)
from prefalign.sampling import SamplingConfig, generate
from prefalign.online.settings import PPOConfig  # noqa: F401 (the CLI imports the settings without torch)
from prefalign.online.value import build_value_model, completion_token_values, value_source
from prefalign.schedule import lr_lambda, step_indices

# Settings that do not change what a run computes (a resume may change them freely).
NOT_TRAJECTORY = ("output", "resume", "overwrite", "steps", "log_every", "save_every", "keep_checkpoints",
                  "progress", "save_model", "chunk_size", "packing", "token_budget", "micro_batch")


@dataclass
class PPOResult:
    output: str
    steps: int
    history: list
    policy: object
    value: object
    tokenizer: object
    stopped: str = ""              # "signal SIGTERM": stopped early with a checkpoint (exit 128 + n)


class Actors(nn.Module):
    """The two trained models under one module: one optimizer (a parameter group each) and one
    checkpoint whose weights are named policy.* and value.*."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


@dataclass
class Rollout:
    """One generation batch, everything per token [B, T] (T = the longest completion)."""

    prompt_ids: list               # [B] token ids
    completion_ids: list           # [B] token ids
    old_logps: Tensor              # [B, T] sampling policy
    values: Tensor                 # [B, T] value model at rollout time
    advantages: Tensor             # [B, T] whitened GAE advantages
    returns: Tensor                # [B, T] GAE returns (value targets)
    mask: Tensor                   # [B, T]

    def __len__(self) -> int:
        return len(self.completion_ids)

    def take(self, idx: list[int]) -> tuple:
        """(prompts, completions, old_logps, values, advantages, returns) of rows idx, cropped to their longest."""
        T = max(len(self.completion_ids[i]) for i in idx)
        rows = torch.tensor(idx, device=self.mask.device)
        crop = lambda x: x[rows, :T]  # noqa: E731
        return ([self.prompt_ids[i] for i in idx], [self.completion_ids[i] for i in idx], crop(self.old_logps),
                crop(self.values), crop(self.advantages), crop(self.returns))


def _chunks(idx: list[int], size: int) -> list[list[int]]:
    size = size or len(idx)
    return [idx[s:s + size] for s in range(0, len(idx), size)]


def _stack(rows: list[Tensor], T: int) -> Tensor:
    """[b_k, T_k] blocks -> [sum b_k, T], zero-padded on the right."""
    return torch.cat([torch.nn.functional.pad(r, (0, T - r.shape[1])) for r in rows])


def _kw(cfg: PPOConfig, pad_id: int) -> dict:
    return dict(pad_id=pad_id, packing=cfg.packing, token_budget=cfg.token_budget)


def make_rollout(actors: Actors, ref, cfg: PPOConfig, ac, pad_id: int, prompt_ids, completion_ids,
                 scores: Tensor, kl_coef: float) -> tuple[Rollout, dict]:
    """Step 3 of the module docstring, under no_grad: the Rollout and its metrics."""
    kw = _kw(cfg, pad_id)
    lp_kw = dict(kw, chunk_size=cfg.chunk_size, temperature=cfg.temperature)
    parts = {"lp": [], "ref": [], "v": []}
    with torch.no_grad(), ac():
        for m in _chunks(list(range(len(completion_ids))), cfg.micro_batch):
            p, c = [prompt_ids[i] for i in m], [completion_ids[i] for i in m]
            parts["lp"].append(completion_token_logps(actors.policy, p, c, **lp_kw)[0])
            with reference_mode(ref, actors.policy):
                parts["ref"].append(completion_token_logps(ref, p, c, **lp_kw)[0])
            parts["v"].append(completion_token_values(actors.value, p, c, **kw))
    T = max(len(c) for c in completion_ids)
    lp, ref_lp, values = (_stack(parts[k], T) for k in ("lp", "ref", "v"))       # [B, T] each
    lengths = torch.tensor([len(c) for c in completion_ids], device=lp.device)
    mask = torch.arange(T, device=lp.device)[None, :] < lengths[:, None]          # [B, T]
    rewards, kl = kl_penalty_rewards(lp, ref_lp, scores.to(lp.device), mask, kl_coef)
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    roll = Rollout(prompt_ids, completion_ids, lp, values, whiten(adv, mask), returns, mask)
    stats = {"kl": kl.sum(1).mean().item(), "kl_coef": kl_coef,
             "non_score_reward": (-kl_coef * kl).sum(1).mean().item(),
             "entropy": -masked_mean(lp, mask).item(), "explained_variance": explained_variance(values, returns, mask),
             "value/mean": masked_mean(values, mask).item(), "returns/mean": masked_mean(returns, mask).item()}
    return roll, stats


def minibatch_step(actors: Actors, opt, sched, cfg: PPOConfig, ac, pad_id: int, roll: Rollout,
                   idx: list[int]) -> dict:
    """One optimizer step on the rows idx. The micro-batch losses are token means weighted by
    their share of the mini-batch's tokens, so the gradient is the mini-batch's token mean."""
    n_tok = sum(len(roll.completion_ids[i]) for i in idx)
    kw = _kw(cfg, pad_id)
    sums = dict.fromkeys(("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "ratio_mean"), 0.0)
    for m in _chunks(idx, cfg.micro_batch):
        p, c, old_lp, old_v, adv, ret = roll.take(m)
        with ac():
            lp, mask = completion_token_logps(actors.policy, p, c, chunk_size=cfg.chunk_size,
                                              temperature=cfg.temperature, **kw)          # [b, Tc]
            v = completion_token_values(actors.value, p, c, **kw)                         # [b, Tc]
        pol = clipped_policy_loss(lp, old_lp, adv, mask, cfg.clip_eps)
        val = clipped_value_loss(v, old_v, ret, mask, cfg.value_clip)
        share = float(mask.sum()) / n_tok
        # Two models, two parameter groups: the sum's gradient is each loss's gradient for its model.
        ((pol.loss + val.loss) * share).backward()
        for k, x in (("policy_loss", pol.loss), ("value_loss", val.loss), ("clip_frac", pol.clip_frac),
                     ("value_clip_frac", val.clip_frac), ("approx_kl", pol.approx_kl), ("ratio_mean", pol.ratio_mean)):
            sums[k] += float(x.detach()) * share
    norms = [torch.nn.utils.clip_grad_norm_(g["params"], cfg.max_grad_norm or float("inf")) for g in opt.param_groups]
    sums["grad_norm"], sums["value_grad_norm"] = (float(n) for n in norms)
    if all(math.isfinite(float(n)) for n in norms):
        opt.step()
    else:
        sums["skipped"] = 1.0
    opt.zero_grad(set_to_none=True)
    sched.step()
    return sums


def ppo_update(actors: Actors, opt, sched, cfg: PPOConfig, ac, pad_id: int, roll: Rollout, step: int) -> dict:
    """Step 4: ppo_epochs passes over the batch, each in its own seeded order (a pure function of
    (seed, step, epoch), so a resumed run draws the same), mini_batch rows per optimizer step.
    Returns the metrics averaged over the optimizer steps."""
    B = len(roll)
    records = []
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 101 + epoch)
        order = torch.randperm(B, generator=g).tolist()
        for idx in _chunks(order, cfg.mini_batch):
            records.append(minibatch_step(actors, opt, sched, cfg, ac, pad_id, roll, idx))
    out = {k: sum(r.get(k, 0.0) for r in records) / len(records) for k in records[0]}
    out["skipped_updates"] = sum(r.get("skipped", 0.0) for r in records)
    out.pop("skipped", None)
    return out


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    cfg: PPOConfig
    actors: Actors
    ref: nn.Module
    tok: object
    pset: PromptSet
    score_fn: object
    opt: torch.optim.Optimizer
    sched: object
    kl: AdaptiveKL
    ac: object
    fp: dict


def _setup(cfg: PPOConfig, model, tokenizer, prompts, reward, ref_model, value_model) -> _Run:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg, model, tokenizer)
    fp = _fingerprint(cfg, model)
    pset = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts if prompts is not None else cfg.prompts,
                                                                       tok, cfg.max_prompt_length)
    if len(pset) < cfg.prompts_per_step:
        raise UserError(f"{len(pset)} prompts, fewer than prompts_per_step ({cfg.prompts_per_step})")
    score_fn = make_reward(reward if reward is not None else cfg.reward, cfg.reward_weights)
    if value_model is None:  # before LoRA: a value model from the policy copies its plain body
        value_model = build_value_model(value_source(cfg.value_model, cfg.reward), policy, tok)
    policy = prepare.with_lora(cfg, policy)
    # Built before a resume loads trained weights: the reference is the START policy (with LoRA,
    # the policy itself with its adapters off: no copy in memory).
    ref = initial_reference(cfg, policy, tok, ref_model, device)
    actors = Actors(policy, value_model).to(device).eval()  # eval: dropout off (see the module docstring)
    lean_mlps(actors)  # bitwise the same gradients, half the MLP activations (prefalign.lean)
    opt = optim.adamw([{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr},
                       {"params": [p for p in value_model.parameters() if p.requires_grad],
                        "lr": cfg.value_lr or cfg.lr}], cfg)
    total = cfg.steps * cfg.ppo_epochs * cfg.minibatches_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
    return _Run(cfg, actors, ref, tok, pset, score_fn, opt, sched, kl, prepare.autocast(cfg, device), fp)


def _fingerprint(cfg: PPOConfig, model) -> dict:
    """What a resume must not change: the trajectory's settings and the start model's identity."""
    fp = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAJECTORY}
    fp["model/sha256"] = ("in-process:" + fingerprint.model_digest(model)) if model is not None \
        else fingerprint.file_digest(cfg.model)
    fp["prompts/sha256"] = fingerprint.file_digest(cfg.prompts)  # in-process prompts: "" (the caller's to keep)
    return fp


def _resume(run: _Run, root: str, say) -> tuple[int, bool]:
    """(start step, already finished) after loading the checkpoint --resume names, if any."""
    cfg = run.cfg
    path = checkpoint.find_resume(root, cfg.resume, warn=say)
    if path is None:
        rundir.check_nothing_finished(cfg)
        say(f"no valid checkpoint in {root}; starting from step 0")
        return 0, False
    weights, optim_state, sched_state, state = checkpoint.read(path)
    checkpoint.check_weights(path, run.actors, weights)
    fingerprint.check(path, state["trainer"].get("fingerprint"), run.fp, "refuse", say)
    checkpoint.apply(run.actors, run.opt, weights, optim_state)
    trainer = checkpoint.restore(run.sched, sched_state, state)
    run.kl.load_state_dict(trainer["kl"])
    start = trainer["step"]
    if rundir.nothing_left(start, cfg.steps, trainer.get("finished", False)):
        say(f"{cfg.output}: the run already finished at step {start}; nothing to do (to train it further: "
            f"--resume auto --steps N, N > {start})")
        return start, True
    say(f"resumed from {path} (step {start})")
    return start, False


def _step(run: _Run, step: int) -> dict:
    """Steps 1-5 of the module docstring for generation batch `step` (0-based): its metrics."""
    cfg, tok = run.cfg, run.tok
    t0 = time.perf_counter()
    idx = step_indices(len(run.pset), step, cfg.prompts_per_step, cfg.seed)
    p_ids, p_texts, extra = run.pset.select(idx)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, seed=cfg.seed * 1_000_003 + step)
    with torch.no_grad(), run.ac():
        gens = generate(run.actors.policy, tok, p_ids, sampling, batch_size=cfg.generation_batch_size)
    t1 = time.perf_counter()
    scores = run.score_fn.score(p_texts, gens.texts, extra, rows=[f"prompt {i + 1}" for i in idx])
    s = torch.tensor(scores.total, dtype=torch.float32)                               # [B]
    t2 = time.perf_counter()
    roll, record = make_rollout(run.actors, run.ref, cfg, run.ac, tok.pad_token_id, [list(p) for p in p_ids],
                                gens.token_ids, s, run.kl.value)
    t3 = time.perf_counter()
    record.update(ppo_update(run.actors, run.opt, run.sched, cfg, run.ac, tok.pad_token_id, roll, step))
    run.kl.update(record["kl"], len(roll))
    lengths = torch.tensor([len(t) for t in gens.token_ids], dtype=torch.float32)
    record.update({
        "step": step + 1, "reward/mean": s.mean().item(), "reward/std": s.std().item() if len(s) > 1 else 0.0,
        **{f"rewards/{k}": sum(v) / len(v) for k, v in scores.components.items() if len(scores.components) > 1},
        "completion_length": lengths.mean().item(),
        "truncated_fraction": sum(r == "length" for r in gens.finish_reasons) / len(gens),
        "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/rollout": t3 - t2,
        "time/training": time.perf_counter() - t3, "lr": run.sched.get_last_lr()[0], "peak_memory_mb": peak_memory_mb(),
    })
    return record


def ppo(cfg: PPOConfig, *, model=None, tokenizer=None, prompts=None, reward=None, ref_model=None,
        value_model=None) -> PPOResult:
    """Run PPO-RLHF. Objects (model, tokenizer, prompts, reward, ref_model, value_model) override
    the config's paths and specs. The output directory is held (rundir.claim) for the whole run."""
    from prefalign.config import check_attention

    cfg.validate()
    check_attention(cfg.attention)  # before the output directory is touched
    cfg = dataclasses.replace(cfg, precision=hardware.announce(cfg.precision))  # config.yaml records what ran
    with rundir.claim(cfg), signals.handlers_restored():
        return _ppo(cfg, model, tokenizer, prompts, reward, ref_model, value_model)


def _ppo(cfg: PPOConfig, model, tokenizer, prompts, reward, ref_model, value_model) -> PPOResult:
    from prefalign.models import save_model

    run = _setup(cfg, model, tokenizer, prompts, reward, ref_model, value_model)
    root = os.path.join(cfg.output, "checkpoints")
    console = Console(cfg.steps, cfg.progress, label="ppo", messages=True)
    console.KEYS = ("reward/mean", "kl", "kl_coef", "value_loss", "clip_frac")
    start, done = _resume(run, root, console.say) if cfg.resume else (0, False)
    if done:
        console.close()
        return PPOResult(cfg.output, start, read_jsonl(os.path.join(cfg.output, "metrics.jsonl")), run.actors.policy,
                         run.actors.value, run.tok)
    resumed_here = start > 0
    rundir.begin(cfg.output, replace=not resumed_here)
    fingerprint.write_config(cfg.output, fields.as_dict(cfg), fingerprint.history(cfg.output) if resumed_here
                             else [], start, {})
    log = MetricsLog(cfg.output, True, resume_step=start if resumed_here else None)

    def save(step: int, finished: bool = False) -> None:
        checkpoint.save(root, step, checkpoint.trainable_state(run.actors), run.opt.state_dict(), run.sched,
                        {"kl": run.kl.state_dict(), "fingerprint": run.fp, "finished": finished}, cfg.keep_checkpoints)

    stop = signals.StopRequest()  # SIGINT/SIGTERM/SIGHUP: finish the step, checkpoint, return (a second one: at once)
    for step in range(start, cfg.steps):
        record = _step(run, step)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or stop.signal:
            log.write(record)
            console.update(step + 1, record)
        if stop.signal and step + 1 < cfg.steps:
            save(step + 1)
            console.say(f"stopped at step {step + 1}: signal {stop.signal}; checkpoint saved in {root}, "
                        f"continue with --resume auto")
            console.close()
            log.close()
            return PPOResult(cfg.output, step + 1, [], run.actors.policy, run.actors.value, run.tok,
                             f"signal {stop.signal}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    console.close()
    log.close()
    history = read_jsonl(os.path.join(cfg.output, "metrics.jsonl"))  # the whole run, earlier legs included
    plot_run(cfg.output, history, [("reward", ["reward/mean", "reward/std"]), ("kl", ["kl", "kl_coef"]),
                                   ("loss", ["policy_loss", "value_loss"]),
                                   ("ppo", ["clip_frac", "approx_kl", "explained_variance", "entropy"]),
                                   ("length", ["completion_length"])])
    if cfg.save_model:
        save_model(run.actors.policy, run.tok, os.path.join(cfg.output, "model"))
    save(cfg.steps, finished=True)  # last: a finished checkpoint means the model above is complete
    return PPOResult(cfg.output, cfg.steps, history, run.actors.policy, run.actors.value, run.tok)
