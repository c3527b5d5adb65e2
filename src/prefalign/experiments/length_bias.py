"""length-bias: chosen responses systematically longer -> DPO learns "longer is better".

The demo's verifier ignores surrounding spaces (task.format_ok strips them), so trailing spaces are
content-free filler: "42   " is as correct as "42". From the on-policy pairs:
  - clean:     the pairs as sampled;
  - biased:    every chosen answer padded with 1-3 trailing spaces (seeded), rejected unchanged: the
               chosen is always longer, and length carries no information about correctness;
  - balanced:  chosen AND rejected of a pair padded with the same number of spaces: the same
               content as `biased`, but length no longer separates chosen from rejected.
Runs: DPO on each; on the biased data also two length-normalised options that exist in prefalign:
SimPO (per-token mean log-probs, no reference) and IPO with ipo_average_logps (per-token means).
Measured with a 10-token limit, so filler shows up: greedy length, the share of greedy answers
ending in filler, and the verifier score (spaces do not change it).
"""

from __future__ import annotations

import random

import torch

from prefalign.demo import task
from prefalign.experiments import common
from prefalign.metrics import write_jsonl
from prefalign.sampling import SamplingConfig, generate

FILLER = " "
LONG_TOKENS = 10
# Stronger than the demo's gentle DPO (beta 0.5, lr 5e-5), which barely moves the filler's probability
# in 150 steps; the same push as ipo-vs-dpo.
BETA, LR = 0.1, 2e-4


def pad_pairs(pairs: list[dict], seed: int, both: bool) -> list[dict]:
    rng = random.Random(f"length-bias-{seed}")
    out = []
    for p in pairs:
        k = rng.randint(1, 3)
        out.append({**p, "chosen": p["chosen"] + FILLER * k,
                    "rejected": p["rejected"] + (FILLER * k if both else "")})
    return out


def greedy_long(model, tok, problems: list[task.Problem], seed: int) -> dict:
    gen = generate(model, tok, [p.prompt for p in problems],
                   SamplingConfig(max_new_tokens=LONG_TOKENS, temperature=0.0, n=1, seed=seed))
    n = len(problems)
    return {"score (greedy, 10 tok)": sum(task.verify_batch(gen.texts, [p.answer for p in problems])) / n,
            "greedy length (tokens)": gen.num_tokens / n,
            "ends in filler": sum(t.rstrip() != t and t.strip() != "" for t in gen.texts) / n,
            "filler tokens": sum(len(t) - len(t.rstrip()) for t in gen.texts) / n}


@torch.no_grad()
def filler_prob(model, tok, problems: list[task.Problem]) -> float:
    """Mean probability of a filler token right after the correct answer: P(" " | "a+b=" + answer).
    Continuous, so it shows the pull toward filler before greedy answers flip to it."""
    space = tok.convert_tokens_to_ids(FILLER)
    groups: dict[int, list[list[int]]] = {}
    for p in problems:
        ids = tok(p.prompt + task.format_completion(p.answer))["input_ids"]
        groups.setdefault(len(ids), []).append(ids)
    total = 0.0
    for seqs in groups.values():
        logits = model(input_ids=torch.tensor(seqs)).logits[:, -1].float()
        total += logits.softmax(-1)[:, space].sum().item()
    return total / len(problems)


