"""TRL's config names, accepted as aliases of prefalign's where they mean the same thing.

A YAML written for TRL's DPOConfig/KTOConfig/SFTConfig (or its script arguments) runs as is
for these keys; docs/trl.md ("TRL config keys") shows the table. A key given both under its
TRL name and its own name is refused: which one was meant is not ours to guess.
"""

from __future__ import annotations

import difflib

from prefalign import validation
from prefalign.errors import UserError

# TRL name -> prefalign field (same meaning, same value).
RENAMED = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_schedule",
    "save_steps": "save_every",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints",
    "loss_type": "loss",
    "output_dir": "output",
    "model_name_or_path": "model",
    "dataset_name": "data",
    "dataset_train_split": "data_split",
    "attn_implementation": "attention",
    "simpo_gamma": "gamma",
}
# TRL name -> (prefalign field, {TRL value: prefalign value}); a value mapped to None sets nothing
# (precompute_ref_log_probs: false leaves the reference strategy to --reference).
MAPPED = {
    "bf16": ("precision", {True: "bf16", False: "fp32"}),
    "precompute_ref_log_probs": ("reference", {True: "precomputed", False: None}),
}
# lr_scheduler_type values: TRL's constant_with_warmup is prefalign's constant (which warms up first).
SCHEDULES = {"constant_with_warmup": "constant"}
# Keys TRL and prefalign spell alike (max_steps, beta, ...) need no entry: they are fields already.
ALIASES = {**RENAMED, **{k: field for k, (field, _) in MAPPED.items()}}


def translate(values: dict, fields, where: str, aliases: dict | None = None) -> dict:
    """`values` with TRL names turned into prefalign fields. All unknown keys are reported in one
    UserError (suggestions from both vocabularies); so is a field set under two names.
    `aliases` (alias -> field): another command's table (GRPO's `beta`); default: train's."""
    aliases = ALIASES if aliases is None else aliases
    unknown = [k for k in values if isinstance(k, str) and _name(k) not in fields and _name(k) not in aliases]
    if unknown:
        raise UserError(f"{where}: unknown config key{'s' if len(unknown) > 1 else ''} "
                        + ", ".join(_with_hint(k, fields, aliases) for k in unknown))
    out, named = {}, {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise UserError(f"{where}: config key {key!r} is not a string")
        name = _name(key)
        field = aliases.get(name, name)
        if field in named:
            raise UserError(f"{where}: '{named[field]}' and '{key}' both set {field}; keep one")
        named[field] = key
        value = _value(name, value, where)
        if value is not None or name not in MAPPED:
            out[field] = value
    return out


def _name(key: str) -> str:
    return key.replace("-", "_")


def _value(name: str, value, where: str):
    if name in MAPPED:
        flag = validation.coerce(name, value, bool, where)
        return MAPPED[name][1][flag]
    if name == "lr_scheduler_type" and isinstance(value, str):
        return SCHEDULES.get(value, value)
    return value


def _with_hint(key: str, fields, aliases: dict) -> str:
    vocabulary = list(fields) + list(aliases)
    close = difflib.get_close_matches(_name(key), vocabulary, n=1)
    if not close:
        return f"'{key}'"
    alias = f", another name for {aliases[close[0]]}" if close[0] not in fields else ""
    if alias and aliases is ALIASES:
        alias = f", TRL's name for {aliases[close[0]]}"
    return f"'{key}' (did you mean '{close[0]}'{alias}?)"


def flag_names() -> list[tuple[str, str]]:
    """(TRL name, its flag --learning-rate) for every alias: `prefalign train` accepts them too."""
    return [(name, "--" + name.replace("_", "-")) for name in ALIASES]
