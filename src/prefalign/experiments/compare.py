"""`prefalign compare`: the same SFT model aligned four ways, side by side.

    (a) offline DPO   pairs sampled ONCE from the SFT model, labelled by the reward, then DPO
    (b) iterative DPO the same sampling and DPO budget split into rounds, each round sampling
                      from the current policy (online.iterative)
    (c) GRPO          group sampling from the current policy at every step, the reward as the
                      signal (online.grpo)
    (d) RLHF          the pipeline DPO replaces: a Bradley-Terry reward model trained on (a)'s
                      pairs (this seed's OUTPUT/seed-S/dpo/round-1/pairs.jsonl), then PPO from
                      the SFT model against it (experiments.rlhf, online.ppo)

Offline DPO is iterative DPO with one round, so (a) and (b) share every line of code and
differ only in how often they go back to the policy for fresh samples. Budgets are matched:
(b) samples as many completions in total as (a) and takes as many DPO steps in total.

Measured for each method (and for the SFT model itself):
  - held-out score: the reward (the demo's verifier by default) of greedy completions on
    held-out prompts the methods never trained on; also at temperature 1;
  - KL(policy || SFT) on the policy's own samples, and the mean completion length;
  - stability: the spread (std) of the training loss and of the training-time reward over the
    second half of training, and, with --seeds > 1, the spread of the held-out score over seeds;
  - models in memory: the distinct model objects alive at the method's first training step,
    counted (experiments.census); the harness holds none meanwhile (it reloads the SFT model for
    the evaluation);
  - wall-clock split into reward-model training, generation (sampling + scoring) and training
    (forward/backward), and the number of sampling passes (generation in the loop or not);
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


def start_seed(s: CompareSettings, seed: int) -> int:
    """The seed of the SFT model (and held-out prompts) that run `seed` starts from: 0 with --same-start."""
    return 0 if s.same_start else seed


def sft_dir(s: CompareSettings, seed: int) -> str:
    """Where the demo's SFT model for `seed` is: --sft-from's (checked, never retrained) or compare's own cache."""
    seed = start_seed(s, seed)
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
    seed = start_seed(s, seed)
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


def load_task(s: CompareSettings, seed: int, model_only: bool = False):
    """(SFT model, tokenizer, train PromptSet, held-out PromptSet, reward, max_new_tokens); model_only: the model."""
    if s.demo:
        from transformers import AutoModelForCausalLM

        from prefalign.demo import task
        from prefalign.demo.tokenizer import build_tokenizer

        # The model prepare_sft wrote or found (loaded, never retrained: every method starts from the same weights).
        d = _demo_settings(s, start_seed(s, seed))
        model = AutoModelForCausalLM.from_pretrained(os.path.join(sft_dir(s, seed), "model"))
        if model_only:
            return model
        tok, splits = build_tokenizer(), task.make_splits(seed=d.seed, n_heldout=d.n_heldout, max_operand=d.max_operand)
        rows = lambda problems: [{"prompt": p.prompt, "answer": p.answer} for p in problems]  # noqa: E731
        train = load_prompts(rows(splits.train), tok, 16)
        heldout = load_prompts(rows(splits.heldout[:s.heldout]), tok, 16)
        return model, tok, train, heldout, make_reward(s.reward or DEMO_REWARD), s.max_new_tokens
    from prefalign import models

    model = models.load_model(s.model)
    if model_only:
        return model
    tok = models.load_tokenizer(s.model)
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


def _online_times(history: list[dict], train_keys=("time/training",)) -> tuple[float, float]:
    """(generation + scoring s, training s) summed over an online run's steps."""
    gen = sum(r["time/generation"] + r["time/scoring"] for r in history)
    return gen, sum(r[k] for r in history for k in train_keys)


