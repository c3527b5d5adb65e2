"""`prefalign compare`: the same SFT model aligned three ways, side by side.

    (a) offline DPO   pairs sampled ONCE from the SFT model, labelled by the reward, then DPO
    (b) iterative DPO the same sampling and DPO budget split into rounds, each round sampling
                      from the current policy (online.iterative)
    (c) GRPO          group sampling from the current policy at every step, the reward as the
                      signal (online.grpo)

Offline DPO is iterative DPO with one round, so (a) and (b) share every line of code and
differ only in how often they go back to the policy for fresh samples. Budgets are matched:
(b) samples as many completions in total as (a) and takes as many DPO steps in total.

Measured for each method (and for the SFT model itself):
  - held-out score: the reward (the demo's verifier by default) of greedy completions on
    held-out prompts the methods never trained on; also at temperature 1;
  - KL(policy || SFT) on the policy's own samples, and the mean completion length;
  - stability: the spread (std) of the training loss and of the training-time reward over the
    second half of training, and, with --seeds > 1, the spread of the held-out score over seeds;
  - wall-clock split into generation (sampling + scoring) and training (forward/backward);
  - peak memory: each (method, seed) runs in a fresh Python process (multiprocessing "spawn"),
    whose peak resident set size (getrusage ru_maxrss; the CUDA allocator peak on a GPU) is
    the method's peak. Imports and the SFT model are part of every process, so the table also
    gives the RSS right after loading them: peak - base is what the method itself added.

The demo task needs nothing: prefalign.demo's SFT model (trained once per seed, cached in
OUTPUT/seed-S/sft and reused while the settings match; --sft-from DIR reuses a `prefalign demo`
output's instead), and every number the demo also has (held-out size, sampling, DPO beta / lr /
steps, threads) is DemoSettings' unless a flag sets it. A user's task: --model (the SFT model), --prompts (a `prompt` column and
what the reward needs, e.g. `answer`), --reward (specs), held-out prompts from --eval-prompts
or the last --heldout rows of --prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from prefalign.errors import UserError
from prefalign.metrics import peak_memory_mb
from prefalign.online.common import PromptSet, load_prompts, make_reward
from prefalign.online.grpo import GRPOConfig, grpo
from prefalign.online.iterative import IterativeConfig, iterate
from prefalign.experiments.compare_settings import (  # the settings live apart: the CLI imports them without torch
    DEMO_REWARD, LABELS, METHODS, CompareSettings, _demo_settings,
)


# ----------------------------------------------------------------------------------------------
# The task: SFT model, prompts, reward


def sft_dir(s: CompareSettings, seed: int) -> str:
    """Where the demo's SFT model for `seed` is: --sft-from's (checked, never retrained) or compare's own cache."""
    if not s.sft_from:
        return os.path.join(s.output, f"seed-{seed}", "sft")
    from prefalign.demo.pipeline import sft_cache_key

    want = sft_cache_key(_demo_settings(s, seed))
    tried = []
    for d in (os.path.join(s.sft_from, f"seed-{seed}", "sft"), os.path.join(s.sft_from, "sft")):
        stamp = os.path.join(d, "demo_settings.json")
        if not (os.path.isfile(stamp) and os.path.isdir(os.path.join(d, "model"))):
            continue
        with open(stamp) as fh:
            have = json.load(fh)
        if have == want:
            return d
        diff = ", ".join(f"{k} {have.get(k, 'missing')!r} != {want.get(k, 'missing')!r}"
                         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
        tried.append(f"{d} ({diff})")
    if tried:
        raise UserError(f"--sft-from {s.sft_from}: its SFT model was trained with other settings than seed {seed}'s: "
                        f"{'; '.join(tried)}. Re-run `prefalign demo --output {s.sft_from}` or drop --sft-from")
    raise UserError(f"--sft-from {s.sft_from}: no SFT model for seed {seed} (looked for {s.sft_from}/sft/model and "
                    f"{s.sft_from}/seed-{seed}/sft/model with demo_settings.json)")


def prepare_sft(s: CompareSettings, seed: int) -> tuple[float, str]:
    """Train the demo's SFT model for `seed` or find it cached (same settings -> same cache, never retrained):
    (seconds spent, "trained" | "cached" | "--sft-from" | "your model")."""
    if not s.demo:
        return 0.0, "your model"
    t0 = time.perf_counter()
    if s.sft_from:
        sft_dir(s, seed)  # checked now: a mismatch fails before any method runs
        return time.perf_counter() - t0, "--sft-from"
    from prefalign.demo.pipeline import sft_cache_key, sft_start

    d = _demo_settings(s, seed)
    stamp = os.path.join(sft_dir(s, seed), "demo_settings.json")
    cached = os.path.isfile(stamp) and json.load(open(stamp)) == sft_cache_key(d)
    if not cached:
        if not s.quick:
            print(f"[seed {seed}] SFT (training; cached in {os.path.dirname(stamp)} for the next run) ...", flush=True)
        if s.threads:
            torch.set_num_threads(s.threads)
        sft_start(os.path.join(s.output, f"seed-{seed}"), d)
    return time.perf_counter() - t0, "cached" if cached else "trained"


def load_task(s: CompareSettings, seed: int):
    """(SFT model, tokenizer, train PromptSet, held-out PromptSet, reward, max_new_tokens)."""
    if s.demo:
        from transformers import AutoModelForCausalLM

        from prefalign.demo import task
        from prefalign.demo.tokenizer import build_tokenizer

        # The model prepare_sft wrote or found (loaded, never retrained: every method starts from the same weights).
        d = _demo_settings(s, seed)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(sft_dir(s, seed), "model"))
        tok, splits = build_tokenizer(), task.make_splits(seed=d.seed, n_heldout=d.n_heldout, max_operand=d.max_operand)
        rows = lambda problems: [{"prompt": p.prompt, "answer": p.answer} for p in problems]  # noqa: E731
        train = load_prompts(rows(splits.train), tok, 16)
        heldout = load_prompts(rows(splits.heldout[:s.heldout]), tok, 16)
        return model, tok, train, heldout, make_reward(s.reward or DEMO_REWARD), s.max_new_tokens
    from prefalign import models

    tok = models.load_tokenizer(s.model)
    model = models.load_model(s.model)
    train = load_prompts(s.prompts, tok)
    if s.eval_prompts:
        heldout = load_prompts(s.eval_prompts, tok)
    else:  # the last rows are held out and never trained on
        n = min(s.heldout, len(train) // 2)
        if n < 1:
            raise UserError(f"{s.prompts}: too few prompts to hold some out; give --eval-prompts")
        heldout = _slice(train, len(train) - n, len(train))
        train = _slice(train, 0, len(train) - n)
    return model, tok, train, heldout, make_reward(s.reward), s.max_new_tokens


def _slice(p: PromptSet, lo: int, hi: int) -> PromptSet:
    return PromptSet(p.ids[lo:hi], p.texts[lo:hi], {k: v[lo:hi] for k, v in p.extra.items()}, p.raw[lo:hi])


def evaluate(policy, tok, heldout: PromptSet, reward, sft_model, max_new_tokens: int, seed: int) -> dict:
    """evaluation.generation_metrics on the held-out prompts, scored by `reward`, KL to the SFT model."""
    from prefalign.evaluation import generation_metrics

    def score(texts):
        return reward.score(heldout.texts, texts, heldout.extra).total

    return generation_metrics(policy, tok, heldout.ids, score, max_new_tokens=max_new_tokens, seed=seed,
                              reference_model=sft_model)


# ----------------------------------------------------------------------------------------------
# One method, one seed (in its own process when isolated)


def run_method(method: str, seed: int, settings: dict) -> dict:
    """Align the SFT model with `method`; returns its evaluation, curves, times and memory."""
    s = CompareSettings(**settings)
    if s.threads:
        torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    sft, tok, train_set, heldout, reward, max_new = load_task(s, seed)
    base_mb = peak_memory_mb()
    out_dir = os.path.join(s.output, f"seed-{seed}", method)
    policy, curve, gen_s, train_s = sft, [], 0.0, 0.0
    common = dict(output=out_dir, max_new_tokens=max_new, max_prompt_length=max(len(i) for i in train_set.ids),
                  temperature=s.temperature, seed=seed, progress=False, save_model=False, overwrite=True)
    if method in ("dpo", "iterative"):
        rounds = 1 if method == "dpo" else s.rounds
        cfg = IterativeConfig(rounds=rounds, prompts_per_round=s.sample_prompts // rounds, samples=s.samples,
                              min_gap=s.min_gap, pairs_per_prompt=s.pairs_per_prompt, ref_update=s.reference,
                              beta=s.beta, lr=s.dpo_lr, dpo_steps=s.dpo_steps // rounds, batch_size=s.dpo_batch,
                              train_overrides={"lr_schedule": "constant"}, **common)
        res = iterate(cfg, model=copy.deepcopy(sft), tokenizer=tok, prompts=train_set, reward=reward)
        policy = res.policy
        curve = [{"step": r["step"], "loss": r["loss"]} for r in res.train_history]
        for r in res.history:  # the reward of each round's samples, placed at the round's first DPO step
            first = next((t["step"] for t in res.train_history if t["round"] == r["round"]), r["step"])
            curve.append({"step": first, "reward": r["reward/mean"]})
        gen_s = sum(r["time/generation"] + r["time/scoring"] for r in res.history)
        train_s = sum(r["time/training"] for r in res.history)
    elif method == "grpo":
        cfg = GRPOConfig(steps=s.grpo_steps, prompts_per_step=s.grpo_prompts, group_size=s.samples, lr=s.grpo_lr,
                         kl_coef=s.grpo_beta, mu=s.grpo_mu, scale=s.grpo_scale, aggregation=s.grpo_aggregation, **common)
        res = grpo(cfg, model=copy.deepcopy(sft), tokenizer=tok, prompts=train_set, reward=reward)
        policy = res.policy
        curve = [{"step": r["step"], "loss": r["loss"], "reward": r["reward/mean"]} for r in res.history]
        gen_s = sum(r["time/generation"] + r["time/scoring"] for r in res.history)
        train_s = sum(r["time/training"] for r in res.history)
    t_eval = time.perf_counter()
    ev = evaluate(policy, tok, heldout, reward, sft, max_new, seed)
    return {"method": method, "seed": seed, **ev, "curve": curve, "generation_s": gen_s, "training_s": train_s,
            "eval_s": time.perf_counter() - t_eval, "wall_s": time.perf_counter() - t_start,
            "peak_mb": peak_memory_mb(), "base_mb": base_mb, "n_heldout": len(heldout)}


def _run(method: str, seed: int, s: CompareSettings) -> dict:
    t0 = time.perf_counter()
    if not s.isolate:
        out = run_method(method, seed, dataclasses.asdict(s))
    else:
        # A fresh interpreter per run: its peak RSS belongs to this method alone.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out = pool.submit(run_method, method, seed, dataclasses.asdict(s)).result()
    out["process_s"] = time.perf_counter() - t0  # wall_s + starting the process and importing
    return out


# ----------------------------------------------------------------------------------------------
# The comparison


def _spread(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else float("nan")


def _second_half(curve: list[dict], key: str) -> list[float]:
    pts = [r[key] for r in curve if isinstance(r.get(key), (int, float))]
    return pts[len(pts) // 2:]


def summarize(runs: list[dict], seeds: int) -> list[dict]:
    """One table row per method: means over seeds, spreads over steps and seeds."""
    rows = []
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        mean = lambda k: statistics.fmean(r[k] for r in rs)  # noqa: E731
        row = {"method": LABELS[method], "score": mean("score"), "score T=1": mean("score_sampled"),
               "KL": mean("kl"), "length": mean("length")}
        if seeds > 1:
            row["score sd (seeds)"] = _spread([r["score"] for r in rs])
        row["loss sd"] = statistics.fmean(_spread(_second_half(r["curve"], "loss")) for r in rs) \
            if method != "sft" else float("nan")
        row["reward sd"] = statistics.fmean(_spread(_second_half(r["curve"], "reward")) for r in rs) \
            if method in ("iterative", "grpo") else float("nan")
        row.update({"gen s": mean("generation_s"), "train s": mean("training_s"), "wall s": mean("process_s"),
                    "peak MB": max(r["peak_mb"] for r in rs), "base MB": max(r["base_mb"] for r in rs)})
        rows.append(row)
    return rows


def compare(s: CompareSettings) -> dict:
    """Run every method for every seed; write OUTPUT/report.md, results.json and plots; print the table."""
    from prefalign import report

    s.validate()
    s = s.resolved()  # the demo's numbers from DemoSettings, a user task's from USER_DEFAULTS
    os.makedirs(s.output, exist_ok=True)
    t0 = time.perf_counter()
    sft = [prepare_sft(s, seed) for seed in range(s.seeds)]  # once, before the methods (cached on disk)
    sft_s = [t for t, _ in sft]
    runs = []
    for seed in range(s.seeds):
        for method in ["sft", *s.methods]:
            if not s.quick:
                print(f"[seed {seed}] {LABELS[method]} ...", flush=True)
            runs.append(_run(method, seed, s))
    wall = time.perf_counter() - t0
    rows = summarize(runs, s.seeds)
    columns = list(rows[0])
    plots = _plots(s.output, runs)
    split = " + ".join([f"SFT model {sum(sft_s):.0f}s ({', '.join(sorted({how for _, how in sft}))})"]
                       + [f"{'SFT evaluation' if m == 'sft' else LABELS[m]} "
                          f"{sum(r['process_s'] for r in runs if r['method'] == m):.0f}s"
                          for m in ["sft", *s.methods]])
    note = (f"{s.seeds} seed(s); total wall {wall:.0f}s = {split}.\n\n"
            f"- score: mean reward of greedy completions on {runs[0]['n_heldout']} held-out prompts "
            f"(score T=1: one sample each at temperature 1)\n"
            f"- KL: KL(policy || SFT) on the policy's own samples (nats per completion); length: tokens\n"
            f"- loss sd, reward sd: std over the second half of training steps of the training loss and of the "
            f"reward of the training samples (GRPO: per step; iterative DPO: per round), mean over seeds"
            f"{'; score sd (seeds): std of the held-out score over seeds' if s.seeds > 1 else ''}\n"
            f"- gen s: sampling + scoring; train s: DPO / GRPO updates; wall s: the method's whole run (process "
            f"start, loading, training, held-out evaluation; means over seeds)\n"
            f"- peak MB: peak RSS of the fresh process that ran the method ({'isolated' if s.isolate else 'NOT isolated: shared process, peaks are cumulative'}); "
            f"base MB: its RSS after imports and loading the SFT model; peak - base is the method's own")
    with open(os.path.join(s.output, "report.md"), "w") as fh:
        fh.write(f"# prefalign compare\n\n{report.markdown_table(rows, columns)}\n\n{note}\n\n")
        fh.writelines(f"![{os.path.basename(p)}](plots/{os.path.basename(p)})\n" for p in plots)
    with open(os.path.join(s.output, "results.json"), "w") as fh:
        json.dump({"settings": dataclasses.asdict(s), "rows": rows, "runs": runs, "wall_s": wall, "sft_s": sft_s,
                   "sft": [how for _, how in sft], "wall_split": split},
                  fh, indent=1, default=str)
    report.print_table(rows, columns, title=f"prefalign compare ({wall:.0f}s)")
    print(f"wall: {split}")
    print(f"report: {os.path.join(s.output, 'report.md')}")
    return {"rows": rows, "runs": runs, "wall_s": wall}


def _plots(output: str, runs: list[dict]) -> list[str]:
    """Training loss and training-time reward per step, one line per (method, seed)."""
    from prefalign.report import plot_series

    os.makedirs(os.path.join(output, "plots"), exist_ok=True)
    written = []
    for key in ("loss", "reward"):
        records, names = [], []
        for r in runs:
            name = f"{LABELS[r['method']]} s{r['seed']}"
            pts = [{"step": c["step"], name: c[key]} for c in r["curve"] if key in c]
            if pts:
                records += pts
                names.append(name)
        path = os.path.join(output, "plots", f"{key}.png")
        if names and plot_series(path, records, names, f"training {key} per step"):
            written.append(path)
    return written
