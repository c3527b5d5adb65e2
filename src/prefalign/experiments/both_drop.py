"""both-drop: overtrain DPO and watch the absolute log-probs and the generations.

DPO's loss sees only the margin h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)],
so it can widen h by pushing the rejected response down faster than the chosen one, with BOTH
falling. We overtrain on purpose (few pairs, many epochs, a small beta), log the summed chosen and
rejected log-probs each step (logps/chosen, logps/rejected), mark the step the trainer's both-drop
alarm fires (on a fixed sample of the training pairs, the chosen per-token log-prob fell more than
`both_drop_threshold` nats and its noise below step 0's while the margin grew), and evaluate
checkpoints along the way: held-out verifier score and degenerate answers (malformed: not a
well-formed number; run-on: no end-of-sequence within the token limit).
"""

from __future__ import annotations

import copy
import os

from safetensors.torch import load_file

from prefalign import checkpoint, monitor
from prefalign.config import TrainConfig
from prefalign.experiments import common
from prefalign.metrics import write_jsonl

BETA = 0.01
LR = 2e-4     # slower than the demo's DPO lr, so the rise before the fall is visible
LR_QUICK = 1e-3  # the quick run has fewer steps to get there
STEPS_QUICK, EVERY_QUICK = 240, 48  # quick: long enough for the fall to stand out of the per-pair noise
N_PAIRS = 128


def load_checkpoint_policy(sft_model, path: str):
    """The SFT model with a checkpoint's trained weights loaded (full fine-tuning checkpoints)."""
    model = copy.deepcopy(sft_model)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(path, "weights.safetensors")), strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {path} has weights this model lacks: {unexpected[:3]}")
    return model.eval()


