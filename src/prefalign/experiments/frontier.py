"""frontier: reward vs KL for DPO, PPO (RLHF) and GRPO from the same SFT start.

The DPO paper's Figure 2 (left; Rafailov et al. 2023, arXiv:2305.18290): each method at several
strengths of its pull toward the reference, each run one point (KL(policy || SFT) on the
policy's own samples of held-out prompts, held-out reward). The claim: DPO's points dominate
PPO's (as much reward or more at as little KL or less).

  - DPO at several beta, on the on-policy pairs the other experiments use (common.demo_start);
  - PPO (RLHF) at several KL coefficients: a reward model trained on those same pairs (rlhf.py),
    then PPO against it; `--ppo-reward verifier` gives PPO the demo's exact checker instead;
  - GRPO at several KL coefficients (its beta), on the verifier's 0/1 reward.

Every point is scored by the demo's verifier on the held-out problems (greedy: the frontier's y;
T = 1 too), whatever reward the method trained on.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

from prefalign.experiments import common, rlhf
from prefalign.experiments.beta_sweep import monotone_down

METHODS = ("DPO", "PPO", "GRPO")
COEF_NAME = {"DPO": "beta", "PPO": "kl_coef", "GRPO": "kl_coef"}


@dataclass(frozen=True)
class Budget:
    """The points and every run's size. DPO's steps, batch and lr are DemoSettings' (the demo's DPO)."""

    dpo_betas: tuple = (0.1, 0.3, 1.0, 3.0, 10.0)
    ppo_kl: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    grpo_kl: tuple = (0.01, 0.04, 0.1, 0.3, 1.0)
    grpo_steps: int = 100            # prefalign compare's GRPO (docs/compare.md)
    grpo_prompts: int = 32
    grpo_group: int = 8
    grpo_lr: float = 3e-4
    rlhf: rlhf.RLHFBudget = field(default_factory=rlhf.RLHFBudget)

    @classmethod
    def quick(cls) -> "Budget":
        return cls(dpo_betas=(0.1, 1.0), ppo_kl=(0.01, 0.3), grpo_kl=(0.01, 0.3), grpo_steps=3, grpo_prompts=4,
                   grpo_group=4, rlhf=rlhf.RLHFBudget.quick())


# --------------------------------------------------------------------------- one point per run


def _row(method: str, coef: float, ev: dict, gen_s: float, train_s: float) -> dict:
    return {"run": f"{method} {COEF_NAME[method]}={coef}", "method": method, "coef": coef, **ev,
            "gen s": gen_s, "train s": train_s}


def dpo_points(ctx: common.Context, start: common.Start, betas) -> list[dict]:
    s, rows = ctx.settings, []
    for beta in betas:
        ctx.say(f"DPO beta {beta}: {s.dpo_steps} steps of {s.dpo_batch} pairs")
        t0 = time.perf_counter()
        with ctx.timer("dpo"):
            res = common.dpo(ctx.path(f"dpo-{beta}"), start.sft, start.tok, start.train_file, "", s, beta=beta,
                             save_model=False)
        rows.append(_row("DPO", beta, common.evaluate(ctx, start, res.policy, pref=False), 0.0,
                         time.perf_counter() - t0))
    return rows


def ppo_points(ctx: common.Context, start: common.Start, budget: Budget, prompts, reward_kind: str) -> tuple:
    """(rows, reward-model stats): the reward model is trained once and serves every KL coefficient."""
    s, rows, stats = ctx.settings, [], {}
    rm_spec = ""
    if reward_kind == "rm":
        ctx.say(f"reward model: {budget.rlhf.rm_steps} steps of {budget.rlhf.rm_batch} pairs (the DPO pairs)")
        with ctx.timer("reward model"):
            rm_spec, stats = rlhf.train_reward_model(ctx.path("rm"), start.sft, start.tok, start.train_file,
                                                     start.eval_file, budget.rlhf, s.seed)
    reward = rlhf.ppo_reward_spec(reward_kind, rm_spec)
    for kl in budget.ppo_kl:
        ctx.say(f"PPO kl_coef {kl} ({reward_kind} reward): {budget.rlhf.ppo_steps} steps of "
                f"{budget.rlhf.ppo_prompts} prompts")
        cfg = rlhf.ppo_config(ctx.path(f"ppo-{kl}"), budget.rlhf, kl, [reward], s.seed,
                              common.pipeline.MAX_NEW_TOKENS, 16, s.temperature)
        with ctx.timer("ppo"):
            res, gen_s, train_s = rlhf.run_ppo(cfg, copy.deepcopy(start.sft), start.tok, prompts)
        rows.append(_row("PPO", kl, common.evaluate(ctx, start, res.policy, pref=False), gen_s, train_s))
    return rows, stats


def grpo_points(ctx: common.Context, start: common.Start, budget: Budget, prompts) -> list[dict]:
    from prefalign.online.grpo import GRPOConfig, grpo

    s, rows = ctx.settings, []
    for kl in budget.grpo_kl:
        ctx.say(f"GRPO kl_coef {kl}: {budget.grpo_steps} steps of {budget.grpo_prompts} x {budget.grpo_group}")
        # compare's GRPO (Dr. GRPO: no std scaling, constant normalizer), only beta varies
        cfg = GRPOConfig(output=ctx.path(f"grpo-{kl}"), reward=[rlhf.DEMO_VERIFIER], steps=budget.grpo_steps,
                         prompts_per_step=budget.grpo_prompts, group_size=budget.grpo_group, lr=budget.grpo_lr,
                         kl_coef=kl, scale="none", aggregation="dr_grpo", max_new_tokens=common.pipeline.MAX_NEW_TOKENS,
                         max_prompt_length=16, temperature=s.temperature, seed=s.seed, progress=False,
                         save_model=False, overwrite=True)
        with ctx.timer("grpo"):
            res = grpo(cfg, model=copy.deepcopy(start.sft), tokenizer=start.tok, prompts=prompts)
        gen_s = sum(r["time/generation"] + r["time/scoring"] for r in res.history)
        rows.append(_row("GRPO", kl, common.evaluate(ctx, start, res.policy, pref=False), gen_s,
                         sum(r["time/training"] for r in res.history)))
    return rows


# --------------------------------------------------------------------------- reading the frontier


def dominated(point: tuple, others: list[tuple]) -> bool:
    """Whether some (kl, score) of `others` has KL <= and score >= the point's (one of them strictly)."""
    k, v = point
    return any(ok <= k and ov >= v and (ok, ov) != (k, v) for ok, ov in others)


