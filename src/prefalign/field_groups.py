"""Groups of settings that several commands share, declared once.

A command's settings class inherits the groups it has (`class PPOConfig(Rewards, Sampling, AdamW,
Loading, Run)`) and redeclares a field only where its default or help really differs (grpo's
constant lr_schedule). `fields.settings` merges each group's RANGES and PATHS into the class;
`fields.add_flags` shows each group's flags under its own heading (the group's docstring).
Import-light (no torch), like every settings module.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.errors import UserError
from prefalign.fields import option
from prefalign.hardware import HELP, PRECISIONS

ATTENTIONS = ("auto", "sdpa", "eager", "flex_attention")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class Rewards:
    """prompts and rewards"""

    prompts: str = option("", "prompt file (jsonl/json/parquet/csv): a `prompt` column + the extra columns "
                              "the rewards read")
    reward: list = option([], "reward specs: module:function, exact_answer, regex=..., rm:PATH (a trained "
                              "reward model; see `prefalign.online.rewards.load_reward`)")
    reward_weights: list[float] = option([], "one weight per reward (empty: 1 each)")

    RANGES = {"reward_weights": "finite"}
    PATHS = ("prompts",)

    def check_rewards(self, where: str) -> None:
        if isinstance(self.reward, str):  # one spec from YAML
            self.reward = [self.reward]
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise UserError(f"{where}: {len(self.reward_weights)} reward weights for {len(self.reward)} rewards")


@dataclass
class Sampling:
    """sampling from the policy"""

    max_new_tokens: int = option(64, "new tokens per completion")
    max_prompt_length: int = option(512, "max prompt tokens")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling p")
    top_k: int = option(0, "top-k sampling (0 = off)")
    generation_batch_size: int = option(64, "rows decoded together")

    RANGES = {"max_new_tokens": ">= 1", "max_prompt_length": ">= 1", "temperature": "> 0", "top_p": "(0, 1]",
              "top_k": ">= 0", "generation_batch_size": ">= 1"}


@dataclass
class AdamW:
    """optimizer (AdamW) and learning-rate schedule"""

    warmup_steps: int = option(0, "linear warm-up, in optimizer steps")
    lr_schedule: str = option("linear", "learning-rate schedule after warm-up", LR_SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")

    RANGES = {"warmup_steps": ">= 0", "weight_decay": ">= 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
              "max_grad_norm": ">= 0"}


@dataclass
class Loading:
    """how the models load and compute"""

    precision: str = option("fp32", HELP, PRECISIONS)
    attention: str = option("auto", "attention implementation the models load with (auto: transformers' default)",
                            ATTENTIONS)
    trust_remote_code: bool = option(False, "allow the model repo's own Python code to run (off by default)")


@dataclass
class LoRA:
    """LoRA (through peft)"""

    lora_r: int = option(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: float = option(16.0, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: str = option("all-linear", "comma-separated module names for LoRA, or all-linear")

    RANGES = {"lora_r": ">= 0", "lora_alpha": "> 0", "lora_dropout": "[0, 1)"}


@dataclass
class Run:
    """logging and the output folder"""

    log_every: int = option(1, "log metrics every N steps")
    progress: bool = option(True, "show a progress bar")
    save_model: bool = option(True, "write the trained model to OUTPUT/model at the end")
    overwrite: bool = option(False, "replace an existing run in OUTPUT")

    RANGES = {"log_every": ">= 1"}


@dataclass
class Checkpoints:
    """checkpoints and resume"""

    save_every: int = option(0, "write a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, "keep the newest K checkpoints")
    resume: str = option("", "resume: 'auto' (newest valid checkpoint in OUTPUT) or a checkpoint path; the run's "
                             "settings come from OUTPUT/config.yaml, so --output alone is enough")

    RANGES = {"save_every": ">= 0", "keep_checkpoints": ">= 1"}
    PATHS = ("resume",)