def run(ctx: common.Context) -> common.Result:
    start = common.demo_start(ctx)
    s = ctx.settings
    n_pairs = min(len(start.pairs), N_PAIRS if not ctx.quick else 64)
    batch = min(s.dpo_batch, n_pairs)
    steps = 360 if not ctx.quick else STEPS_QUICK
    every = 30 if not ctx.quick else EVERY_QUICK
    lr = LR if not ctx.quick else LR_QUICK
    pairs_file = write_jsonl(ctx.path("data", "pairs_subset.jsonl"), start.pairs[:n_pairs])
    ctx.say(f"overtraining DPO: beta {BETA}, lr {lr}, {n_pairs} pairs, {steps} steps of {batch} "
            f"({steps * batch / n_pairs:.0f} epochs), checkpoints every {every} steps")
    with ctx.timer("dpo"):
        res = common.dpo(ctx.path("dpo"), start.sft, start.tok, pairs_file, start.eval_file, s, beta=BETA, lr=lr,
                           max_steps=steps, batch_size=batch, save_every=every, keep_checkpoints=steps // every + 1,
                           save_model=False, monitor_every=every // 3, monitor_pairs=n_pairs,
                           # the alarm watches the pairs being fitted (a seeded sample of them): that is where
                           # DPO pushes both responses down; held-out quality is measured below
                           eval_data="")
    hist = res.history
    fired = next((r["step"] for r in hist if r.get("alarm/both_drop")), None)
    by_step = {r["step"]: r for r in hist}
    evals = {0: common.evaluate(ctx, start, start.sft, degenerate=True)}
    for path in checkpoint.list_checkpoints(ctx.path("dpo", "checkpoints")):
        step = int(os.path.basename(path).split("-")[1])
        evals[step] = common.evaluate(ctx, start, load_checkpoint_policy(start.sft, path), degenerate=True)
    first = hist[0]
    rows = []
    for step, ev in sorted(evals.items()):
        r = by_step.get(step, first if step == 0 else {})
        rows.append({"step": step, "epochs": step * batch / n_pairs,
                     "logp chosen": first["logps/chosen"] if step == 0 else r.get("logps/chosen"),
                     "logp rejected": first["logps/rejected"] if step == 0 else r.get("logps/rejected"),
                     "margin h": 0.0 if step == 0 else r.get("rewards/margins", 0.0) / BETA,
                     "alarm": "FIRED" if fired and step >= fired and (step - every < fired) else "",
                     **{k: ev[k] for k in ("score (greedy)", "score (sampled)", "malformed", "run-on",
                                           "KL (sampled)", "pref. accuracy (held-out)")}})
    # step 0 log-probs: the first logged step is after one update; close enough for the table's first row
    steps_e = [r["step"] for r in rows]
    vl = {"both-drop alarm": fired} if fired else {}
    fig = common.plot(ctx.path("plots", "both_drop.png"), [
        {"series": {"chosen": common.series(hist, "logps/chosen"), "rejected": common.series(hist, "logps/rejected")},
         "ylabel": "summed log-prob (training batch)", "title": f"absolute log-probs, DPO beta {BETA}", "vlines": vl},
        {"series": {"score (greedy)": (steps_e, [r["score (greedy)"] for r in rows]),
                    "score (sampled)": (steps_e, [r["score (sampled)"] for r in rows]),
                    "malformed": (steps_e, [r["malformed"] for r in rows]),
                    "run-on": (steps_e, [r["run-on"] for r in rows])},
         "ylabel": "held-out fraction", "title": "generation quality at checkpoints", "vlines": vl, "style": "-o"},
    ])
    verdict = _verdict(rows, fired)
    return common.Result(
        title="both-drop: overtrained DPO, absolute log-probs and generation quality", rows=rows,
        figures=[fig], verdict=verdict,
        claim="DPO can make BOTH chosen and rejected less likely (only the gap matters), which can degrade "
              "generation quality; monitor the absolute log-probs.",
        notes=[f"{n_pairs} on-policy pairs, {steps} steps of {batch} pairs ({steps * batch / n_pairs:.0f} epochs), "
               f"beta {BETA}, lr {lr} constant; checkpoints every {every} steps evaluated on "
               f"{len(start.splits.heldout)} held-out problems. logp columns: the training batch's mean summed "
               f"log-prob at that step (row 0 shows step 1). The alarm (monitor.both_drop) scores a fixed "
               f"seeded sample of {min(n_pairs, TrainConfig().monitor_pairs)} training pairs every {every // 3} "
               f"steps and fires once, when their chosen log-prob/token fell more than "
               f"max({TrainConfig().both_drop_threshold}, {monitor.Z:g} standard errors) nats below step 0's "
               f"while their margin grew beyond its noise."],
        extra={"alarm_step": fired, "n_pairs": n_pairs, "steps": steps},
    )


def _verdict(rows: list[dict], fired: int | None) -> str:
    """Did both log-probs fall, the alarm fire and held-out quality drop from its peak?"""
    peak = max(rows, key=lambda r: r["score (greedy)"])
    last = rows[-1]
    chosen_fell = last["logp chosen"] is not None and last["logp chosen"] < rows[0]["logp chosen"]
    rejected_fell = last["logp rejected"] is not None and last["logp rejected"] < rows[0]["logp rejected"]
    worse = last["score (greedy)"] < peak["score (greedy)"] - 0.02 or last["malformed"] > rows[0]["malformed"] + 0.02
    parts = [f"chosen log-prob {rows[0]['logp chosen']:.2f} -> {last['logp chosen']:.2f}, rejected "
             f"{rows[0]['logp rejected']:.2f} -> {last['logp rejected']:.2f}",
             f"alarm at step {fired}" if fired else "the alarm never fired",
             f"greedy score peaked at {peak['score (greedy)']:.3f} (step {peak['step']}) and ended at "
             f"{last['score (greedy)']:.3f}, malformed answers {rows[0]['malformed']:.3f} -> {last['malformed']:.3f}"]
    if chosen_fell and rejected_fell and fired and worse:
        return "Matches the claim: both log-probs fell, the alarm fired, and quality dropped from its peak (" \
            + "; ".join(parts) + ")."
    if chosen_fell and rejected_fell:
        return ("Partly: both log-probs fell" + ("" if worse else ", but held-out quality did not drop in this run")
                + " (" + "; ".join(parts) + ").")
    return "Does NOT match: the chosen log-prob did not fall (" + "; ".join(parts) + ")."
