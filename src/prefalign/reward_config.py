"""The settings of `prefalign reward` (a Bradley-Terry reward model), apart from its loop.

Import-light (no torch): `prefalign --help` builds the command's flags from these fields (help,
choices, ranges), as it does for grpo's (online/settings.py).
"""

from __future__ import annotations

import dataclasses
import os

from prefalign.errors import UserError
from prefalign.field_groups import AdamW, Checkpoints, Loading, LoRA, Run
from prefalign.fields import check, option, settings

_h = option  # the one field helper (prefalign.fields)


@settings
class RewardConfig(AdamW, Loading, LoRA, Checkpoints, Run):
    """Every knob of a reward-model run (also the flags of `prefalign reward`: max_steps <-> --max-steps)."""

    model: str = _h("", "the causal LM the reward model starts from: a local path or a hub id (its body is kept, "
                    "a new one-output score head is put on it)")
    tokenizer: str = _h("", "tokenizer path or hub id (empty: the model's)")
    data: str = _h("", "preference pairs, the formats `prefalign train` reads (.jsonl/.json/.parquet/.csv, "
                   "a saved datasets dir, a hub name)")
    data_split: str = _h("train", "split to read when --data is a datasets dir or hub name")
    eval_data: str = _h("", "held-out pairs: pairwise accuracy every --eval-every steps and at the end")
    output: str = _h("", "output directory (model, metrics.jsonl, checkpoints)")
    # the objective
    margin_column: str = _h("", "a numeric column of the pairs holding a per-pair margin m: the loss is "
                            "-log sigmoid(r_c - r_r - m); a row without a finite number there stops the run "
                            "(empty: no margin)")
    center_coef: float = _h(0.0, "centering: adds coef * mean((r_c + r_r)^2), keeping the scores near 0 "
                            "(TRL's center_rewards_coefficient; 0 = off)")
    # optimisation
    max_steps: int = _h(0, "optimizer steps (0 = run --epochs)")
    epochs: float = _h(1.0, "epochs over the data when --max-steps is 0")
    batch_size: int = _h(8, "pairs per micro-batch")
    grad_accum: int = _h(1, "micro-batches per optimizer step")
    lr: float = _h(1e-5, "peak learning rate (AdamW)")
    seed: int = _h(0, "random seed (data order, the score head's initialisation, LoRA)")
    # data handling
    max_length: int = _h(1024, "max tokens of prompt + completion")
    max_prompt_length: int = _h(0, "max prompt tokens (0 = half of --max-length)")
    on_bad_row: str = _h("error", "a bad data row stops the run, or is skipped and written to rejects.jsonl",
                         ("error", "skip"))
    lora_r: int = _h(0, "LoRA rank (0 = full fine-tuning); the score head is always trained in full")
    eval_every: int = _h(0, "evaluate on --eval-data every N steps (0 = only at the end)")
    resume_changes: str = _h("refuse", "a resume whose data, model or trajectory settings differ from the "
                             "checkpoint's is refused; allow = apply them", ("refuse", "allow"))
    save_model: bool = _h(True, "write the reward model to OUTPUT/model at the end (HF format: "
                          "AutoModelForSequenceClassification loads it)")

    RANGES = {
        "center_coef": ">= 0", "max_steps": ">= 0", "epochs": "> 0", "batch_size": ">= 1", "grad_accum": ">= 1",
        "lr": "(0, 1)", "seed": "[0, 2**32)", "max_length": ">= 2", "max_prompt_length": ">= 0", "eval_every": ">= 0",
    }
    PATHS = ("model", "tokenizer", "data", "eval_data", "output")

    def __post_init__(self):
        check(self, "reward config")
        if self.max_prompt_length and self.max_prompt_length >= self.max_length:
            raise UserError(f"reward config: max_prompt_length ({self.max_prompt_length}) must be below "
                            f"max_length ({self.max_length})")


# Fields that do not change what the run computes (fingerprint.NOT_TRAJECTORY's counterpart):
# a resume that changes only these is the same run.
NOT_TRAJECTORY = frozenset({
    "output", "resume", "overwrite", "resume_changes", "max_steps", "epochs", "log_every", "eval_every",
    "save_every", "keep_checkpoints", "progress", "save_model", "on_bad_row", "trust_remote_code",
    "batch_size", "grad_accum",
})


def with_saved_settings(cfg: RewardConfig, given: set[str]) -> RewardConfig:
    """A resume: the run's own settings from OUTPUT/config.yaml for every field not `given` (by a flag
    or --config), so `--resume auto --output OUT` alone continues the run as it was started."""
    from prefalign.yamlio import load_mapping

    path = os.path.join(cfg.output, "config.yaml")
    if not os.path.isfile(path):
        return cfg
    per_call = {"resume", "overwrite", "resume_changes"}
    names = {f.name for f in dataclasses.fields(RewardConfig)} - per_call - given
    return dataclasses.replace(cfg, **{k: v for k, v in load_mapping(path).items() if k in names})