def points_of(rows: list[dict], method: str) -> list[tuple]:
    return [(r["KL (sampled)"], r["score (greedy)"]) for r in rows if r["method"] == method]


def kl_trend(rows: list[dict], method: str) -> str:
    """How KL moves as the coefficient grows: 'falls' (never up), 'mostly falls' or 'does not fall'."""
    kls = [r["KL (sampled)"] for r in sorted((r for r in rows if r["method"] == method), key=lambda r: r["coef"])]
    ups = monotone_down(kls)
    if len(kls) < 2:
        return "one point"
    if ups == 0:
        return "falls"
    return "mostly falls" if kls[0] > kls[-1] else "does not fall"


def verdict(rows: list[dict]) -> str:
    dpo, ppo, grpo = (points_of(rows, m) for m in METHODS)
    by_dpo = sum(dominated(p, dpo) for p in ppo)
    by_ppo = sum(dominated(d, ppo) for d in dpo)
    best = {m: max(points_of(rows, m), key=lambda p: p[1]) for m in METHODS}
    head = (f"DPO dominates {by_dpo} of {len(ppo)} PPO points (PPO dominates {by_ppo} of {len(dpo)} DPO points). "
            + "; ".join(f"best {m}: score {best[m][1]:.3f} at KL {best[m][0]:.2f}" for m in METHODS) + ". ")
    trend = ", ".join(f"{m} {kl_trend(rows, m)}" for m in METHODS)
    if by_dpo == len(ppo) and by_ppo == 0:
        claim = "Matches the claim: DPO's frontier dominates PPO's."
    elif by_ppo == 0 and by_dpo:
        claim = "Partly matches the claim: some PPO points are dominated by DPO, none dominate DPO."
    else:
        claim = "Does NOT match the claim here: DPO's points do not dominate PPO's."
    return f"{claim} {head}KL as the coefficient grows: {trend}."