def run(ctx: common.Context) -> common.Result:
    start = common.demo_start(ctx)
    s = ctx.settings
    biased = write_jsonl(ctx.path("data", "biased.jsonl"), pad_pairs(start.pairs, s.seed, both=False))
    balanced = write_jsonl(ctx.path("data", "balanced.jsonl"), pad_pairs(start.pairs, s.seed, both=True))
    variants = [
        ("DPO, clean pairs", start.train_file, dict(beta=BETA)),
        ("DPO, biased (chosen longer)", biased, dict(beta=BETA)),
        ("DPO, balanced (both padded)", balanced, dict(beta=BETA)),
        ("SimPO (per-token means), biased", biased, dict(loss="simpo", beta=2.0, gamma=0.5)),
        ("IPO ipo_average_logps, biased", biased, dict(loss="ipo", beta=BETA, ipo_average_logps=True)),
    ]

    def measure(model) -> dict:
        out = common.evaluate(ctx, start, model, pref=False)
        with ctx.timer("evaluation"):
            out.update(greedy_long(model, start.tok, start.splits.heldout, s.seed))
            out["P(filler after answer)"] = filler_prob(model, start.tok, start.splits.heldout)
        return out

    rows = [{"run": "SFT (reference)", **measure(start.sft)}]
    hists = {}
    for i, (name, data, kw) in enumerate(variants):
        ctx.say(f"{name}: {s.dpo_steps} steps")
        with ctx.timer("training"):
            res = common.dpo(ctx.path(f"run-{i}"), start.sft, start.tok, data, "", s, save_model=False, lr=LR, **kw)
        hists[name] = res.history
        rows.append({"run": name, **measure(res.policy)})
    cols = ["run", "greedy length (tokens)", "ends in filler", "filler tokens", "P(filler after answer)", "score (greedy, 10 tok)",
            "score (sampled)", "KL (sampled)"]
    names = [r["run"] for r in rows]
    fig = common.plot(ctx.path("plots", "length_bias.png"), [
        {"series": {"greedy length": (list(range(len(rows))), [r["greedy length (tokens)"] for r in rows])},
         "xlabel": "run (0 = SFT; see table order)", "ylabel": "tokens", "title": "greedy answer length (10-token limit)",
         "style": "o", "legend": False, "annotate": {n.split(",")[0][:14] + str(i): (i, r["greedy length (tokens)"])
                                                     for i, (n, r) in enumerate(zip(names, rows))}},
        {"series": {"score (greedy)": (list(range(len(rows))), [r["score (greedy, 10 tok)"] for r in rows]),
                    "ends in filler": (list(range(len(rows))), [r["ends in filler"] for r in rows])},
         "xlabel": "run (0 = SFT; see table order)", "ylabel": "held-out fraction", "title": "quality vs filler",
         "style": "o"},
    ])
    _, clean, bias, bal, simpo, ipo = rows
    L, S = "greedy length (tokens)", "score (greedy, 10 tok)"
    grew = bias[L] - clean[L]
    not_better = bias[S] <= clean[S] + 0.02

    def shrink(r):
        return grew > 0 and (r[L] - clean[L]) < 0.5 * grew

    fixes = [n for n, r in (("balancing the data", bal), ("SimPO", simpo), ("IPO on per-token means", ipo))
             if shrink(r)]
    if grew > 0.3 and not_better:
        verdict = (f"Matches the claim: on length-biased pairs DPO's greedy answers grew by {grew:.2f} tokens "
                   f"({bias['ends in filler']:.0%} end in filler) while the score went {clean[S]:.3f} -> {bias[S]:.3f} "
                   f"(clean DPO vs biased DPO). ")
    else:
        verdict = (f"Does NOT match: length changed by {grew:+.2f} tokens, score {clean[S]:.3f} -> {bias[S]:.3f}. ")
    verdict += (f"The effect shrank (to under half the growth) with: {', '.join(fixes)}." if fixes else
                "None of the fixes halved the growth.")
    F = "P(filler after answer)"
    verdict += (f" P(filler after a correct answer): SFT {rows[0][F]:.3f}, clean {clean[F]:.3f}, biased {bias[F]:.3f}, "
                f"balanced {bal[F]:.3f}, SimPO {simpo[F]:.3f}, IPO-means {ipo[F]:.3f}.")
    notshrunk = [n for n, r in (("balancing", bal), ("SimPO", simpo), ("IPO on means", ipo)) if not shrink(r)]
    if fixes and notshrunk:
        verdict += f" Not with: {', '.join(notshrunk)}."
    return common.Result(
        title="length-bias: longer chosen answers, DPO, and the fixes", rows=rows, columns=cols, figures=[fig],
        verdict=verdict,
        claim="if chosen responses are systematically longer, DPO learns 'longer is better' and becomes verbose "
              "without getting better; length-balancing the data (or a length-normalised loss) shrinks the effect.",
        notes=[f"{len(start.pairs)} on-policy pairs; filler = 1-3 trailing spaces (the verifier strips them). Every run: "
               f"{s.dpo_steps} steps of {s.dpo_batch} pairs, lr {LR}, beta {BETA} (SimPO: beta 2, gamma 0.5). "
               f"Lengths count generated tokens including EOS, greedy, limit {LONG_TOKENS}. 'score (sampled)' and KL use "
               f"the demo's 5-token limit.",
               "Why the normalised losses need not help here: the filler is a marker present only in chosen answers, "
               "and a per-token mean still rewards making the marker likely; normalisation removes the advantage "
               "of *more* tokens in a summed log-ratio, not the correlation itself. Balancing removes the correlation."],
    )
