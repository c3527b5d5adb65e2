"""The settings of the online commands (grpo, iterate, ppo), apart from their loops.

Import-light (no torch): `prefalign --help` builds every command's flags from these fields.
Each field's metadata holds its flag's help (and choices); the loops re-export the classes.
The groups several commands share (sampling, AdamW, loading, LoRA, ...) live in field_groups.
"""

from __future__ import annotations

import os

from prefalign.errors import UserError
from prefalign.field_groups import LR_SCHEDULES, AdamW, Checkpoints, Loading, LoRA, Rewards, Run, Sampling
from prefalign.fields import check, option, settings

SCALES = ("group", "batch", "none")  # losses.grpo's (a test holds them equal; this module stays torch-free)
AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


@settings
class GRPOConfig(Rewards, Sampling, AdamW, Loading, LoRA, Run):
    """Every knob of a GRPO run (also the flags of `prefalign grpo`: steps <-> --steps)."""

    model: str = option("", 'path or hub id (unless a model object is passed)')
    tokenizer: str = option("", "tokenizer path or hub id (empty: the model's)")
    ref_model: str = option("", 'reference for the KL term (empty: a frozen copy of the initial policy)')
    output: str = option("", 'output directory')
    steps: int = option(100, 'GRPO steps (generation batches)')
    prompts_per_step: int = option(8, 'prompts per step (P)')
    group_size: int = option(8, 'G samples per prompt')
    # the objective
    scale: str = option("group", 'advantage scaling: group | batch | none (Dr. GRPO)', SCALES)
    aggregation: str = option("grpo", 'loss aggregation: grpo, dr_grpo (constant normalizer), dapo (token mean)',
                              AGGREGATIONS)
    clip_eps: float = option(0.2, 'PPO clip epsilon')
    clip_eps_high: float = option(0.0, "upper clip epsilon; 0 = clip_eps (DAPO's clip-higher sets e.g. 0.28)")
    kl_coef: float = option(0.0, 'KL coefficient to the reference (TRL: beta); 0 = no reference model is loaded')
    mu: int = option(1, 'optimizer steps per generation batch')
    micro_batch: int = option(0, 'completions per forward/backward (0 = the whole batch)')
    lr: float = option(1e-6, 'learning rate (AdamW)')
    lr_schedule: str = option("constant", 'learning-rate schedule after warm-up', LR_SCHEDULES)
    lora_r: int = option(0, 'LoRA rank (0 = full fine-tuning); with kl_coef > 0 and no ref_model the reference is '
                            'the policy with its adapters off')
    qlora: bool = option(False, 'load the base in 4-bit (bitsandbytes, GPU only) and train LoRA on it')
    chunk_size: int = option(0, 'tokens per chunk of the log-prob head (0 = automatic)')
    packing: bool = option(True, 'one segment [prompt | G completions] per group, no padding; off = padded rows')
    token_budget: int = option(0, 'tokens per packed row (0 = the longest group of the micro-batch)')
    seed: int = option(0, 'random seed')

    # The documented range of every numeric field (validation.Range specs, shown in the flags' help;
    # each also refuses nan and inf; the groups' ranges are merged in). group_size >= 2: advantages
    # compare the samples of a group.
    RANGES = {
        "steps": ">= 1", "prompts_per_step": ">= 1", "group_size": ">= 2", "clip_eps": "(0, 1)",
        "clip_eps_high": ">= 0", "kl_coef": ">= 0", "mu": ">= 1", "micro_batch": ">= 0", "lr": "(0, 1)",
        "chunk_size": ">= 0", "token_budget": ">= 0", "seed": "[0, 2**32)",
    }
    PATHS = ("model", "tokenizer", "ref_model", "output")
    ALIASES = {"beta": "kl_coef"}  # TRL GRPOConfig's name (a YAML key and a flag; see trl_keys.translate)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.check_rewards("grpo config")
        check(self, "grpo config")
        if self.qlora and not self.lora_r:
            raise UserError("grpo config: qlora needs LoRA (set lora_r > 0)")