def figure(ctx: common.Context, rows: list[dict], base: dict) -> str:
    def panel(key: str, title: str) -> dict:
        series = {m: ([r["KL (sampled)"] for r in rows if r["method"] == m], [r[key] for r in rows if r["method"] == m])
                  for m in METHODS}
        return {"series": series, "xlabel": "KL(policy || SFT) on its own samples, nats", "ylabel": key,
                "title": title, "style": "-o", "hlines": {"SFT": base[key]},
                "annotate": {f"{r['coef']:g}" + " " * i: (r["KL (sampled)"], r[key]) for i, r in enumerate(rows)}}

    return common.plot(ctx.path("plots", "frontier.png"), [
        panel("score (greedy)", "held-out verifier score (greedy) vs KL"),
        panel("score (sampled)", "held-out verifier score (T=1) vs KL")])


def run(ctx: common.Context) -> common.Result:
    from prefalign.online.common import load_prompts

    budget = Budget.quick() if ctx.quick else Budget()
    reward_kind = ctx.options.get("ppo_reward") or rlhf.DEFAULT_PPO_REWARD
    start = common.demo_start(ctx)
    prompts = load_prompts([{"prompt": p.prompt, "answer": p.answer} for p in start.splits.train], start.tok, 16)
    base = common.evaluate(ctx, start, start.sft, pref=False)
    rows = dpo_points(ctx, start, budget.dpo_betas)
    ppo_rows, rm_stats = ppo_points(ctx, start, budget, prompts, reward_kind)
    rows += ppo_rows + grpo_points(ctx, start, budget, prompts)
    fig = figure(ctx, rows, base)
    table = [{"run": "SFT (start)", "method": "SFT", "coef": "-", **base, "gen s": 0.0, "train s": 0.0}, *rows]
    cols = ["run", "KL (sampled)", "score (greedy)", "score (sampled)", "length (tokens)", "gen s", "train s"]
    r = budget.rlhf
    ppo_reward = (f"a reward model trained on the DPO pairs ({r.rm_steps} steps of {r.rm_batch}, lr {r.rm_lr}; "
                  f"held-out pair accuracy {rm_stats.get('rm_accuracy', float('nan')):.3f}), which also starts "
                  f"the value model" if reward_kind == "rm" else "the demo's verifier (--ppo-reward verifier)")
    return common.Result(
        title="frontier: held-out reward vs KL for DPO, PPO (RLHF) and GRPO", rows=table, columns=cols,
        figures=[fig], verdict=verdict(rows),
        claim="DPO's reward-vs-KL frontier dominates PPO's (Rafailov et al. 2023, Fig. 2 left).",
        notes=[f"Every run starts from the same SFT model (also the reference). DPO: {len(start.pairs)} on-policy "
               f"pairs, {ctx.settings.dpo_steps} steps of {ctx.settings.dpo_batch}, lr {ctx.settings.dpo_lr}. "
               f"PPO: reward = {ppo_reward}; {r.ppo_steps} steps of {r.ppo_prompts} prompts x 1 sample, "
               f"{r.ppo_epochs} epochs, mini-batch {r.ppo_mini_batch}, lr {r.ppo_lr}. GRPO: the verifier, "
               f"{budget.grpo_steps} steps of {budget.grpo_prompts} prompts x {budget.grpo_group}, lr "
               f"{budget.grpo_lr}, Dr. GRPO.",
               "KL (sampled): mean over held-out prompts of log pi(y|x) - log pi_SFT(y|x), y sampled from the "
               "policy at T = 1. score: the verifier on held-out problems (greedy and T = 1). gen s: sampling "
               "and scoring inside training; train s: the rest of training (DPO: all of it)."],
        extra={"budget": dataclasses.asdict(budget),
               "ppo_reward": reward_kind, **rm_stats},
    )
