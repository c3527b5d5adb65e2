"""What every experiment shares: settings, the cached SFT start and pairs, evaluation, the report.

An experiment is a function ``run(ctx) -> Result`` in its own module (see ``cli.EXPERIMENTS``).
It gets a ``Context`` (output folder, quick mode, seed, the demo settings), builds on the demo
pipeline (``prefalign.demo.pipeline``: the SFT start, on-policy pairs, the held-out evaluation,
DPO through the real trainer) and returns the table rows, figures and notes that
``write_report`` turns into OUTPUT/report.md, OUTPUT/summary.json and a printed table.

The SFT start and the on-policy pairs are cached in a folder shared by the experiments (by
default ``runs/experiments/_start``, next to each experiment's own folder), keyed by the settings
that made them, so the first experiment pays for SFT and the others reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

from prefalign import evaluation, report
from prefalign.demo import pipeline, task
from prefalign.demo.pipeline import DemoSettings


@dataclass
class Context:
    name: str
    output: str
    quick: bool
    seed: int
    settings: DemoSettings
    cache: str                      # shared folder for the SFT start and the pairs
    command: str = ""
    options: dict = field(default_factory=dict)   # an experiment's own flags (frontier: ppo_reward)
    t0: float = field(default_factory=time.time)
    timer: pipeline.Timer = field(default_factory=pipeline.Timer)

    def say(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", file=sys.stderr, flush=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.output, *parts)


@dataclass
class Result:
    title: str
    rows: list[dict]
    columns: list[str] | None = None
    figures: list[str] = field(default_factory=list)   # paths under OUTPUT/plots
    notes: list[str] = field(default_factory=list)     # markdown paragraphs after the table
    extra: dict = field(default_factory=dict)          # anything else for summary.json
    claim: str = ""                                    # the published claim, one line
    verdict: str = ""                                  # did the run's direction match it


def make_context(name: str, output: str = "", quick: bool = False, seed: int = 0, cache: str = "",
                 command: str = "", options: dict | None = None) -> Context:
    settings = DemoSettings.quick(seed) if quick else DemoSettings(seed=seed)
    settings.progress = False
    output = output or os.path.join("runs", "experiments", name)
    cache = cache or os.path.join(os.path.dirname(os.path.abspath(output)), "_start")
    os.makedirs(os.path.join(output, "plots"), exist_ok=True)
    return Context(name, output, quick, seed, settings, cache, command or f"prefalign experiment {name}",
                   dict(options or {}))


# --------------------------------------------------------------------------- the shared start


@dataclass
class Start:
    sft: object                    # the SFT model: the start of every run and the reference
    tok: object
    splits: task.Splits
    train_file: str                # on-policy pairs (JSONL)
    eval_file: str                 # held-out pairs (JSONL)
    pairs: list[dict]
    eval_pairs: list[dict]
    topped_up: int = 0             # teacher pairs added because sampling gave too few (quick mode)


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def teacher_pairs(problems: list[task.Problem], seed: int) -> list[dict]:
    """Off-policy (correct, wrong) pairs from the task itself: a fallback when the SFT model's
    samples give too few pairs (a quick run's barely trained model). Wrong = the careless
    teacher's slip for the problem (forgotten carry, else off by one / digit swap)."""
    rng = random.Random(f"prefalign-experiments-teacher-{seed}")
    rows = []
    for p in problems:
        kind = "forgot_carry" if p.carries else rng.choice(("off_by_one", "digit_swap"))
        wrong = task.wrong_answer(p, kind, rng)
        rows.append({"prompt": p.prompt, "chosen": task.format_completion(p.answer),
                     "rejected": task.format_completion(wrong), "chosen_reward": 1.0, "rejected_reward": 0.0,
                     "answer": p.answer})
    return rows


def demo_start(ctx: Context, min_pairs: int | None = None) -> Start:
    """The SFT model and its on-policy pairs (train and held-out), cached in ctx.cache."""
    import fcntl

    s = ctx.settings
    min_pairs = min_pairs if min_pairs is not None else s.dpo_batch
    os.makedirs(ctx.cache, exist_ok=True)
    # Experiments started side by side share the cache: one trains the SFT model, the others wait.
    with open(os.path.join(ctx.cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _start_locked(ctx, s, min_pairs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_locked(ctx: Context, s: DemoSettings, min_pairs: int) -> Start:
    from prefalign.metrics import write_jsonl
    from prefalign.online.pairs import read_pairs

    with ctx.timer("sft (cached after the first run)"):
        sft, tok, splits = pipeline.sft_start(ctx.cache, s)
    sft.eval()
    key = _key({k: v for k, v in dataclasses.asdict(s).items() if k not in ("progress",)})
    data = os.path.join(ctx.cache, "data", key)
    train_file, eval_file = os.path.join(data, "pairs.jsonl"), os.path.join(data, "heldout_pairs.jsonl")
    meta_file = os.path.join(data, "meta.json")
    if os.path.isfile(meta_file):
        meta = json.load(open(meta_file))
        return Start(sft, tok, splits, train_file, eval_file, read_pairs(train_file), read_pairs(eval_file),
                     meta["topped_up"])
    with ctx.timer("sampling pairs"):
        prompts = task.sample_problems(splits.train, s.dpo_prompts, seed=s.seed)
        pairs = pipeline.sample_pairs(sft, tok, prompts, s, seed=s.seed)
        eval_pairs = pipeline.sample_pairs(sft, tok, splits.heldout, s, seed=s.seed + 7)
    topped = 0
    if len(pairs) < min_pairs:  # a barely trained model (quick mode): fill up from the teacher
        extra = teacher_pairs(task.sample_problems(splits.train, min_pairs - len(pairs), seed=s.seed + 1), s.seed)
        pairs, topped = pairs + extra, len(extra)
    if len(eval_pairs) < 8:
        eval_pairs = eval_pairs + teacher_pairs(splits.heldout[:8], s.seed + 2)
    write_jsonl(train_file, pairs)
    write_jsonl(eval_file, eval_pairs)
    with open(meta_file, "w") as fh:
        json.dump({"topped_up": topped, "pairs": len(pairs), "eval_pairs": len(eval_pairs)}, fh)
    return Start(sft, tok, splits, train_file, eval_file, pairs, eval_pairs, topped)


def dpo(*args, **kwargs):
    """pipeline.dpo, but a run that stopped early (a signal, the both-drop stop) is an error: an
    experiment must not report a half-trained policy as the result."""
    from prefalign.errors import UserError

    res = pipeline.dpo(*args, **kwargs)
    if res.stopped:
        raise UserError(f"training run {res.output} stopped early ({res.stopped}); the experiment is incomplete")
    return res


# --------------------------------------------------------------------------- evaluation


# generation_metrics' keys -> the experiments' column names
LABELS = {"score": "score (greedy)", "score_sampled": "score (sampled)", "length": "length (tokens)",
          "kl": "KL (sampled)", "malformed": "malformed", "run_on": "run-on"}


def pair_logratios(model, start: Start):
    """evaluation.pair_logratios of `model` vs the SFT model on the held-out pairs."""
    return evaluation.pair_logratios(model, start.sft, start.tok, start.eval_file, max_length=16)


def evaluate(ctx: Context, start: Start, model, pref: bool = True, degenerate: bool = False) -> dict:
    """Held-out verifier scores, length, KL to the SFT model on the policy's samples, and (pref)
    the implicit-reward preference accuracy on held-out pairs; (degenerate) malformed/run-on answers."""
    with ctx.timer("evaluation"):
        ev = pipeline.heldout_metrics(model, start.tok, start.splits.heldout, ctx.settings, reference_model=start.sft,
                                      degenerate=degenerate)
        out = {LABELS[k]: ev[k] for k in ("score", "score_sampled", "length", "kl")}
        if pref:
            rw, rl = pair_logratios(model, start)
            out["pref. accuracy (held-out)"] = (rw > rl).float().mean().item()
        if degenerate:
            out.update({LABELS[k]: ev[k] for k in ("malformed", "run_on")})
    return out


# --------------------------------------------------------------------------- plots and the report


def plot(path: str, panels: list[dict], title: str = "", width: float = 6.0) -> str:
    """One PNG with one or more panels side by side. A panel: {"series": {label: (xs, ys)},
    "xlabel", "ylabel", "title", "logx", "hlines": {label: y}, "vlines": {label: x}, "style": "-o"}."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) ** 0.8, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel.get("series", {}).items():
            pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and y == y]
            if pts:
                ax.plot(*zip(*pts), panel.get("style", "-"), label=label, markersize=4)
        for label, y in panel.get("hlines", {}).items():
            ax.axhline(y, color="gray", linestyle=":", linewidth=1.2)
            ax.text(ax.get_xlim()[0], y, f" {label}", color="gray", va="bottom", fontsize=7)
        for label, x in panel.get("vlines", {}).items():
            ax.axvline(x, color="red", linestyle="--", linewidth=1)
            ax.text(x, ax.get_ylim()[1], f" {label}", color="red", va="top", fontsize=7)
        if panel.get("logx"):
            ax.set_xscale("log")
        for label, (x, y) in panel.get("annotate", {}).items():
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(panel.get("xlabel", "step"))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=9)
        ax.grid(alpha=0.3)
        if panel.get("series") and panel.get("legend", True):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def series(history: list[dict], key: str, scale: float = 1.0):
    """(steps, values) of one metric in a run's history (skips steps that did not log it)."""
    pts = [(r["step"], r[key] * scale) for r in history if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def write_report(ctx: Context, res: Result) -> dict:
    """OUTPUT/report.md (command, wall time, table, figures, notes) and summary.json; prints the table."""
    wall = time.time() - ctx.t0
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in ctx.timer.stages.items())
    figs = [os.path.relpath(f, ctx.output) for f in res.figures]
    mode = " (quick: a reduced smoke run, the story may not hold)" if ctx.quick else ""
    lines = [f"# {res.title}", "", f"Command: `{ctx.command}`{mode}", "",
             f"Wall time {wall:.0f}s ({stages}).", ""]
    if res.claim:
        lines += [f"Claim: {res.claim}", ""]
    lines += [report.markdown_table(res.rows, res.columns), ""]
    if res.verdict:
        lines += [f"**Result:** {res.verdict}", ""]
    lines += [n + "\n" for n in res.notes]
    lines += [f"![{os.path.basename(f)}]({f})" for f in figs]
    with open(ctx.path("report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    summary = {"experiment": ctx.name, "command": ctx.command, "quick": ctx.quick, "seed": ctx.seed,
               "wall_seconds": wall, "stage_seconds": ctx.timer.stages, "rows": res.rows, "figures": figs,
               "verdict": res.verdict, "settings": dataclasses.asdict(ctx.settings), **res.extra}
    with open(ctx.path("summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    report.print_table(res.rows, res.columns, title=f"{res.title} ({wall:.0f}s)")
    if res.verdict:
        print(res.verdict)
    print(f"report: {ctx.path('report.md')}")
    return summary
