"""The settings of the online commands (grpo, iterate), apart from their loops.

Import-light (no torch): `prefalign --help` builds every command's flags from these fields.
Each field's metadata holds its flag's help (and choices); the loops re-export the classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prefalign.errors import UserError
from prefalign.hardware import HELP, PRECISIONS
from prefalign.validation import check_table

ATTENTIONS = ("auto", "sdpa", "eager", "flex_attention")  # TrainConfig.attention's choices


def _h(default, help: str, choices=None):
    """A field with its flag's help and choices."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class GRPOConfig:
    """Every knob of a GRPO run (also the flags of `prefalign grpo`: steps <-> --steps)."""

    model: str = _h("", 'path or hub id (unless a model object is passed)')
    tokenizer: str = _h("", "tokenizer path or hub id (empty: the model's)")
    ref_model: str = _h("", 'reference for the KL term (empty: a frozen copy of the initial policy)')
    prompts: str = _h("", 'prompt file (jsonl/json/parquet/csv): a `prompt` column + extra columns')
    reward: list = _h([], 'reward specs (see online.rewards.load_reward)')
    reward_weights: list = _h([], 'one weight per reward (empty: 1 each)')
    output: str = _h("", 'output directory')
    # sampling
    steps: int = _h(100, 'GRPO steps (generation batches)')
    prompts_per_step: int = _h(8, 'prompts per step (P)')
    group_size: int = _h(8, 'G samples per prompt')
    max_new_tokens: int = _h(64, 'new tokens per completion')
    max_prompt_length: int = _h(512, 'max prompt tokens')
    temperature: float = _h(1.0, 'sampling temperature')
    top_p: float = _h(1.0, 'nucleus sampling p')
    top_k: int = _h(0, 'top-k sampling (0 = off)')
    generation_batch_size: int = _h(64, 'rows decoded together')
    # the objective
    scale: str = _h("group", 'advantage scaling: group | batch | none (Dr. GRPO)', ("group", "batch", "none"))
    aggregation: str = _h("grpo", 'loss aggregation: grpo, dr_grpo (constant normalizer), dapo (token mean)', ("grpo", "dr_grpo", "dapo"))
    clip_eps: float = _h(0.2, 'PPO clip epsilon')
    clip_eps_high: float = _h(0.0, "upper clip epsilon; 0 = clip_eps (DAPO's clip-higher sets e.g. 0.28)")
    kl_coef: float = _h(0.0, 'KL coefficient to the reference (TRL: beta); 0 = no reference model is loaded')
    mu: int = _h(1, 'optimizer steps per generation batch')
    micro_batch: int = _h(0, 'completions per forward/backward (0 = the whole batch)')
    # optimisation
    lr: float = _h(1e-6, 'learning rate (AdamW)')
    warmup_steps: int = _h(0, 'linear warm-up, in optimizer steps')
    lr_schedule: str = _h("constant", 'learning-rate schedule after warm-up', ("constant", "linear", "cosine"))
    weight_decay: float = _h(0.0, 'AdamW weight decay')
    adam_beta1: float = _h(0.9, 'AdamW beta1')
    adam_beta2: float = _h(0.999, 'AdamW beta2')
    max_grad_norm: float = _h(1.0, 'gradient clipping norm (0 = off)')
    precision: str = _h("fp32", HELP, PRECISIONS)
    # the models (loaded as `prefalign train` loads them: prefalign.prepare)
    attention: str = _h("auto", "attention implementation the models load with (auto: transformers' default)",
                        ATTENTIONS)
    trust_remote_code: bool = _h(False, "allow the model repo's own Python code to run (off by default)")
    lora_r: int = _h(0, 'LoRA rank (0 = full fine-tuning); with kl_coef > 0 and no ref_model the reference is '
                        'the policy with its adapters off')
    lora_alpha: float = _h(16.0, 'LoRA alpha')
    lora_dropout: float = _h(0.0, 'LoRA dropout')
    lora_target_modules: str = _h("all-linear", 'comma-separated module names for LoRA, or all-linear')
    qlora: bool = _h(False, 'load the base in 4-bit (bitsandbytes, GPU only) and train LoRA on it')
    chunk_size: int = _h(0, 'tokens per chunk of the log-prob head (0 = automatic)')
    packing: bool = _h(True, 'one segment [prompt | G completions] per group, no padding; off = padded rows')
    token_budget: int = _h(0, 'tokens per packed row (0 = the longest group of the micro-batch)')
    seed: int = _h(0, 'random seed')
    # run
    log_every: int = _h(1, 'log metrics every N steps')
    progress: bool = _h(True, 'show a progress bar')
    save_model: bool = _h(True, 'write the trained model to OUTPUT/model at the end')
    overwrite: bool = _h(False, 'replace an existing run in OUTPUT')

    # The documented range of every numeric field (validation.Range specs, shown in the flags' help;
    # each also refuses nan and inf). group_size >= 2: advantages compare the samples of a group.
    RANGES = {
        "reward_weights": "finite", "steps": ">= 1", "prompts_per_step": ">= 1", "group_size": ">= 2",
        "max_new_tokens": ">= 1", "max_prompt_length": ">= 1", "temperature": "> 0", "top_p": "(0, 1]",
        "top_k": ">= 0", "generation_batch_size": ">= 1", "clip_eps": "(0, 1)", "clip_eps_high": ">= 0",
        "kl_coef": ">= 0", "mu": ">= 1", "micro_batch": ">= 0", "lr": "(0, 1)", "warmup_steps": ">= 0",
        "weight_decay": ">= 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "max_grad_norm": ">= 0",
        "chunk_size": ">= 0", "token_budget": ">= 0", "seed": "[0, 2**32)", "log_every": ">= 1",
        "lora_r": ">= 0", "lora_alpha": "> 0", "lora_dropout": "[0, 1)",
    }
    PATHS = ("model", "tokenizer", "ref_model", "prompts", "output")
    ALIASES = {"beta": "kl_coef"}  # TRL GRPOConfig's name (a YAML key and a flag; see trl_keys.translate)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        check_table(self, self.RANGES, "grpo config")
        from prefalign.losses.grpo import AGGREGATIONS, SCALES  # torch: only when a run is configured

        checks = [
            (self.scale in SCALES, f"scale must be one of {', '.join(SCALES)}; got {self.scale!r}"),
            (self.aggregation in AGGREGATIONS, f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {self.aggregation!r}"),
            (self.lr_schedule in ("constant", "linear", "cosine"), f"lr_schedule must be constant, linear or cosine; got {self.lr_schedule!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"),
            (self.attention in ATTENTIONS, f"attention must be one of {', '.join(ATTENTIONS)}; got {self.attention!r}"),
            (not self.qlora or self.lora_r > 0, "qlora needs LoRA (set lora_r > 0)"),
            (not self.reward_weights or len(self.reward_weights) == len(self.reward),
             f"{len(self.reward_weights)} reward weights for {len(self.reward)} rewards"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"grpo config: {msg}")


REFERENCES = ("fixed", "moving")  # IterativeConfig.ref_update


@dataclass
class IterativeConfig:
    """Every knob of an iterative DPO run (also the flags of `prefalign iterate`)."""

    model: str = _h("", 'model: a local path or a hub id')
    tokenizer: str = _h("", "tokenizer path or hub id (empty: the model's)")
    prompts: str = _h("", 'prompt file: a `prompt` column + extra columns for the reward')
    reward: list = _h([], 'reward specs (module:function, exact_answer, regex=..., a reward model)')
    reward_weights: list = _h([], 'one weight per reward (empty: 1 each)')
    output: str = _h("", 'output directory')
    # rounds and sampling
    rounds: int = _h(3, 'rounds of generate -> score -> pairs -> DPO')
    prompts_per_round: int = _h(64, 'prompts sampled per round')
    samples: int = _h(8, 'completions per prompt')
    max_new_tokens: int = _h(64, 'new tokens per completion')
    max_prompt_length: int = _h(512, 'max prompt tokens')
    temperature: float = _h(1.0, 'sampling temperature')
    top_p: float = _h(1.0, 'nucleus sampling p')
    top_k: int = _h(0, 'top-k sampling (0 = off)')
    generation_batch_size: int = _h(64, 'rows decoded together')
    # pairs
    min_gap: float = _h(0.0, 'a pair needs chosen - rejected reward >= min_gap (and > 0)')
    pairs_per_prompt: int = _h(1, 'best-vs-worst pairs kept per prompt')
    ref_update: str = _h("fixed", "each round's reference: fixed (the start model) or moving (the round's starting "
                                  "policy)", REFERENCES)
    # DPO in each round (any TrainConfig key can be set through train_overrides)
    loss: str = _h("dpo", 'the paired loss of each round (see `prefalign losses`)')
    beta: float = _h(0.1, 'DPO beta')
    lr: float = _h(5e-7, 'learning rate (AdamW)')
    dpo_steps: int = _h(0, "optimizer steps per round (0 = `epochs` over the round's pairs)")
    epochs: float = _h(1.0, "epochs over the round's pairs when --dpo-steps is 0")
    batch_size: int = _h(8, 'pairs per DPO step')
    precision: str = _h("fp32", HELP, PRECISIONS)
    attention: str = _h("auto", "attention implementation the model loads with (auto: transformers' default)",
                        ATTENTIONS)
    trust_remote_code: bool = _h(False, "allow the model repo's own Python code to run (off by default)")
    seed: int = _h(0, 'random seed')
    train_overrides: dict = _h({}, 'prefalign train keys for each round (--set)')
    progress: bool = _h(True, 'show a progress bar')
    save_model: bool = _h(True, 'write the trained model to OUTPUT/model at the end')
    overwrite: bool = _h(False, 'replace an existing run in OUTPUT')

    # The documented range of every numeric field (validation.Range specs, shown in the flags' help;
    # each also refuses nan and inf). samples >= 2: a pair needs two completions; temperature > 0:
    # pairs need diverse samples. The DPO keys are checked again by the trainer's config.
    RANGES = {
        "reward_weights": "finite", "rounds": ">= 1", "prompts_per_round": ">= 1", "samples": ">= 2",
        "max_new_tokens": ">= 1", "max_prompt_length": ">= 1", "temperature": "> 0", "top_p": "(0, 1]",
        "top_k": ">= 0", "generation_batch_size": ">= 1", "min_gap": ">= 0", "pairs_per_prompt": ">= 1",
        "beta": "> 0", "lr": "(0, 1)", "dpo_steps": ">= 0", "epochs": "> 0", "batch_size": ">= 1",
        "seed": "[0, 2**31)",  # round r trains with seed + r, which must stay in the trainer's [0, 2**32)
    }
    PATHS = ("model", "tokenizer", "prompts", "output")
    ALIASES = {"reference": "ref_update"}  # its name before ref_update (a YAML key and a flag)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        check_table(self, self.RANGES, "iterate config")
        checks = [
            (self.ref_update in REFERENCES, f"ref_update must be fixed or moving; got {self.ref_update!r}"),
            (self.attention in ATTENTIONS, f"attention must be one of {', '.join(ATTENTIONS)}; got {self.attention!r}"),
            (not self.reward_weights or len(self.reward_weights) == len(self.reward),
             f"{len(self.reward_weights)} reward weights for {len(self.reward)} rewards"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"iterate config: {msg}")
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


@dataclass
class PPOConfig:
    """Every knob of a PPO-RLHF run (also the flags of `prefalign ppo`: steps <-> --steps)."""

    model: str = _h("", 'the policy to train (usually an SFT model): a path or hub id')
    tokenizer: str = _h("", "tokenizer path or hub id (empty: the model's)")
    ref_model: str = _h("", 'reference for the KL penalty (empty: a frozen copy of the initial policy)')
    value_model: str = _h("", 'where the value model starts: a causal LM or reward model folder (its body; a '
                              'one-output head too); empty: the reward model of an rm:PATH reward, else the policy')
    prompts: str = _h("", 'prompt file (jsonl/json/parquet/csv): a `prompt` column + extra columns')
    reward: list = _h([], 'reward specs (see online.rewards.load_reward; rm:PATH for a trained reward model)')
    reward_weights: list = _h([], 'one weight per reward (empty: 1 each)')
    output: str = _h("", 'output directory')
    # sampling: one completion per prompt
    steps: int = _h(100, 'PPO steps (generation batches)')
    prompts_per_step: int = _h(16, 'prompts per step: one completion each')
    max_new_tokens: int = _h(64, 'new tokens per completion')
    max_prompt_length: int = _h(512, 'max prompt tokens')
    temperature: float = _h(1.0, 'sampling temperature')
    top_p: float = _h(1.0, 'nucleus sampling p')
    top_k: int = _h(0, 'top-k sampling (0 = off)')
    generation_batch_size: int = _h(64, 'rows decoded together')
    # the objective
    kl_coef: float = _h(0.05, 'KL penalty coefficient: r_t = -kl_coef (log pi - log pi_ref) per token (the start '
                              'value when kl_target is set)')
    kl_target: float = _h(0.0, 'adaptive KL controller target (KL per completion, summed over tokens); '
                               '0 = fixed kl_coef')
    kl_horizon: float = _h(10000.0, 'adaptive KL controller horizon, in completions (Ziegler et al.)')
    gamma: float = _h(1.0, 'GAE discount')
    lam: float = _h(0.95, 'GAE lambda')
    clip_eps: float = _h(0.2, 'policy ratio clip epsilon')
    value_clip: float = _h(0.2, 'value clip range around the rollout values')
    ppo_epochs: int = _h(4, 'passes over each generation batch')
    mini_batch: int = _h(0, 'completions per optimizer step (0 = the whole batch); divides prompts_per_step')
    micro_batch: int = _h(0, 'completions per forward/backward (0 = the whole mini-batch)')
    # optimisation
    lr: float = _h(1e-6, 'policy learning rate (AdamW)')
    value_lr: float = _h(0.0, 'value model learning rate (0 = lr)')
    warmup_steps: int = _h(0, 'linear warm-up, in optimizer steps')
    lr_schedule: str = _h("constant", 'learning-rate schedule after warm-up', ("constant", "linear", "cosine"))
    weight_decay: float = _h(0.0, 'AdamW weight decay')
    adam_beta1: float = _h(0.9, 'AdamW beta1')
    adam_beta2: float = _h(0.999, 'AdamW beta2')
    max_grad_norm: float = _h(1.0, 'gradient clipping norm, per model (0 = off)')
    precision: str = _h("fp32", HELP, PRECISIONS)
    attention: str = _h("auto", "attention implementation the models load with (auto: transformers' default)",
                        ATTENTIONS)
    trust_remote_code: bool = _h(False, "allow the model repo's own Python code to run (off by default)")
    chunk_size: int = _h(0, 'tokens per chunk of the log-prob head (0 = automatic)')
    packing: bool = _h(True, 'pack [prompt | completion] segments side by side, no padding; off = padded rows')
    token_budget: int = _h(0, 'tokens per packed row (0 = the longest segment of the micro-batch)')
    seed: int = _h(0, 'random seed')
    # run
    log_every: int = _h(1, 'log metrics every N steps')
    save_every: int = _h(0, 'checkpoint every N steps (0 = only at the end)')
    keep_checkpoints: int = _h(2, 'checkpoints kept')
    resume: str = _h("", 'continue from a checkpoint: auto (the newest valid one in OUTPUT) or a step-N path')
    progress: bool = _h(True, 'show a progress bar')
    save_model: bool = _h(True, 'write the trained policy to OUTPUT/model at the end')
    overwrite: bool = _h(False, 'replace an existing run in OUTPUT')

    RANGES = {
        "reward_weights": "finite", "steps": ">= 1", "prompts_per_step": ">= 1", "max_new_tokens": ">= 1",
        "max_prompt_length": ">= 1", "temperature": "> 0", "top_p": "(0, 1]", "top_k": ">= 0",
        "generation_batch_size": ">= 1", "kl_coef": ">= 0", "kl_target": ">= 0", "kl_horizon": "> 0",
        "gamma": "[0, 1]", "lam": "[0, 1]", "clip_eps": "(0, 1)", "value_clip": "> 0", "ppo_epochs": ">= 1",
        "mini_batch": ">= 0", "micro_batch": ">= 0", "lr": "(0, 1)", "value_lr": "[0, 1)", "warmup_steps": ">= 0",
        "weight_decay": ">= 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "max_grad_norm": ">= 0",
        "chunk_size": ">= 0", "token_budget": ">= 0", "seed": "[0, 2**32)", "log_every": ">= 1",
        "save_every": ">= 0", "keep_checkpoints": ">= 1",
    }
    PATHS = ("model", "tokenizer", "ref_model", "value_model", "prompts", "output")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        check_table(self, self.RANGES, "ppo config")
        checks = [
            (self.lr_schedule in ("constant", "linear", "cosine"),
             f"lr_schedule must be constant, linear or cosine; got {self.lr_schedule!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"),
            (self.attention in ATTENTIONS, f"attention must be one of {', '.join(ATTENTIONS)}; got {self.attention!r}"),
            (not self.reward_weights or len(self.reward_weights) == len(self.reward),
             f"{len(self.reward_weights)} reward weights for {len(self.reward)} rewards"),
            (not self.mini_batch or self.prompts_per_step % self.mini_batch == 0,
             f"mini_batch {self.mini_batch} does not divide prompts_per_step {self.prompts_per_step}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"ppo config: {msg}")

    @property
    def minibatches_per_epoch(self) -> int:
        return self.prompts_per_step // (self.mini_batch or self.prompts_per_step)