REFERENCES = ("fixed", "moving")  # IterativeConfig.ref_update


@settings
class IterativeConfig(Rewards, Sampling, Loading):
    """Every knob of an iterative DPO run (also the flags of `prefalign iterate`)."""

    model: str = option("", 'model: a local path or a hub id')
    tokenizer: str = option("", "tokenizer path or hub id (empty: the model's)")
    output: str = option("", 'output directory')
    rounds: int = option(3, 'rounds of generate -> score -> pairs -> DPO')
    prompts_per_round: int = option(64, 'prompts sampled per round')
    samples: int = option(8, 'completions per prompt')
    # pairs
    min_gap: float = option(0.0, 'a pair needs chosen - rejected reward >= min_gap (and > 0)')
    pairs_per_prompt: int = option(1, 'best-vs-worst pairs kept per prompt')
    ref_update: str = option("fixed", "each round's reference: fixed (the start model) or moving (the round's starting "
                                  "policy)", REFERENCES)
    # DPO in each round (any TrainConfig key can be set through train_overrides)
    loss: str = option("dpo", 'the paired loss of each round (see `prefalign losses`)')
    beta: float = option(0.1, 'DPO beta')
    lr: float = option(5e-7, 'learning rate (AdamW)')
    dpo_steps: int = option(0, "optimizer steps per round (0 = `epochs` over the round's pairs)")
    epochs: float = option(1.0, "epochs over the round's pairs when --dpo-steps is 0")
    batch_size: int = option(8, 'pairs per DPO step')
    seed: int = option(0, 'random seed')
    train_overrides: dict = option({}, 'prefalign train keys for each round (--set)')
    progress: bool = option(True, 'show a progress bar')
    save_model: bool = option(True, 'write the trained model to OUTPUT/model at the end')
    overwrite: bool = option(False, 'replace an existing run in OUTPUT')

    # The documented range of every numeric field (validation.Range specs, shown in the flags' help;
    # each also refuses nan and inf). samples >= 2: a pair needs two completions; temperature > 0:
    # pairs need diverse samples. The DPO keys are checked again by the trainer's config.
    RANGES = {
        "rounds": ">= 1", "prompts_per_round": ">= 1", "samples": ">= 2", "min_gap": ">= 0", "pairs_per_prompt": ">= 1",
        "beta": "> 0", "lr": "(0, 1)", "dpo_steps": ">= 0", "epochs": "> 0", "batch_size": ">= 1",
        "seed": "[0, 2**31)",  # round r trains with seed + r, which must stay in the trainer's [0, 2**32)
    }
    PATHS = ("model", "tokenizer", "output")
    ALIASES = {"reference": "ref_update"}  # its name before ref_update (a YAML key and a flag)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.check_rewards("iterate config")
        check(self, "iterate config")
        from prefalign.losses import get_loss

        if get_loss(self.loss).kind != "paired":  # unknown names: a UserError with a suggestion
            raise UserError(f"iterate config: loss {self.loss} is not a paired loss; rounds build pairs")
        self.train_config(os.path.join(self.output or ".", "round-1"), "pairs.jsonl", 1)  # validates the DPO keys

    def train_config(self, output: str, data: str, round_: int):
        """The offline trainer's config for one round."""
        from prefalign import config

        values = dict(data=data, output=output, loss=self.loss, beta=self.beta, lr=self.lr, max_steps=self.dpo_steps,
                      epochs=self.epochs, batch_size=self.batch_size, precision=self.precision,
                      seed=self.seed + round_, max_prompt_length=self.max_prompt_length,
                      max_length=self.max_prompt_length + self.max_new_tokens + 1,  # + the EOS the data adds
                      attention=self.attention, trust_remote_code=self.trust_remote_code,
                      progress=self.progress, overwrite=True, save_model=False)
        values.update(self.train_overrides)
        return config.build(values, where="iterate")


