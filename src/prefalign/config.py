"""Run configuration: one dataclass, readable from YAML and from command-line flags.

Every field is both a YAML key (`max_steps`) and a flag (`--max-steps`); the flag wins.
Unknown keys and out-of-range values are user errors with a clear message.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from prefalign import fields, trl_keys, validation, yamlio
from prefalign.errors import UserError
from prefalign.field_groups import ATTENTIONS, AdamW, Checkpoints, Loading, LoRA, Run

_f = fields.option  # the one field helper of every command's settings


@fields.settings
class TrainConfig(AdamW, Loading, LoRA, Checkpoints, Run):
    """Every knob of `prefalign train` / `sft` (a YAML key and a flag each); the groups are field_groups'."""

    # what to train on
    model: str = _f("", "model: a local path or a hub id (any AutoModelForCausalLM)")
    ref_model: str = _f("", "reference model for --reference copy (empty: the same as --model)")
    tokenizer: str = _f("", "tokenizer path or hub id (empty: the model's)")
    data: str = _f("", "training data: .jsonl/.json/.parquet/.csv, a saved datasets dir, or a hub name")
    data_split: str = _f("train", "split to read when --data is a datasets dir or hub name")
    eval_data: str = _f("", "held-out data for periodic evaluation (same formats as --data)")
    output: str = _f("", "output directory (model, metrics.jsonl, checkpoints, plots)")
    # the objective
    loss: str = _f("dpo", "loss name (see `prefalign losses`), 'sft', or a weighted combination "
                   "'dpo,sft' (TRL's loss_type list; weights in --loss-weights)")
    loss_weights: str = _f("", "comma-separated weights of the --loss combination; empty: 1 each")
    loss_params: dict = _f(None, "the loss's parameters, checked against it (YAML mapping; flag "
                           "--loss-param KEY=VALUE, repeatable; LOSS.KEY for one term of a combination)",
                           flag="--loss-param", metavar="KEY=VALUE")
    # Shorthands for loss_params; None = the loss's own default (see `prefalign losses`).
    beta: float | None = _f(None, "beta: strength of the pull toward the reference (KL coefficient)")
    label_smoothing: float | None = _f(None, "label smoothing e for dpo (cDPO), robust, exo_pair")
    gamma: float | None = _f(None, "simpo target margin gamma")
    rpo_alpha: float = _f(0.0, "weight of a chosen-NLL (SFT) term added to any paired loss (RPO); 0 = off")
    desirable_weight: float | None = _f(None, "kto weight of desirable examples")
    undesirable_weight: float | None = _f(None, "kto weight of undesirable examples")
    ipo_average_logps: bool | None = _f(None, "ipo: feed per-token mean log-probs instead of sums (TRL's IPO)")
    # optimisation
    max_steps: int = _f(0, "optimizer steps (0 = run --epochs)")
    epochs: float = _f(1.0, "epochs over the data when --max-steps is 0")
    batch_size: int = _f(4, "pairs per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step (pairs/step = batch x accum x processes)")
    lr: float = _f(5e-7, "peak learning rate (AdamW)")
    warmup_ratio: float = _f(0.0, "warm-up as a fraction of the run: ceil(ratio x total steps), used when "
                             "--warmup-steps is 0 (TRL's warmup_ratio)")
    seed: int = _f(0, "random seed (data order, dropout, init of LoRA)")
    # data handling
    max_length: int = _f(1024, "max tokens of prompt + completion")
    max_prompt_length: int = _f(0, "max prompt tokens (0 = half of --max-length)")
    on_bad_row: str = _f("error", "a bad data row stops the run, or is skipped and written to rejects.jsonl", ["error", "skip"])
    packing: bool = _f(True, "pack pairs into rows with a shared prompt (no padding); off = padded batches")
    token_budget: int = _f(0, "tokens per packed row (0 = the longest pair of the micro-batch; -1 = chosen per "
                              "micro-batch: the layout of least padding + attention work, faster for short answers)")
    attention: str = _f("auto", "attention implementation the models load with (auto: transformers' default, sdpa "
                        "where the model has it); flex_attention skips the masked blocks of packed rows (GPU for "
                        "training: torch has no flex_attention backward on CPU)",
                        ATTENTIONS)
    gradient_checkpointing: bool = _f(False, "recompute each layer's activations in the backward (much less "
                                      "activation memory for long sequences, for one more forward per layer; the same gradients)")
    lean_mlp: bool = _f(True, "recompute the MLP's act(gate) and act(gate) * up in the backward instead of keeping "
                        "them (bitwise the same gradients, about half the MLP's activation memory)")
    sharding: str = _f("auto", "across processes: none = data parallel (a full model per process), fsdp = "
                       "weights, gradients and AdamW state sharded (torch FSDP2); auto: fsdp when launched with an "
                       "accelerate FSDP config", ["auto", "none", "fsdp"])
    # the reference
    reference: str = _f("auto", "reference strategy (auto: copy, adapters-off with LoRA, none when the loss needs none)",
                        ["auto", "copy", "adapters-off", "precomputed", "none"])
    cache_dir: str = _f("", "where precomputed reference log-probs are cached (empty: OUTPUT/ref_cache)")
    qlora: bool = _f(False, "load the base in 4-bit (bitsandbytes, GPU only) and train LoRA on it")
    merge_lora: bool = _f(False, "also write merged full weights to OUTPUT/merged")
    # logging, evaluation, checkpoints
    eval_every: int = _f(0, "evaluate on --eval-data every N steps (0 = only at the end)")
    resume_changes: str = _f("refuse", "a resume whose data, model or trajectory settings differ from the "
                             "checkpoint's is refused; allow = apply them, recorded in config.yaml's history",
                             ["refuse", "allow"])
    tensorboard: bool = _f(False, "also log to TensorBoard under OUTPUT/tb")
    both_drop_threshold: float = _f(0.5, "both-drop alarm: fires when the monitor set's chosen per-token log-prob "
                                    "falls this far (nats, and beyond its noise) below step 0's while its margin grows")
    both_drop_stop: bool = _f(False, "stop the run when the both-drop alarm fires: saves the model and a checkpoint, "
                              "exits with status 3")
    monitor_every: int = _f(20, "score the fixed monitor set (both-drop alarm) every N steps (0 = off)")
    monitor_pairs: int = _f(32, "pairs in the monitor set: a slice of --eval-data, else a seeded sample of --data")
    max_nonfinite: int = _f(5, "stop after this many non-finite steps in a row")
    chunk_size: int = _f(0, "tokens per chunk of the log-prob head (0 = automatic)")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# The documented range of every numeric field (validation.Range specs; shown in each flag's help).
