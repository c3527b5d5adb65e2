"""The settings of the online commands (grpo, iterate, compare), apart from their loops.

Import-light (no torch): `prefalign --help` builds every command's flags from these fields.
Each field's metadata holds its flag's help (and choices); the loops re-export the classes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from prefalign.errors import UserError
from prefalign.experiments.rlhf import DEFAULT_PPO_REWARD, PPO_REWARDS, RLHFBudget  # import-light: no torch
from prefalign.hardware import HELP, PRECISIONS
from prefalign.validation import check_table


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
    beta: float = _h(0.0, 'KL coefficient; 0 = no reference model is loaded')
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
        "beta": ">= 0", "mu": ">= 1", "micro_batch": ">= 0", "lr": "(0, 1)", "warmup_steps": ">= 0",
        "weight_decay": ">= 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "max_grad_norm": ">= 0",
        "chunk_size": ">= 0", "token_budget": ">= 0", "seed": "[0, 2**32)", "log_every": ">= 1",
    }
    PATHS = ("model", "tokenizer", "ref_model", "prompts", "output")

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
            (not self.reward_weights or len(self.reward_weights) == len(self.reward),
             f"{len(self.reward_weights)} reward weights for {len(self.reward)} rewards"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"grpo config: {msg}")


REFERENCES = ("fixed", "moving")


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
    reference: str = _h("fixed", "each round's reference: fixed (the start model) or moving (the round's starting policy)", REFERENCES)
    # DPO in each round (any TrainConfig key can be set through train_overrides)
    loss: str = _h("dpo", 'the paired loss of each round (see `prefalign losses`)')
    beta: float = _h(0.1, 'DPO beta')
    lr: float = _h(5e-7, 'learning rate (AdamW)')
    dpo_steps: int = _h(0, "optimizer steps per round (0 = `epochs` over the round's pairs)")
    epochs: float = _h(1.0, "epochs over the round's pairs when --dpo-steps is 0")
    batch_size: int = _h(8, 'pairs per DPO step')
    precision: str = _h("fp32", HELP, PRECISIONS)
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

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        check_table(self, self.RANGES, "iterate config")
        checks = [
            (self.reference in REFERENCES, f"reference must be fixed or moving; got {self.reference!r}"),
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
                      progress=self.progress, overwrite=True, save_model=False)
        values.update(self.train_overrides)
        return config.build(values, where="iterate")


METHODS = ("sft", "dpo", "iterative", "grpo", "ppo")
LABELS = {"sft": "SFT (start)", "dpo": "offline DPO", "iterative": "iterative DPO", "grpo": "GRPO",
          "ppo": "RLHF (RM + PPO)"}
DEMO_REWARD = "prefalign.demo.task:reward"   # the demo's verifier: 1 if the answer is right and well formed


def _f(default, help: str, type_=None, choices=None):
    """A CompareSettings field with its flag's help (and argparse type, for fields that default to None)."""
    meta = {"help": help, "choices": choices, **({"type": type_} if type_ else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# The settings that default to None take their value from the task: on the demo task from
# prefalign.demo.pipeline.DemoSettings (the tuned demo: one source of truth, no copy here), on a
# user's task from USER_DEFAULTS (a real LM: the library's iterative-DPO defaults for lr and beta).
DEMO_FIELDS = {  # CompareSettings field -> DemoSettings field
    "heldout": "n_heldout", "temperature": "temperature", "sample_prompts": "dpo_prompts", "samples": "samples",
    "pairs_per_prompt": "pairs_per_prompt", "dpo_steps": "dpo_steps", "dpo_batch": "dpo_batch",
    "dpo_lr": "dpo_lr", "beta": "beta", "threads": "threads",
}
USER_DEFAULTS = {
    "heldout": 200, "max_new_tokens": 64, "temperature": 1.0, "sample_prompts": 512, "samples": 8,
    "pairs_per_prompt": 1, "dpo_steps": 150, "dpo_batch": 32,
    "dpo_lr": IterativeConfig.__dataclass_fields__["lr"].default,
    "beta": IterativeConfig.__dataclass_fields__["beta"].default, "threads": 0,
}


@dataclass
class CompareSettings:
    output: str = _f("runs/compare", "output folder: report.md, results.json, plots/, one folder per seed and method "
                                     "(the demo's SFT model is cached in OUTPUT/seed-S/sft)")
    seeds: int = _f(1, "seeds: each method runs once per seed (and the demo's SFT model is trained per seed)")
    methods: list = _f(["dpo", "iterative", "grpo", "ppo"], "methods to compare with the SFT model: dpo iterative "
                                                              "grpo ppo (space- or comma-separated; ppo needs dpo: "
                                                              "its reward model trains on offline DPO's pairs)")
    same_start: bool = _f(False, "every seed starts from seed 0's SFT model and held-out prompts: the seeds vary only "
                                 "the methods' own sampling and data order (their stability), and SFT trains once")
    # a user's task (all empty: the demo task)
    model: str = _f("", "your SFT model (path or hub id) every method starts from; empty: the demo task")
    prompts: str = _f("", "your training prompts (jsonl/json/parquet/csv): a `prompt` column + what the reward "
                          "needs, e.g. `answer`")
    eval_prompts: str = _f("", "your held-out prompts; empty: the last --heldout rows of --prompts")
    sft_from: str = _f("", "demo task: reuse the SFT model of a `prefalign demo --output DIR` (DIR/sft) or of an "
                           "earlier compare (DIR/seed-S/sft) instead of training one; its settings must match")
    heldout: int = _f(None, "held-out prompts scored", int)
    reward: list = _f([], "reward specs (module:function, exact_answer, regex=..., a reward model); "
                          "empty on the demo: its verifier")
    max_new_tokens: int = _f(None, "new tokens per completion", int)
    temperature: float = _f(None, "sampling temperature for training samples", float)
    # the shared sampling + DPO budget of (a) and (b)
    sample_prompts: int = _f(None, "DPO: training prompts sampled in total (iterative: split over the rounds)", int)
    samples: int = _f(None, "completions per prompt (DPO pairs and GRPO groups)", int)
    pairs_per_prompt: int = _f(None, "DPO: best-vs-worst pairs kept per prompt", int)
    min_gap: float = _f(0.5, "DPO: a pair needs chosen - rejected reward >= this")
    dpo_steps: int = _f(None, "DPO: optimizer steps in total (iterative: split over the rounds)", int)
    dpo_batch: int = _f(None, "DPO: pairs per step", int)
    dpo_lr: float = _f(None, "DPO: learning rate (constant)", float)
    beta: float = _f(None, "DPO: beta", float)
    rounds: int = _f(3, "iterative DPO: rounds (offline DPO is one round)")
    # Why moving: on the demo task a fixed reference lets the rounds drift (round 3's samples scored
    # 0.62 after 0.72 in round 2; DPO logratio/pairs -0.39 -> -1.34; held-out 0.80); with the reference
    # moved to each round's starting policy the rounds keep improving (0.60 -> 0.72 -> 0.77) and the
    # held-out score is 0.92 (docs/compare.md).
    reference: str = _f("moving", "iterative DPO's reference: moving (each round's starting policy) | fixed "
                                  "(the SFT model)")
    # GRPO (compare's own numbers: no DemoSettings counterpart). Checked on the demo task with the tuned
    # SFT model (docs/compare.md): 100 steps x 32 prompts x 8 samples at lr 3e-4 take the held-out
    # score from 0.61 to ~0.94 in about a minute; the verifier's 0/1 reward leaves signal in most
    # groups because the SFT model is right ~60% of the time. They needed no change.
    grpo_steps: int = _f(100, "GRPO: steps (generation batches)")
    grpo_prompts: int = _f(32, "GRPO: prompts per step (x --samples completions each)")
    grpo_lr: float = _f(3e-4, "GRPO: learning rate (constant)")
    grpo_beta: float = _f(0.04, "GRPO: KL coefficient to the SFT model (0: no reference)")
    grpo_mu: int = _f(1, "GRPO: optimizer steps per generation batch")
    grpo_scale: str = _f("none", "GRPO advantage scaling: group | batch | none (Dr. GRPO: no std scaling)")
    grpo_aggregation: str = _f("dr_grpo", "GRPO loss aggregation: grpo | dr_grpo (constant normalizer, no length "
                                          "bias) | dapo")
    # RLHF: a reward model on offline DPO's pairs, then PPO (experiments/rlhf.py; docs/compare.md)
    ppo_reward: str = _f(DEFAULT_PPO_REWARD, "PPO's reward: rm (a Bradley-Terry reward model trained on offline "
                                             "DPO's pairs: the RLHF pipeline) | verifier (the task's reward, as GRPO)",
                         choices=PPO_REWARDS)
    rm_steps: int = _f(RLHFBudget.rm_steps, "RLHF: reward-model steps (of --rm-batch pairs)")
    rm_batch: int = _f(RLHFBudget.rm_batch, "RLHF: reward-model pairs per step")
    rm_lr: float = _f(RLHFBudget.rm_lr, "RLHF: reward-model learning rate (constant)")
    ppo_steps: int = _f(RLHFBudget.ppo_steps, "PPO: steps (generation batches)")
    ppo_prompts: int = _f(RLHFBudget.ppo_prompts, "PPO: prompts per step (one completion each)")
    ppo_kl_coef: float = _f(0.1, "PPO: KL penalty coefficient (per token, to the SFT model)")
    ppo_lr: float = _f(RLHFBudget.ppo_lr, "PPO: policy and value learning rate (constant)")
    # running
    threads: int = _f(None, "torch threads per process (0: torch's default)", int)
    isolate: bool = _f(True, "one fresh process per (method, seed): honest peak memory")
    quick: bool = _f(False, "a reduced run (seconds; the story need not hold): for tests")

    # The documented range of every numeric setting (validation.Range specs, shown in the flags' help;
    # each also refuses nan and inf). None (the task's default) is not checked here.
    RANGES = {
        "seeds": ">= 1", "heldout": ">= 1", "max_new_tokens": ">= 1", "temperature": "> 0", "sample_prompts": ">= 1",
        "samples": ">= 2", "pairs_per_prompt": ">= 1", "min_gap": ">= 0", "dpo_steps": ">= 1", "dpo_batch": ">= 1",
        "dpo_lr": "(0, 1)", "beta": "> 0", "rounds": ">= 1", "grpo_steps": ">= 1", "grpo_prompts": ">= 1",
        "grpo_lr": "(0, 1)", "grpo_beta": ">= 0", "grpo_mu": ">= 1", "threads": ">= 0", "rm_steps": ">= 1",
        "rm_batch": ">= 1", "rm_lr": "(0, 1)", "ppo_steps": ">= 1", "ppo_prompts": ">= 2", "ppo_kl_coef": ">= 0",
        "ppo_lr": "(0, 1)",
    }
    PATHS = ("output", "model", "prompts", "eval_prompts", "sft_from")

    def validate(self):
        check_table(self, self.RANGES, "compare")
        bad = [m for m in self.methods if m not in METHODS[1:]]
        if bad or not self.methods:
            raise UserError(f"compare: methods must be among {', '.join(METHODS[1:])}; got {', '.join(self.methods) or 'none'}")
        if "ppo" in self.methods and ("dpo" not in self.methods or self.ppo_reward not in PPO_REWARDS):
            raise UserError("compare: the RLHF row (ppo) trains its reward model on offline DPO's pairs: add dpo to "
                            f"--methods (ppo_reward must be one of {', '.join(PPO_REWARDS)})")
        if self.seeds < 1:
            raise UserError(f"compare: seeds must be >= 1; got {self.seeds}")
        r = self.resolved()
        if r.rounds < 1 or r.dpo_steps < r.rounds or r.sample_prompts < r.rounds:
            raise UserError("compare: rounds must be >= 1 and at most dpo_steps and sample_prompts")
        user = [n for n in ("model", "prompts") if getattr(self, n)]
        if user and (len(user) < 2 or not self.reward):
            raise UserError("compare on your own task needs --model, --prompts and --reward together")
        if self.sft_from and not self.demo:
            raise UserError("compare: --sft-from is for the demo task; on your own task --model is the SFT model")

    @property
    def demo(self) -> bool:
        return not self.model

    def resolved(self) -> "CompareSettings":
        """A copy with every None filled in: from DemoSettings on the demo task, USER_DEFAULTS otherwise."""
        from prefalign.demo.settings import MAX_NEW_TOKENS

        fill = {}
        if self.demo:
            d = _demo_settings(self, 0)
            fill = {k: getattr(d, v) for k, v in DEMO_FIELDS.items()}
            fill["max_new_tokens"] = MAX_NEW_TOKENS
        else:
            fill = USER_DEFAULTS
        return dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})

    @classmethod
    def quick_settings(cls, **kw) -> "CompareSettings":
        """Seconds instead of minutes: the smoke test's budget (the story need not hold).
        The demo values come from DemoSettings.quick(); these cut them further."""
        base = dict(quick=True, sample_prompts=24, samples=4, dpo_steps=4, dpo_batch=4, rounds=2, grpo_steps=3,
                    grpo_prompts=4, heldout=16, rm_steps=2, rm_batch=4, ppo_steps=2, ppo_prompts=4)
        base.update(kw)
        return cls(**base)


def _demo_settings(s: CompareSettings, seed: int):
    from prefalign.demo.settings import DemoSettings

    d = DemoSettings.quick(seed) if s.quick else DemoSettings(seed=seed)
    return dataclasses.replace(d, progress=False)


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
