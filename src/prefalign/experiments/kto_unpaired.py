"""kto-unpaired: KTO on unpaired good/bad labels vs DPO on the pairs they came from.

The on-policy pairs are split into single completions labelled desirable (the chosen, correct
answer) or undesirable (the rejected one); duplicates are dropped, so nothing pairs them up
again. Runs, all from the same SFT model against it as the reference, same steps:
  - DPO on the pairs;
  - KTO balanced: every desirable and undesirable completion;
  - KTO 1:4: desirable completions subsampled to a quarter of the undesirable ones, with the
    default weights (1, 1), and with desirable_weight = 4 so that
    w_D n_D / (w_U n_U) = 1 (the KTO paper recommends keeping it in [1, 4/3]).
"""

from __future__ import annotations

import random

from prefalign.experiments import common
from prefalign.metrics import write_jsonl


def unpaired_rows(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(desirable rows, undesirable rows), each (prompt, completion) once."""
    good, bad, seen = [], [], set()
    for p in pairs:
        for text, label, dest in ((p["chosen"], True, good), (p["rejected"], False, bad)):
            if (p["prompt"], text) not in seen:
                seen.add((p["prompt"], text))
                dest.append({"prompt": p["prompt"], "completion": text, "label": label})
    return good, bad


def interleave(good: list[dict], bad: list[dict], seed: int) -> list[dict]:
    rows = good + bad
    random.Random(seed).shuffle(rows)
    return rows


def run(ctx: common.Context) -> common.Result:
    start = common.demo_start(ctx)
    s = ctx.settings
    good, bad = unpaired_rows(start.pairs)
    rng = random.Random(f"kto-unbalanced-{s.seed}")
    few_good = rng.sample(good, max(1, min(len(good), len(bad) // 4)))
    kb = min(2 * s.dpo_batch, len(few_good) + len(bad))  # completions per KTO step (quick runs have few rows)
    variants = [
        ("DPO (pairs)", start.train_file, dict(loss="dpo"), len(start.pairs), "pairs"),
        ("KTO balanced", write_jsonl(ctx.path("data", "kto_balanced.jsonl"), interleave(good, bad, s.seed)),
         dict(loss="kto", batch_size=kb), f"{len(good)}:{len(bad)}", "unpaired"),
        ("KTO 1:4, weights 1/1", write_jsonl(ctx.path("data", "kto_1to4.jsonl"), interleave(few_good, bad, s.seed)),
         dict(loss="kto", batch_size=kb), f"{len(few_good)}:{len(bad)}", "unpaired"),
        ("KTO 1:4, desirable_weight 4", ctx.path("data", "kto_1to4.jsonl"),
         dict(loss="kto", batch_size=kb, desirable_weight=4.0), f"{len(few_good)}:{len(bad)}", "unpaired"),
    ]
    rows = [{"run": "SFT (reference)", "data (good:bad)": "-", **common.evaluate(ctx, start, start.sft)}]
    hists = {}
    for i, (name, data, kw, counts, _kind) in enumerate(variants):
        ctx.say(f"{name}: {s.dpo_steps} steps")
        with ctx.timer(kw["loss"]):
            res = common.dpo(ctx.path(f"run-{i}"), start.sft, start.tok, data, "", s, save_model=False, **kw)
        hists[name] = res.history
        rows.append({"run": name, "data (good:bad)": counts, **common.evaluate(ctx, start, res.policy)})
    cols = ["run", "data (good:bad)", "score (greedy)", "score (sampled)", "pref. accuracy (held-out)",
            "KL (sampled)", "length (tokens)"]
    fig = common.plot(ctx.path("plots", "kto_vs_dpo.png"), [
        {"series": {n: common.series(h, "logps/chosen") for n, h in hists.items()},
         "ylabel": "summed log-prob of desirable / chosen", "title": "good completions"},
        {"series": {n: common.series(h, "logps/rejected") for n, h in hists.items()},
         "ylabel": "summed log-prob of undesirable / rejected", "title": "bad completions"},
    ])
    sft, dpo, kto_b, kto_u1, kto_uw = rows
    g = "score (greedy)"
    aligned = kto_b[g] > sft[g] + 0.02
    close = kto_b[g] >= dpo[g] - 0.05
    weight_helps = kto_uw[g] >= kto_u1[g] - 0.01
    verdict = (f"{'Matches' if aligned else 'Does NOT match'} the claim: KTO without pairs moved the held-out "
               f"greedy score {sft[g]:.3f} -> {kto_b[g]:.3f} (DPO on the pairs: {dpo[g]:.3f}; "
               f"{'comparable' if close else 'behind DPO'}). Unbalanced 1:4: {kto_u1[g]:.3f} with weights 1/1, "
               f"{kto_uw[g]:.3f} with desirable_weight 4 "
               f"({'the reweighting recovers some or all of it' if weight_helps else 'reweighting did not help here'}).")
    return common.Result(
        title="kto-unpaired: KTO on unpaired labels vs DPO on pairs", rows=rows, columns=cols, figures=[fig],
        verdict=verdict,
        claim="KTO aligns a model from unpaired thumbs-up/down labels, without constructing pairs.",
        notes=[f"From {len(start.pairs)} on-policy pairs: {len(good)} distinct desirable and {len(bad)} distinct "
               f"undesirable completions. Every run: {s.dpo_steps} steps, lr {s.dpo_lr}, beta {s.beta}; DPO "
               f"batches {s.dpo_batch} pairs, KTO {kb} single completions (the same number of "
               f"completions per step). KTO's reference point z is the KL estimate on the step's mismatched pairs."],
        extra={"good": len(good), "bad": len(bad), "few_good": len(few_good)},
    )
