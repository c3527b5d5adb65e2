"""beta-sweep: DPO at several beta from the same SFT start, same pairs, same steps.

Measured per beta: KL(policy || SFT) on the policy's OWN samples of held-out prompts (not the
log-ratio on the training pairs), the held-out verifier score and the implicit-reward preference
accuracy on held-out pairs. The claim: a small beta lets the policy drift far from the
reference, a large beta keeps it close.
"""

from __future__ import annotations

from prefalign.experiments import common

BETAS = (0.01, 0.03, 0.1, 0.3, 1.0)


def monotone_down(xs: list[float]) -> int:
    """How many neighbouring steps go UP (0 = non-increasing)."""
    return sum(b > a for a, b in zip(xs, xs[1:]))


def run(ctx: common.Context) -> common.Result:
    start = common.demo_start(ctx)
    s = ctx.settings
    rows, runs = [], {}
    base = common.evaluate(ctx, start, start.sft)
    rows.append({"run": "SFT (reference)", "beta": "-", **base})
    for beta in BETAS:
        ctx.say(f"DPO beta {beta}: {s.dpo_steps} steps of {s.dpo_batch} pairs")
        with ctx.timer("dpo"):
            res = common.dpo(ctx.path(f"beta-{beta}"), start.sft, start.tok, start.train_file, start.eval_file, s,
                               beta=beta, save_model=False)
        runs[beta] = res.history
        out = common.evaluate(ctx, start, res.policy)
        last = res.history[-1]
        out["train margin h"] = last["rewards/margins"] / beta
        rows.append({"run": f"DPO beta={beta}", "beta": beta, **out})
    cols = ["run", "beta", "KL (sampled)", "score (greedy)", "score (sampled)", "pref. accuracy (held-out)",
            "train margin h", "length (tokens)"]
    dpo_rows = rows[1:]
    kls = [r["KL (sampled)"] for r in dpo_rows]
    fig1 = common.plot(ctx.path("plots", "kl_vs_beta.png"), [
        {"series": {"DPO": (list(BETAS), kls)}, "xlabel": "beta", "ylabel": "KL(policy || SFT), nats",
         "title": "KL on the policy's own samples vs beta", "logx": True, "style": "-o", "legend": False},
        {"series": {"greedy score": (kls, [r["score (greedy)"] for r in dpo_rows]),
                    "sampled score": (kls, [r["score (sampled)"] for r in dpo_rows]),
                    "pref. accuracy": (kls, [r["pref. accuracy (held-out)"] for r in dpo_rows])},
         "hlines": {"SFT greedy": base["score (greedy)"]}, "xlabel": "KL(policy || SFT), nats",
         "ylabel": "held-out", "title": "quality vs KL", "style": "o",
         "annotate": {f"b={b}": (k, r["score (greedy)"]) for b, k, r in zip(BETAS, kls, dpo_rows)}},
    ])
    fig2 = common.plot(ctx.path("plots", "margins.png"), [
        {"series": {f"beta={b}": common.series(h, "rewards/margins", 1 / b) for b, h in runs.items()},
         "ylabel": "log-ratio margin h (nats)", "title": "training margin h = rewards/margins / beta"},
        {"series": {f"beta={b}": common.series(h, "logratio/pairs") for b, h in runs.items()},
         "ylabel": "mean log-ratio on the training pairs", "title": "logratio/pairs (a drift signal, not a KL)"},
    ])
    ups = monotone_down(kls)
    if kls[0] > kls[-1] and ups == 0:
        verdict = (f"Matches the claim: the sampled KL falls monotonically with beta, from {kls[0]:.2f} nats at "
                   f"beta {BETAS[0]} to {kls[-1]:.3f} at beta {BETAS[-1]}.")
    elif kls[0] > kls[-1]:
        verdict = (f"Mostly matches: KL is {kls[0]:.2f} nats at beta {BETAS[0]} and {kls[-1]:.3f} at beta {BETAS[-1]}, "
                   f"but not monotone ({ups} of {len(kls) - 1} neighbouring betas go up).")
    else:
        verdict = (f"Does NOT match: KL at beta {BETAS[0]} ({kls[0]:.3f}) is not above KL at beta {BETAS[-1]} "
                   f"({kls[-1]:.3f}) in this run.")
    return common.Result(
        title="beta-sweep: DPO at several beta, KL on policy samples", rows=rows, columns=cols,
        figures=[fig1, fig2],
        claim="a small beta lets the policy drift far from the reference (large KL), a large beta keeps it close.",
        verdict=verdict,
        notes=[f"{len(start.pairs)} on-policy training pairs, {len(start.eval_pairs)} held-out pairs, "
               f"{len(start.splits.heldout)} held-out problems; every run: {s.dpo_steps} steps of {s.dpo_batch} "
               f"pairs, lr {s.dpo_lr} (constant), from the same SFT model, which is also the reference.",
               "KL (sampled) = mean over held-out prompts of log pi(y|x) - log pi_SFT(y|x) for y sampled from the "
               "policy at temperature 1 (evaluation.sampled_kl). 'train margin h' is the last step's "
               "rewards/margins divided by beta: the log-ratio margin the loss sees (summed log-probs)."],
        extra={"betas": list(BETAS)},
    )