def _train_iterative(method, s, seed, model, tok, train_set, reward, common, census) -> tuple:
    rounds = 1 if method == "dpo" else s.rounds
    cfg = IterativeConfig(rounds=rounds, prompts_per_round=s.sample_prompts // rounds, samples=s.samples,
                          min_gap=s.min_gap, pairs_per_prompt=s.pairs_per_prompt, ref_update=s.ref_update,
                          beta=s.beta, lr=s.dpo_lr, dpo_steps=s.dpo_steps // rounds, batch_size=s.dpo_batch,
                          train_overrides={"lr_schedule": "constant"}, **common)
    with census:
        res = iterate(cfg, model=model, tokenizer=tok, prompts=train_set, reward=reward)
    curve = [{"step": r["step"], "loss": r["loss"]} for r in res.train_history]
    for r in res.history:  # the reward of each round's samples, placed at the round's first DPO step
        first = next((t["step"] for t in res.train_history if t["round"] == r["round"]), r["step"])
        curve.append({"step": first, "reward": r["reward/mean"]})
    gen_s = sum(r["time/generation"] + r["time/scoring"] for r in res.history)
    return res.policy, {"curve": curve, "generation_s": gen_s, "gen_batches": rounds,
                        "training_s": sum(r["time/training"] for r in res.history)}


def _train_grpo(method, s, seed, model, tok, train_set, reward, common, census) -> tuple:
    cfg = GRPOConfig(steps=s.grpo_steps, prompts_per_step=s.grpo_prompts, group_size=s.samples, lr=s.grpo_lr,
                     kl_coef=s.grpo_kl_coef, mu=s.grpo_mu, scale=s.grpo_scale, aggregation=s.grpo_aggregation, **common)
    with census:
        res = grpo(cfg, model=model, tokenizer=tok, prompts=train_set, reward=reward)
    gen_s, train_s = _online_times(res.history)
    curve = [{"step": r["step"], "loss": r["loss"], "reward": r["reward/mean"]} for r in res.history]
    return res.policy, {"curve": curve, "generation_s": gen_s, "training_s": train_s, "gen_batches": len(res.history)}


