"""`prefalign experiment NAME`: experiments checking published claims about DPO as commands, and
`prefalign compare` (offline DPO vs iterative DPO vs GRPO); registered by prefalign.cli.

Each runs on the demo task with no arguments, writes OUTPUT/report.md (table, figures, notes),
OUTPUT/summary.json and OUTPUT/plots/*.png, and prints the table. The SFT start and the
on-policy pairs are cached in a folder shared by all experiments (default: OUTPUT/../_start).
"""

from __future__ import annotations

import importlib

EXPERIMENTS = {
    "beta-sweep": ("prefalign.experiments.beta_sweep",
                   "DPO at several beta: KL from the reference (on policy samples) vs beta; quality vs KL"),
    "both-drop": ("prefalign.experiments.both_drop",
                  "overtrained DPO: chosen and rejected log-probs both fall; the alarm; generation quality"),
    "ipo-vs-dpo": ("prefalign.experiments.ipo_vs_dpo",
                   "deterministic preferences: DPO's margin runs away, IPO's settles at 1/(2 beta)"),
    "kto-unpaired": ("prefalign.experiments.kto_unpaired",
                     "KTO on the pairs split into unpaired good/bad labels (balanced and 1:4) vs DPO"),
    "length-bias": ("prefalign.experiments.length_bias",
                    "chosen padded with filler: DPO gets longer, not better; balancing / normalizing fixes it"),
    "lora-memory": ("prefalign.experiments.lora_memory",
                    "full fine-tuning vs LoRA (adapters-off) vs LoRA + precomputed reference: memory, speed"),
    "dpo-vs-sft": ("prefalign.experiments.dpo_vs_sft",
                   "SFT on the chosen responses vs DPO on the same pairs: are rejected responses informative?"),
    "frontier": ("prefalign.experiments.frontier",
                 "held-out reward vs KL to SFT: DPO (several beta), PPO on a reward model, GRPO (several KL coefs)"),
}


def run_experiment(name: str, output: str = "", quick: bool = False, seed: int = 0, cache: str = "",
                   threads: int = 1, command: str = "", options: dict | None = None) -> dict:
    import torch

    from prefalign.experiments import common

    if threads:
        torch.set_num_threads(threads)
    module = importlib.import_module(EXPERIMENTS[name][0])
    ctx = common.make_context(name, output, quick, seed, cache, command, options)
    result = module.run(ctx)
    return common.write_report(ctx, result)


def cmd_experiment(args):
    from prefalign.errors import UserError
    from prefalign.validation import check_output_dir

    if args.name == "list":
        for name, (_, help_text) in EXPERIMENTS.items():
            print(f"{name:14s} {help_text}")
        return 0
    if args.name not in EXPERIMENTS:
        import difflib

        close = difflib.get_close_matches(args.name, EXPERIMENTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown experiment '{args.name}'{hint}; known: {', '.join(EXPERIMENTS)}")
    argv = getattr(args, "argv", None)
    command = "prefalign " + " ".join(argv) if argv else f"prefalign experiment {args.name}"
    check_output_dir(args.output, "--output")
    check_output_dir(args.cache, "--cache")
    run_experiment(args.name, args.output, args.quick, args.seed, args.cache, args.threads, command,
                   {"ppo_reward": args.ppo_reward})
    return 0


def _compare_default(name: str):
    """The default of a compare flag that comes from the task (None in CompareSettings), in words."""
    from prefalign.demo.settings import MAX_NEW_TOKENS, DemoSettings
    from prefalign.experiments.compare_settings import DEMO_FIELDS, USER_DEFAULTS

    if name not in USER_DEFAULTS:
        return None
    demo = MAX_NEW_TOKENS if name == "max_new_tokens" else getattr(DemoSettings(), DEMO_FIELDS[name])
    return f"demo task {demo!r} (DemoSettings); your task {USER_DEFAULTS[name]!r}"


def cmd_compare(args):
    from prefalign.experiments.compare import CompareSettings, compare
    from prefalign.fields import given_flags
    from prefalign.validation import check_output_dir

    if args.methods and len(args.methods) == 1 and "," in args.methods[0]:
        args.methods = args.methods[0].split(",")
    given = {k: v for k, v in given_flags(CompareSettings, args).items() if k != "quick"}
    s = (CompareSettings.quick_settings if args.quick else CompareSettings)(**given)
    check_output_dir(s.output, "--output")
    compare(s)


def register(sub) -> None:
    # The settings class only: the loops (torch, transformers) load when a command runs.
    from prefalign.experiments.compare_settings import CompareSettings
    from prefalign.fields import add_flags

    p = sub.add_parser("compare", help="offline DPO vs iterative DPO vs GRPO vs RLHF (reward model + PPO) from the "
                                       "same SFT model: held-out score, models in memory, stability, time, memory "
                                       "(demo task by default)",
                       description="Aligns one SFT model four ways and writes OUTPUT/report.md (table + plots). "
                                   "Without --model it runs on the demo task, whose numbers default to "
                                   "`prefalign demo`'s (DemoSettings); see docs/compare.md.")
    add_flags(p, CompareSettings, shown=_compare_default)
    p.set_defaults(func=cmd_compare)

    lines = "\n".join(f"  {n:14s} {h}" for n, (_, h) in EXPERIMENTS.items())
    import argparse

    p = sub.add_parser("experiment", help="experiments checking published claims about DPO on the demo task (beta-sweep, both-drop, ...)",
                       description="Run one of experiments checking published claims about DPO on the demo task:\n" + lines,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="experiment name (or 'list')")
    from prefalign.validation import add_ranged, path_arg

    p.add_argument("--output", type=path_arg, default="", help="report folder (default: runs/experiments/NAME)")
    p.add_argument("--quick", action="store_true", help="a reduced smoke run (seconds; the story may not hold)")
    add_ranged(p, "--seed", int, "[0, 2**31)", "the experiments derive seeds + k from it", default=0)
    p.add_argument("--cache", type=path_arg, default="", help="folder for the shared SFT start and pairs (default: OUTPUT/../_start)")
    add_ranged(p, "--threads", int, ">= 0", default=1,
                   help="torch CPU threads (0 = torch's default). 1 by default: the demo model is tiny, and on a "
                        "shared CPU more threads spin-wait (10x slower measured with 2 threads on a loaded 2-core box)")
    from prefalign.experiments.rlhf import DEFAULT_PPO_REWARD, PPO_REWARDS  # import-light: no torch

    p.add_argument("--ppo-reward", choices=PPO_REWARDS, default=DEFAULT_PPO_REWARD,
                   help="frontier: PPO's reward, rm (a reward model trained on the DPO pairs: the RLHF pipeline) or "
                        f"verifier (the demo's checker, GRPO's reward) (default: {DEFAULT_PPO_REWARD!r})")
    p.set_defaults(func=cmd_experiment)
