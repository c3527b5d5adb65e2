"""The online commands: `prefalign generate`, `grpo`, `ppo`, `iterate`.

Registered by prefalign.cli (`_extra_commands`). Every field of GenerateConfig / GRPOConfig /
PPOConfig / IterativeConfig is a flag (steps <-> --steps), made by prefalign.fields like every
command's, and a key of a --config YAML file; flags win over the file. Errors the user can fix (a
bad flag, a reward function that raises or returns the wrong thing) print one line and exit 2
through prefalign.cli.main.
"""

from __future__ import annotations

from prefalign.errors import UserError
from prefalign.fields import add_flags, from_flags
from prefalign.validation import check_output_file, path_arg


def _parse_sets(pairs: list[str] | None) -> dict:
    """--set key=value (repeatable) -> {key: value}: offline-trainer keys for each DPO round."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise UserError(f"--set {p!r}: expected key=value (a `prefalign train` config key)")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_generate(args):
    """Model + prompts file -> JSONL of completions (one row per sample), optionally scored."""
    from prefalign import models
    from prefalign.metrics import write_jsonl
    from prefalign.online.common import load_prompts, make_reward
    from prefalign.sampling import SamplingConfig, generate
    from prefalign.settings import GenerateConfig

    args = from_flags(GenerateConfig, args, args.config)
    check_output_file(args.output, "--output")
    tok = models.load_tokenizer(args.tokenizer or args.model)
    model = models.load_model(args.model)
    pset = load_prompts(args.prompts, tok, args.max_prompt_length)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, n=args.n, stop=args.stop or [], seed=args.seed)
    gens = generate(model, tok, pset.ids, cfg, batch_size=args.batch_size)
    idx = list(range(len(pset)))
    _, texts, extra = pset.select(idx, repeat=args.n)
    rewards = make_reward(args.reward).score(texts, gens.texts, extra).total if args.reward else None
    rows = []
    for k in range(len(gens)):
        i = k // args.n
        row = {"prompt": pset.raw[i], "completion": gens.texts[k], "sample": k % args.n,
               "finish_reason": gens.finish_reasons[k], "num_tokens": len(gens.token_ids[k])}
        if rewards is not None:
            row["reward"] = rewards[k]
        row.update({c: v[i] for c, v in pset.extra.items() if c not in row})
        rows.append(row)
    write_jsonl(args.output, rows)
    print(f"{len(gens)} completions ({gens.num_tokens} tokens, {gens.tokens_per_second:.0f} tokens/s) -> {args.output}"
          + (f"  mean reward {sum(rewards) / len(rewards):.4g}" if rewards else ""))


def cmd_grpo(args):
    from prefalign.errors import os_errors_name
    from prefalign.online.grpo import GRPOConfig, grpo

    cfg = from_flags(GRPOConfig, args, args.config)
    with os_errors_name(cfg.output):  # a write that fails at close names no file: name the run
        result = grpo(cfg)
    last = result.history[-1] if result.history else {}
    first = result.history[0] if result.history else {}
    print(f"done: {result.steps} steps -> {result.output}  reward {first.get('reward/mean', float('nan')):.4g} -> "
          f"{last.get('reward/mean', float('nan')):.4g}")


def cmd_ppo(args):
    from prefalign.errors import os_errors_name
    from prefalign.online.ppo import PPOConfig, ppo

    cfg = from_flags(PPOConfig, args, args.config)
    with os_errors_name(cfg.output):
        result = ppo(cfg)
    if result.stopped:  # a signal: checkpointed; the shell sees it was stopped, as with train
        import signal

        return 128 + int(signal.Signals[result.stopped.split()[-1]])
    first, last = (result.history[0], result.history[-1]) if result.history else ({}, {})
    print(f"done: {result.steps} steps -> {result.output}  reward {first.get('reward/mean', float('nan')):.4g} -> "
          f"{last.get('reward/mean', float('nan')):.4g}, kl {last.get('kl', float('nan')):.4g}")


def cmd_iterate(args):
    from prefalign.online.iterative import IterativeConfig, iterate

    cfg = from_flags(IterativeConfig, args, args.config, extra={"train_overrides": _parse_sets(args.set)}
                     if args.set else None)
    result = iterate(cfg)
    rewards = " -> ".join(f"{r['reward/mean']:.3g}" for r in result.history)
    after = result.history[-1].get("reward/after")
    print(f"done: {result.rounds} rounds -> {result.output}  sample reward per round {rewards}"
          + (f" -> {after:.3g} (final policy)" if after is not None else ""))


def register(sub) -> None:
    # The settings classes only: the loops (torch, transformers) load when a command runs.
    from prefalign.online.settings import GRPOConfig, IterativeConfig, PPOConfig
    from prefalign.settings import GenerateConfig

    p = sub.add_parser("generate", help="sample completions for a prompts file (JSONL out), optionally scored",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of generate's keys (default: none)")
    add_flags(p, GenerateConfig)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("grpo", help="GRPO: group sampling, verifier/reward-model rewards, clipped surrogate + KL",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of GRPOConfig keys (default: none)")
    add_flags(p, GRPOConfig)
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("ppo", help="PPO-RLHF: KL-penalised per-token rewards, a value model, GAE, clipped policy "
                                   "and value losses (4 models: policy, reference, reward, value)",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of PPOConfig keys (default: none)")
    add_flags(p, PPOConfig)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("iterate", help="iterative DPO: generate -> score -> best-vs-worst pairs -> DPO, in rounds",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of IterativeConfig keys (default: none)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a `prefalign train` config key for each round's DPO (repeatable), e.g. --set warmup_steps=10 (default: none)")
    add_flags(p, IterativeConfig)
    p.set_defaults(func=cmd_iterate)
