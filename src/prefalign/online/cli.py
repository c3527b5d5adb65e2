"""The online commands: `prefalign generate`, `grpo`, `ppo`, `iterate`.

Registered by prefalign.cli (`_extra_commands`). Every field of GRPOConfig / IterativeConfig
(and of CompareSettings, experiments.cli) is a flag (steps <-> --steps) and, for grpo and iterate, a key of a --config
YAML file; flags win over the file. Errors the user can fix (a bad flag, a reward function that
raises or returns the wrong thing) print one line and exit 2 through prefalign.cli.main.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from prefalign import validation
from prefalign.errors import UserError
from prefalign.trl_keys import translate
from prefalign.validation import add_ranged, check_output_file, path_arg


ALIAS = "alias__"  # the argparse dest prefix of an alias flag


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults_help=None) -> None:
    """One flag per field of `cls`; defaults stay None so we know which flags were given.

    A field's help is its metadata["help"] (if any) and its default; defaults_help(name) may
    describe the default instead (compare: "the demo's DemoSettings value, ..."). The range of a
    field in `cls.RANGES` is shown in its help; a field in `cls.PATHS` gets `~` expanded."""
    ranges, paths = getattr(cls, "RANGES", {}), getattr(cls, "PATHS", ())
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        flag = "--" + f.name.replace("_", "-")
        shown = defaults_help(f.name) if defaults_help else None
        shown = (shown if shown is not None else f"default: {default!r}") + validation.help_suffix(ranges.get(f.name))
        help_ = f"{f.metadata['help']} ({shown})" if f.metadata.get("help") else f"({shown})"
        kw = dict(dest=f.name, default=None, help=help_.replace("%", "%%"))
        choices = f.metadata.get("choices")
        if default is None:  # the value comes from elsewhere (compare: DemoSettings): the type is in the metadata
            parser.add_argument(flag, type=f.metadata["type"], metavar=f.name.upper(), **kw)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            elem = float if f.name.endswith("weights") else str
            parser.add_argument(flag, nargs="+", type=elem, metavar=f.name.upper(), **kw)
        elif isinstance(default, dict):
            continue
        elif f.name in paths:
            parser.add_argument(flag, type=path_arg, metavar=f.name.upper(), **kw)
        elif choices:  # argparse shows them: --scale {group,batch,none}
            parser.add_argument(flag, type=type(default), choices=choices, **kw)
        else:
            parser.add_argument(flag, type=type(default), metavar=f.name.upper(), **kw)
    # --beta: GRPO's kl_coef under TRL's name. Unlisted, as train's TRL names are (docs/trl.md).
    for alias, name in getattr(cls, "ALIASES", {}).items():
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        parser.add_argument("--" + alias.replace("_", "-"), dest=ALIAS + alias, default=None,
                            type=type(_default(field)), choices=field.metadata.get("choices"), help=argparse.SUPPRESS)


def from_flags(cls, args, config_path: str = "", extra: dict | None = None):
    """An instance of `cls` from (dataclass defaults < YAML file < flags < extra)."""
    names = {f.name for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    ranges, paths = getattr(cls, "RANGES", {}), getattr(cls, "PATHS", ())
    values = {}
    if config_path:
        from prefalign.yamlio import load_mapping

        config_path = validation.expand(config_path)
        # Unknown keys all at once (a file written for another tool has several); aliases (GRPO's
        # `beta`, TRL's name) become their fields, as `prefalign train` does for TRL's names.
        mapping = translate(load_mapping(config_path), names, config_path, getattr(cls, "ALIASES", {}))
        for name, value in mapping.items():
            value = validation.coerce(name, value, types[name], config_path, ranges.get(name))
            _refuse_outside(name, value, ranges, config_path)
            values[name] = validation.expand(value) if name in paths else value
    flags = _given_flags(cls, args)
    values.update(flags)
    values.update(extra or {})
    try:
        return cls(**values)
    except TypeError as e:  # a YAML value of the wrong type
        raise UserError(f"{config_path or 'flags'}: {e}") from None


def _refuse_outside(name: str, value, ranges: dict, where: str) -> None:
    msg = validation.problem(name, value, ranges.get(name))
    if msg:
        raise UserError(f"{where}: {msg}")


def _given_flags(cls, args) -> dict:
    """The fields of `cls` set by a flag (or an alias flag: --beta), each checked against cls.RANGES
    (the refusal names the flag)."""
    ranges, aliases = getattr(cls, "RANGES", {}), getattr(cls, "ALIASES", {})
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    given.update({alias: getattr(args, ALIAS + alias) for alias in aliases
                  if getattr(args, ALIAS + alias, None) is not None})
    given = translate(given, given, "flags", aliases)  # a field set under both names is refused
    for name, value in given.items():
        _refuse_outside(name, value, ranges, "--" + name.replace("_", "-"))
    return given


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

    p = sub.add_parser("generate", help="sample completions for a prompts file (JSONL out), optionally scored")
    p.add_argument("--model", type=path_arg, required=True, help="model: a local path or a hub id (required)")
    p.add_argument("--tokenizer", type=path_arg, default="", help="tokenizer path or hub id (default: the model's)")
    p.add_argument("--prompts", type=path_arg, required=True, help="a file with a `prompt` column (jsonl/json/parquet/csv) (required)")
    p.add_argument("--output", type=path_arg, required=True, help="JSONL: prompt, completion, sample, finish_reason, num_tokens (required)")
    add_ranged(p, "--n", int, ">= 1", "samples per prompt", default=1)
    add_ranged(p, "--max-new-tokens", int, ">= 1", "new tokens per completion", default=128)
    add_ranged(p, "--max-prompt-length", int, ">= 1", "max prompt tokens (longer prompts are truncated)",
               default=512)
    add_ranged(p, "--temperature", float, ">= 0", "sampling temperature; 0 = greedy", default=1.0)
    add_ranged(p, "--top-p", float, "(0, 1]", "nucleus sampling p", default=1.0)
    add_ranged(p, "--top-k", int, ">= 0", "top-k sampling; 0 = off", default=0)
    p.add_argument("--stop", nargs="+", help="stop strings (default: none; EOS always stops)")
    add_ranged(p, "--seed", int, "[0, 2**32)", "sampling seed", default=0)
    add_ranged(p, "--batch-size", int, ">= 1", "rows decoded together", default=64)
    p.add_argument("--reward", nargs="+", help="also score each completion with these reward specs (default: none)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("grpo", help="GRPO: group sampling, verifier/reward-model rewards, clipped surrogate + KL",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of GRPOConfig keys (default: none)")
    add_dataclass_flags(p, GRPOConfig)
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("ppo", help="PPO-RLHF: KL-penalised per-token rewards, a value model, GAE, clipped policy "
                                   "and value losses (4 models: policy, reference, reward, value)",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of PPOConfig keys (default: none)")
    add_dataclass_flags(p, PPOConfig)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("iterate", help="iterative DPO: generate -> score -> best-vs-worst pairs -> DPO, in rounds",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of IterativeConfig keys (default: none)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a `prefalign train` config key for each round's DPO (repeatable), e.g. --set warmup_steps=10 (default: none)")
    add_dataclass_flags(p, IterativeConfig)
    p.set_defaults(func=cmd_iterate)