@settings
class PPOConfig(Rewards, Sampling, AdamW, Loading, LoRA, Checkpoints, Run):
    """Every knob of a PPO-RLHF run (also the flags of `prefalign ppo`: steps <-> --steps)."""

    model: str = option("", 'the policy to train (usually an SFT model): a path or hub id')
    tokenizer: str = option("", "tokenizer path or hub id (empty: the model's)")
    ref_model: str = option("", 'reference for the KL penalty (empty: a frozen copy of the initial policy)')
    value_model: str = option("", 'where the value model starts: a causal LM or reward model folder (its body; a '
                              'one-output head too); empty: the reward model of an rm:PATH reward, else the policy')
    output: str = option("", 'output directory')
    steps: int = option(100, 'PPO steps (generation batches)')
    prompts_per_step: int = option(16, 'prompts per step: one completion each')
    # the objective
    kl_coef: float = option(0.05, 'KL penalty coefficient: r_t = -kl_coef (log pi - log pi_ref) per token (the start '
                              'value when kl_target is set)')
    kl_target: float = option(0.0, 'adaptive KL controller target (KL per completion, summed over tokens); '
                               '0 = fixed kl_coef')
    kl_horizon: float = option(10000.0, 'adaptive KL controller horizon, in completions (Ziegler et al.)')
    gamma: float = option(1.0, 'GAE discount')
    lam: float = option(0.95, 'GAE lambda')
    clip_eps: float = option(0.2, 'policy ratio clip epsilon')
    value_clip: float = option(0.2, 'value clip range around the rollout values')
    ppo_epochs: int = option(4, 'passes over each generation batch')
    mini_batch: int = option(0, 'completions per optimizer step (0 = the whole batch); divides prompts_per_step')
    micro_batch: int = option(0, 'completions per forward/backward (0 = the whole mini-batch)')
    lr: float = option(1e-6, 'policy learning rate (AdamW)')
    value_lr: float = option(0.0, 'value model learning rate (0 = lr)')
    lr_schedule: str = option("constant", 'learning-rate schedule after warm-up', LR_SCHEDULES)
    max_grad_norm: float = option(1.0, 'gradient clipping norm, per model (0 = off)')
    lora_r: int = option(0, "the policy's LoRA rank (0 = full fine-tuning); with no ref_model the reference is "
                            "the policy with its adapters off; the value model trains in full")
    chunk_size: int = option(0, 'tokens per chunk of the log-prob head (0 = automatic)')
    packing: bool = option(True, 'pack [prompt | completion] segments side by side, no padding; off = padded rows')
    token_budget: int = option(0, 'tokens per packed row (0 = the longest segment of the micro-batch)')
    seed: int = option(0, 'random seed')
    resume: str = option("", 'continue from a checkpoint: auto (the newest valid one in OUTPUT) or a step-N path')
    save_model: bool = option(True, 'write the trained policy to OUTPUT/model at the end')

    RANGES = {
        "steps": ">= 1", "prompts_per_step": ">= 1", "kl_coef": ">= 0", "kl_target": ">= 0", "kl_horizon": "> 0",
        "gamma": "[0, 1]", "lam": "[0, 1]", "clip_eps": "(0, 1)", "value_clip": "> 0", "ppo_epochs": ">= 1",
        "mini_batch": ">= 0", "micro_batch": ">= 0", "lr": "(0, 1)", "value_lr": "[0, 1)", "chunk_size": ">= 0",
        "token_budget": ">= 0", "seed": "[0, 2**32)",
    }
    PATHS = ("model", "tokenizer", "ref_model", "value_model", "output")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.check_rewards("ppo config")
        check(self, "ppo config")
        if self.mini_batch and self.prompts_per_step % self.mini_batch:
            raise UserError(f"ppo config: mini_batch {self.mini_batch} does not divide prompts_per_step "
                            f"{self.prompts_per_step}")

    @property
    def minibatches_per_epoch(self) -> int:
        return self.prompts_per_step // (self.mini_batch or self.prompts_per_step)
