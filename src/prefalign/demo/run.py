"""`prefalign demo`: the whole DPO story on a built-in task, on a laptop CPU, no downloads.

1. A tiny Llama and a character tokenizer are built in-process.
2. SFT on a careless teacher's addition demonstrations (it mostly forgets the carry).
3. The SFT model is sampled on training prompts; a verifier labels each sample, and
   (correct, wrong) samples of the same prompt become preference pairs: on-policy data.
4. DPO trains a copy of the SFT model on those pairs against the frozen SFT model.
5. Held-out before/after: verifier score, implicit-reward accuracy, KL, length.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

from prefalign import report
from prefalign.errors import UserError
from prefalign.demo import pipeline, task
from prefalign.metrics import write_jsonl

# The held-out table's rows (prefalign.evaluation.generation_metrics' keys -> the report's words).
LABELS = {"score": "verifier score (greedy)", "score_sampled": "verifier score (sampled)",
          "length": "mean length (tokens)", "kl": "KL to reference (sampled)"}


def run_demo(output: str = "runs/demo", quick: bool = False, seed: int = 0,
             settings: pipeline.DemoSettings | None = None) -> dict:
    settings = settings or (pipeline.DemoSettings.quick(seed) if quick else pipeline.DemoSettings(seed=seed))
    torch.set_num_threads(settings.threads)
    t_start = time.time()
    timer = pipeline.Timer()
    say = print if settings.progress or not quick else (lambda *a: None)
    os.makedirs(output, exist_ok=True)

    say(f"[1/4] SFT: a tiny Llama learns 2-digit addition from a careless teacher "
        f"({task.expected_noise(task.make_splits(settings.seed, settings.n_heldout, settings.max_operand).train, settings.carry_slip, settings.random_noise):.0%} "
        f"of its answers are wrong, mostly a forgotten carry)")
    with timer("sft"):
        sft_model, tok, splits = pipeline.sft_start(output, settings)

    say(f"[2/4] sampling {settings.samples} answers for {settings.dpo_prompts} training prompts; the verifier "
        f"labels them; (correct, wrong) answers to one prompt make a pair")
    with timer("sampling"):
        prompts = task.sample_problems(splits.train, settings.dpo_prompts, seed=settings.seed)
        pairs = pipeline.sample_pairs(sft_model, tok, prompts, settings, seed=settings.seed)
        eval_pairs = pipeline.sample_pairs(sft_model, tok, splits.heldout, settings, seed=settings.seed + 7)
    if len(pairs) < settings.dpo_batch:
        raise UserError(f"the SFT model's samples gave only {len(pairs)} (correct, wrong) pairs, fewer than one "
                        f"batch of {settings.dpo_batch}; sample more prompts or train SFT longer")
    train_file = write_jsonl(os.path.join(output, "data", "pairs.jsonl"), pairs)
    # No held-out pair (a model that is always right or always wrong) leaves the accuracy undefined.
    eval_file = write_jsonl(os.path.join(output, "data", "heldout_pairs.jsonl"), eval_pairs) if eval_pairs else ""
    say(f"      {len(pairs)} training pairs, {len(eval_pairs)} held-out pairs -> {os.path.dirname(train_file)}")

    say(f"[3/4] DPO (beta {settings.beta}, {settings.dpo_steps} steps of {settings.dpo_batch} pairs) against the "
        f"frozen SFT model")
    with timer("dpo"):
        result = pipeline.dpo(os.path.join(output, "dpo"), sft_model, tok, train_file, eval_file, settings)

    say("[4/4] held-out evaluation")
    with timer("evaluation"):
        before, after = (pipeline.heldout_metrics(m, tok, splits.heldout, settings, reference_model=sft_model)
                         for m in (sft_model, result.policy))
    before, after = ({LABELS[k]: v for k, v in ev.items()} for ev in (before, after))
    before["implicit-reward accuracy (held-out pairs)"] = "-"  # policy == reference: every reward is 0
    after["implicit-reward accuracy (held-out pairs)"] = result.final_eval.get("rewards/accuracies", float("nan"))
    wall = time.time() - t_start
    rows = [{"metric": k, "SFT (reference)": before[k], "after DPO": after[k]} for k in before]
    summary = {"before": before, "after": after, "pairs": len(pairs), "heldout_pairs": len(eval_pairs),
               "heldout_problems": len(splits.heldout), "stage_seconds": timer.stages, "wall_seconds": wall,
               "settings": settings.__dict__}
    _write_report(output, rows, summary)
    report.print_table(rows, title=f"prefalign demo: held-out ({len(splits.heldout)} problems), {wall:.0f}s")
    say(f"report: {os.path.join(output, 'report.md')}  (plots in {os.path.join(output, 'plots')})")
    return summary


def _write_report(output: str, rows: list[dict], summary: dict) -> None:
    plots = os.path.join(output, "plots")
    os.makedirs(plots, exist_ok=True)
    for stage in ("sft", "dpo"):
        src = os.path.join(output, stage, "plots")
        for name in os.listdir(src) if os.path.isdir(src) else []:
            shutil.copy(os.path.join(src, name), os.path.join(plots, f"{stage}_{name}"))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items())
    text = [
        "# prefalign demo",
        "",
        f"Held-out: {summary['heldout_problems']} addition problems never seen in training; "
        f"{summary['pairs']} on-policy training pairs. Wall time {summary['wall_seconds']:.0f}s ({stages}).",
        "",
        report.markdown_table(rows),
        "",
        "Plots: " + ", ".join(sorted(os.listdir(plots))),
    ]
    with open(os.path.join(output, "report.md"), "w") as fh:
        fh.write("\n".join(text) + "\n")
    with open(os.path.join(output, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