def _train_ppo(method, s, seed, model, tok, train_set, reward, common, census) -> tuple:
    """The RLHF row: a reward model on offline DPO's pairs (this seed's OUTPUT/seed-S/dpo), then PPO.
    The task's reward rides along with weight 0, so the curve shows the true reward of PPO's samples."""
    from prefalign.experiments import rlhf

    pairs = os.path.join(s.output, f"seed-{seed}", "dpo", "round-1", "pairs.jsonl")
    if not os.path.isfile(pairs):
        raise UserError(f"compare: {pairs} is missing: the RLHF row trains its reward model on offline DPO's pairs")
    budget = rlhf.RLHFBudget(rm_steps=s.rm_steps, rm_batch=s.rm_batch, rm_lr=s.rm_lr, ppo_steps=s.ppo_steps,
                             ppo_prompts=s.ppo_prompts, ppo_mini_batch=max(1, s.ppo_prompts // 2), ppo_lr=s.ppo_lr,
                             value_lr=s.ppo_lr)
    task = list(s.reward or [DEMO_REWARD])
    specs, weights, stats = task, [], {}
    if s.ppo_reward == "rm":
        # Nothing truncated: the reward model sees whole prompts and completions (+ EOS), as DPO does.
        n_prompt = common["max_prompt_length"]
        rm_spec, stats = rlhf.train_reward_model(os.path.join(common["output"], "rm"), model, tok, pairs, "", budget,
                                                 seed, max_length=n_prompt + common["max_new_tokens"] + 1,
                                                 max_prompt_length=n_prompt)
        specs, weights = [rm_spec, *task], [1.0] + [0.0] * len(task)
    cfg = rlhf.ppo_config(os.path.join(common["output"], "ppo"), budget, s.ppo_kl_coef, specs, seed,
                          common["max_new_tokens"], common["max_prompt_length"], s.temperature, weights)
    with census:
        res, gen_s, train_s = rlhf.run_ppo(cfg, model, tok, train_set)
    true = [f"rewards/{t}" for t in task] if s.ppo_reward == "rm" else ["reward/mean"]
    curve = [{"step": r["step"], "loss": r["policy_loss"], "reward": sum(r[k] for k in true),
              "rm": r["reward/mean"]} for r in res.history]
    return res.policy, {"curve": curve, "generation_s": gen_s, "training_s": train_s, "gen_batches": len(res.history),
                        **stats}


TRAINERS = {"dpo": _train_iterative, "iterative": _train_iterative, "grpo": _train_grpo, "ppo": _train_ppo}


def run_method(method: str, seed: int, settings: dict) -> dict:
    """Align the SFT model with `method`; returns its evaluation, curves, times, memory and the models
    resident at its first training step (experiments.census: the harness holds no model meanwhile)."""
    from prefalign.experiments.census import ModelCensus

    s = CompareSettings(**settings)
    if s.threads:
        torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    model, tok, train_set, heldout, reward, max_new = load_task(s, seed)
    base_mb = peak_memory_mb()
    out = {"curve": [], "generation_s": 0.0, "training_s": 0.0, "rm_s": 0.0, "gen_batches": 0}
    census = ModelCensus()
    policy = model
    if method != "sft":
        common = dict(output=os.path.join(s.output, f"seed-{seed}", method), max_new_tokens=max_new,
                      max_prompt_length=max(len(i) for i in train_set.ids), temperature=s.temperature, seed=seed,
                      progress=False, save_model=False, overwrite=True)
        policy, part = TRAINERS[method](method, s, seed, model, tok, train_set, reward, common, census)
        out.update(part)
    del model  # trained in place: the SFT model is read again for the KL
    t_eval = time.perf_counter()
    sft = policy if method == "sft" else load_task(s, seed, model_only=True)
    ev = evaluate(policy, tok, heldout, reward, sft, max_new, seed)
    return {"method": method, "seed": seed, **ev, **out, "models": census.count, "model_names": census.models,
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
        mean = lambda k: statistics.fmean(r.get(k, 0.0) for r in rs)  # noqa: E731
        counts = sorted({r["models"] for r in rs if r["models"] is not None})  # None: it never trained
        row = {"method": LABELS[method], "models": "/".join(map(str, counts)) or "-",
               "score": mean("score"), "score T=1": mean("score_sampled"), "KL": mean("kl"), "length": mean("length")}
        if seeds > 1:
            row["score sd (seeds)"] = _spread([r["score"] for r in rs])
        row["loss sd"] = statistics.fmean(_spread(_second_half(r["curve"], "loss")) for r in rs) \
            if method != "sft" else float("nan")
        row["reward sd"] = statistics.fmean(_spread(_second_half(r["curve"], "reward")) for r in rs) \
            if method in ("iterative", "grpo", "ppo") else float("nan")
        row.update({"gen batches": round(mean("gen_batches")), "RM s": mean("rm_s"), "gen s": mean("generation_s"),
                    "train s": mean("training_s"), "wall s": mean("process_s"),
                    "peak MB": max(r["peak_mb"] for r in rs), "base MB": max(r["base_mb"] for r in rs)})
        rows.append(row)
    return rows


# The DPO chapter's comparison table (section 24.6): models in memory, stability, generation in the loop.
CHAPTER = {"dpo": ("2", "high", "no"), "ppo": ("4", "low", "yes"), "grpo": ("3", "medium", "yes")}


def chapter_rows(rows: list[dict]) -> list[dict]:
    """The chapter's claims beside what this run measured, for the methods its table has."""
    out = []
    for method, (models, stability, gen) in CHAPTER.items():
        row = next((r for r in rows if r["method"] == LABELS[method]), None)
        if row is None:
            continue
        sd, batches = row.get("score sd (seeds)", float("nan")), row["gen batches"]
        out.append({"method": row["method"], "models: chapter": models, "models: measured": row["models"],
                    "generation in the loop: chapter": gen,
                    "measured (generation batches)": f"{'yes' if batches > 1 else 'no'} ({batches})",
                    "stability: chapter": stability, "score sd (seeds)": sd, "reward sd (training)": row["reward sd"],
                    "score": row["score"], "score T=1": row["score T=1"], "KL": row["KL"], "peak MB": row["peak MB"],
                    "RM s": row["RM s"], "gen s": row["gen s"], "train s": row["train s"]})
    return out


def _notes(s: CompareSettings, runs: list[dict], wall: float, split: str) -> str:
    rm = next((r for r in runs if r["method"] == "ppo" and "rm_accuracy" in r), None)
    rm_line = (f"- RLHF: a reward model ({s.rm_steps} steps of {s.rm_batch} of offline DPO's pairs; pairwise accuracy "
               f"{rm['rm_accuracy']:.3f} on its {rm['rm_accuracy_on']}), then PPO ({s.ppo_steps} steps of "
               f"{s.ppo_prompts} prompts, kl_coef {s.ppo_kl_coef}); its reward sd is the task reward of PPO's "
               f"samples (logged at weight 0), not the reward model's\n" if rm else "")
    return (f"{s.seeds} seed(s){' from one SFT model (--same-start)' if s.same_start else ''}; total wall "
            f"{wall:.0f}s = {split}.\n\n"
            f"- models: distinct model objects resident at the method's first training step (experiments.census)\n"
            f"- score: mean reward of greedy completions on {runs[0]['n_heldout']} held-out prompts "
            f"(score T=1: one sample each at temperature 1)\n"
            f"- KL: KL(policy || SFT) on the policy's own samples (nats per completion); length: tokens\n"
            f"- loss sd, reward sd: std over the second half of training steps of the training loss and of the "
            f"reward of the training samples (GRPO, PPO: per step; iterative DPO: per round), mean over seeds"
            f"{'; score sd (seeds): std of the held-out score over seeds' if s.seeds > 1 else ''}\n"
            f"- gen batches: sampling passes during the method (offline DPO: 1, before training); RM s: reward-model "
            f"training; gen s: sampling + scoring; train s: updates (PPO: its rollout forward passes too); wall s: "
            f"the method's whole run (process start, loading, training, held-out evaluation; means over seeds)\n"
            + rm_line +
            f"- peak MB: peak RSS of the fresh process that ran the method ({'isolated' if s.isolate else 'NOT isolated: shared process, peaks are cumulative'}); "
            f"base MB: its RSS after imports and loading the SFT model; peak - base is the method's own")


def compare(s: CompareSettings) -> dict:
    """Run every method for every seed; write OUTPUT/report.md, results.json and plots; print the tables."""
    from prefalign import report

    s.validate()
    s = s.resolved()  # the demo's numbers from DemoSettings, a user task's from USER_DEFAULTS
    os.makedirs(s.output, exist_ok=True)
    t0 = time.perf_counter()
    # once per start, before the methods (cached on disk)
    sft = [prepare_sft(s, seed) for seed in sorted({start_seed(s, k) for k in range(s.seeds)})]
    sft_s = [t for t, _ in sft]
    methods = [m for m in METHODS if m == "sft" or m in s.methods]  # dpo before ppo: its pairs
    runs = []
    for seed in range(s.seeds):
        for method in methods:
            if not s.quick:
                print(f"[seed {seed}] {LABELS[method]} ...", flush=True)
            runs.append(_run(method, seed, s))
    wall = time.perf_counter() - t0
    rows, plots = summarize(runs, s.seeds), _plots(s.output, runs)
    chapter = chapter_rows(rows)
    split = " + ".join([f"SFT model {sum(sft_s):.0f}s ({', '.join(sorted({how for _, how in sft}))})"]
                       + [f"{'SFT evaluation' if m == 'sft' else LABELS[m]} "
                          f"{sum(r['process_s'] for r in runs if r['method'] == m):.0f}s" for m in methods])
    with open(os.path.join(s.output, "report.md"), "w") as fh:
        fh.write(f"# prefalign compare\n\n{report.markdown_table(rows)}\n\n{_notes(s, runs, wall, split)}\n\n")
        if chapter:
            fh.write(f"## The chapter's table, measured\n\n{report.markdown_table(chapter)}\n\n")
        fh.writelines(f"![{os.path.basename(p)}](plots/{os.path.basename(p)})\n" for p in plots)
    with open(os.path.join(s.output, "results.json"), "w") as fh:
        json.dump({"settings": dataclasses.asdict(s), "rows": rows, "chapter": chapter, "runs": runs, "wall_s": wall,
                   "sft_s": sft_s, "sft": [how for _, how in sft], "wall_split": split}, fh, indent=1, default=str)
    report.print_table(rows, list(rows[0]), title=f"prefalign compare ({wall:.0f}s)")
    if chapter:
        report.print_table(chapter, list(chapter[0]), title="the chapter's table (section 24.6), measured")
    print(f"wall: {split}")
    print(f"report: {os.path.join(s.output, 'report.md')}")
    return {"rows": rows, "chapter": chapter, "runs": runs, "wall_s": wall}


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