# Every range also refuses nan and inf. A field without an entry takes any finite value.
RANGES = {
    **TrainConfig.RANGES,  # the groups'
    **{k: v for k, v in validation.LOSS_PARAM_RANGES.items() if k in FIELDS}, "label_smoothing": "[0, 0.5)",
    "max_steps": ">= 0", "epochs": "> 0", "batch_size": ">= 1", "grad_accum": ">= 1", "lr": "(0, 1)",
    "warmup_ratio": "[0, 1]", "seed": "[0, 2**32)", "max_length": ">= 1", "max_prompt_length": ">= 0",
    "token_budget": ">= -1", "eval_every": ">= 0", "both_drop_threshold": "finite", "max_nonfinite": ">= 1",
    "chunk_size": ">= 0", "monitor_every": ">= 0", "monitor_pairs": ">= 1",
}
# Fields holding a local path (or a hub id, which never starts with `~`): `~` is expanded.
PATHS = (*TrainConfig.PATHS, "model", "ref_model", "tokenizer", "data", "eval_data", "output", "cache_dir")
TrainConfig.RANGES, TrainConfig.PATHS = RANGES, PATHS  # read by fields.add_flags, as every settings class's


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert a YAML or flag value to the field's type inside its range, or raise a UserError naming it."""
    if fields.field_type(TrainConfig, name)[0] is dict:
        return None if value is None else _mapping(name, value, where)
    if name in ("loss", "loss_weights") and isinstance(value, (list, tuple)):  # YAML `loss: [dpo, sft]`
        value = ",".join(str(v) for v in value)
    return fields.coerce(TrainConfig, name, value, where)


def _mapping(name: str, value: Any, where: str) -> dict:
    """A YAML mapping, or the KEY=VALUE strings of a repeated flag (values parsed as YAML)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        out = {}
        for item in value:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"{where}: {name} entries are KEY=VALUE; got {item!r}")
            try:
                out[key.strip()] = yamlio.loads(text, f"{where}: {name} {key.strip()}")
            except UserError:  # not YAML: the plain string
                out[key.strip()] = text
        return out
    raise UserError(f"{where}: {name} must be a mapping of KEY: VALUE; got {value!r}")


def load_yaml(path: str) -> dict:
    return yamlio.load_mapping(path)


def build(values: dict, where: str = "config", sources: dict | None = None) -> TrainConfig:
    """A validated TrainConfig from a dict of (possibly string) values.

    `sources` (field -> "--flag" or file) names where each value came from in a refusal."""
    sources = sources or {}
    kwargs = {name: _coerce(name, value, sources.get(name, where))
              for name, value in trl_keys.translate(values, FIELDS, where).items()}
    cfg = TrainConfig(**kwargs)
    validate(cfg, sources=sources, where=where)
    return cfg


def validate(cfg: TrainConfig, sources: dict | None = None, where: str = "config") -> None:
    """Raise a UserError for the first bad value; `sources` (field -> "--flag" or file) names its origin."""
    sources = sources or {}

    def bad(msg):
        raise UserError(f"config: {msg}")

    for name, spec in RANGES.items():
        msg = validation.problem(name, getattr(cfg, name), spec)
        if msg:
            raise UserError(f"{sources.get(name, where)}: {msg}")

    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            bad(f"{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    if cfg.reference == "adapters-off" and cfg.lora_r == 0:
        bad("reference adapters-off needs LoRA (set lora_r > 0)")
    if cfg.qlora and cfg.lora_r == 0:
        bad("qlora needs LoRA (set lora_r > 0)")
    from prefalign.objective import loss_plan

    loss_plan(cfg)  # the loss names, weights and parameters, checked against the losses


# Fields that only a preference loss reads: `prefalign sft` shows no flag for them.
PREFERENCE_ONLY = ("ref_model", "beta", "label_smoothing", "gamma", "rpo_alpha", "desirable_weight",
                   "undesirable_weight", "ipo_average_logps", "reference", "cache_dir")


def shown_default(name: str, base: dict | None = None) -> str:
    """A field's default as its flag's help shows it: the command's own (sft: lr 2e-05), else the field's."""
    default = (base or {}).get(name, FIELDS[name].default)
    if default is None:
        return "the loss's own"
    return "empty" if default == "" else repr(default)


def add_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), base: dict | None = None) -> None:
    """One flag per config field, its help showing the default the command really uses (`base`: the
    command's own defaults, as from_args applies them) once, its choices and its range. The
    argparse defaults stay None so we know which flags were given."""
    fields.add_flags(parser, TrainConfig, skip, shown=lambda name: shown_default(name, base))
    for trl_name, flag in trl_keys.flag_names():  # TRL's names (docs/trl.md), not listed one by one
        if trl_keys.ALIASES[trl_name] not in skip:  # TRL's switches (--bf16) may also take a value
            switch = dict(nargs="?", const="true") if trl_name in trl_keys.MAPPED else {}
            parser.add_argument(flag, dest="trl__" + trl_name, default=None, help=argparse.SUPPRESS, **switch)


def from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """Merge: dataclass defaults < base (the command's defaults) < YAML (--config) < explicit flags."""
    values: dict = dict(base or {})
    sources: dict = {}
    saved: dict = {}
    if getattr(args, "resume", None) and getattr(args, "output", None):
        saved = saved_config(validation.expand(args.output))
        values.update(saved)  # the run's own settings; flags still win
    config_path = validation.expand(getattr(args, "config", None))
    if config_path:
        file_values = trl_keys.translate(load_yaml(config_path), FIELDS, config_path)
        # Typed here, not only after the merge: a bad value in the file is refused even where a flag overrides it.
        values.update({k: _coerce(k, v, config_path) for k, v in file_values.items()})
        sources.update({k: config_path for k in file_values})
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    given.update({trl_name: getattr(args, "trl__" + trl_name) for trl_name in trl_keys.ALIASES
                  if getattr(args, "trl__" + trl_name, None) is not None})
    for name, v in trl_keys.translate(given, FIELDS, "flags").items():
        if v is not None:
            if FIELDS[name].type in (dict, "dict") and isinstance(values.get(name), dict):
                v = {**values[name], **_mapping(name, v, "flags")}  # --loss-param adds to the file's
            values[name] = v
            sources[name] = "--loss-param" if name == "loss_params" else "--" + name.replace("_", "-")
    if saved and values.get("loss") != saved.get("loss"):
        # The saved run's parameters belong to its loss (config.yaml records them all, defaults
        # included); a resume under another loss starts from that loss's own defaults.
        for key in ("loss_params", "loss_weights"):
            if key not in sources:
                values.pop(key, None)
    return build(values, where=config_path or "flags", sources=sources)


def saved_config(output: str) -> dict:
    """OUTPUT/config.yaml's config keys, for `--resume auto` without the original flags. The
    history and the per-invocation keys (resume, overwrite, resume_changes) are not reused;
    keys this version does not know are left out."""
    path = os.path.join(os.path.expanduser(output), "config.yaml")
    if not os.path.isfile(path):
        return {}
    values = load_yaml(path)
    skip = {"history", "resume", "overwrite", "resume_changes"}
    return {k: v for k, v in values.items() if k in FIELDS and k not in skip}


def to_dict(cfg: TrainConfig) -> dict:
    return fields.as_dict(cfg)


def check_attention(attention: str, cuda: bool | None = None) -> None:
    """Training with flex_attention needs CUDA (train, grpo)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if attention == "flex_attention" and not cuda:
        raise UserError("--attention flex_attention: training needs a CUDA GPU (torch has no flex_attention "
                        "backward on CPU); use --attention sdpa")


def check_before_start(cfg: TrainConfig, cuda: bool | None = None) -> None:
    """What the values alone cannot tell, checked before any model or data loads: the machine and the paths."""
    check_attention(cfg.attention, cuda)
    validation.check_output_dir(cfg.output, "--output")
    validation.check_output_dir(cfg.cache_dir, "--cache-dir")
