"""The RLHF pipeline DPO replaces, on the demo task: a Bradley-Terry reward model trained on the
very pairs DPO trains on, then PPO from the SFT model against it (policy, reference, reward model
and value model resident). Shared by `prefalign experiment frontier` and `prefalign compare`.

PPO's reward is a spec: "rm" (the default once `prefalign reward` exists: the reward model trained
here, `rm:OUTPUT/rm/model`; the value model starts from it, as in InstructGPT) or "verifier" (the
demo's exact checker, the reward GRPO gets: PPO without the reward-model step, to separate
"PPO vs DPO" from "a learned reward vs the true one").
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import time
from dataclasses import dataclass

DEMO_VERIFIER = "prefalign.demo.task:reward"
PPO_REWARDS = ("rm", "verifier")


def reward_model_available() -> bool:
    """Whether this prefalign has `prefalign reward` (reward-model training)."""
    return importlib.util.find_spec("prefalign.reward_train") is not None


DEFAULT_PPO_REWARD = "rm" if reward_model_available() else "verifier"


@dataclass(frozen=True)
class RLHFBudget:
    """The reward model's and PPO's numbers on the demo task (docs/compare.md: how they were chosen)."""

    rm_steps: int = 100            # optimizer steps of rm_batch pairs (the pairs file, shuffled per epoch)
    rm_batch: int = 32
    rm_lr: float = 1e-3
    ppo_steps: int = 40            # generation batches
    ppo_prompts: int = 64          # prompts per batch, one completion each
    ppo_epochs: int = 2            # passes over each batch
    ppo_mini_batch: int = 32       # completions per optimizer step
    ppo_lr: float = 1e-4           # policy and value model (one AdamW, a group each)
    value_lr: float = 1e-4

    @classmethod
    def quick(cls) -> "RLHFBudget":
        return cls(rm_steps=4, rm_batch=8, ppo_steps=3, ppo_prompts=8, ppo_mini_batch=4)


def train_reward_model(output: str, sft, tok, pairs_file: str, eval_file: str, budget: RLHFBudget, seed: int,
                       max_length: int = 16, max_prompt_length: int = 8) -> tuple[str, dict]:
    """A Bradley-Terry reward model from the SFT model's body on the DPO pairs: ("rm:PATH", stats)."""
    from prefalign.errors import UserError

    if not reward_model_available():
        raise UserError("PPO reward 'rm' needs `prefalign reward` (reward-model training), which this install "
                        "lacks; use the verifier reward")
    from prefalign.reward_config import RewardConfig
    from prefalign.reward_train import train_reward

    cfg = RewardConfig(data=pairs_file, eval_data=eval_file, output=output, max_steps=budget.rm_steps,
                       batch_size=budget.rm_batch, lr=budget.rm_lr, lr_schedule="constant", seed=seed,
                       max_length=max_length, max_prompt_length=max_prompt_length, progress=False, overwrite=True)
    t0 = time.perf_counter()
    run = train_reward(cfg, model=copy.deepcopy(sft), tokenizer=tok)
    if run.stopped:
        raise UserError(f"reward model {output} stopped early ({run.stopped}); the run is incomplete")
    return "rm:" + os.path.join(output, "model"), {"rm_s": time.perf_counter() - t0, **_accuracy(run)}


def _accuracy(run) -> dict:
    """The reward model's pairwise accuracy: on the held-out pairs when it had some, else the mean
    over its last 10 training steps (which says it fits, not that it generalises)."""
    held = [v for k, v in run.final_eval.items() if k.endswith("accuracies")]
    if held:
        return {"rm_accuracy": held[0], "rm_accuracy_on": "held-out pairs"}
    tail = [r["rewards/accuracies"] for r in run.history if "rewards/accuracies" in r][-10:]
    return {"rm_accuracy": sum(tail) / len(tail) if tail else float("nan"), "rm_accuracy_on": "training batches"}


def ppo_config(output: str, budget: RLHFBudget, kl_coef: float, rewards: list, seed: int, max_new_tokens: int,
               max_prompt_length: int, temperature: float = 1.0, weights: list | None = None):
    """PPO from the SFT model (a fresh reference copy of it) with the given reward specs and weights
    (a weight 0 logs a reward as rewards/<spec> without training on it)."""
    from prefalign.online.settings import PPOConfig

    return PPOConfig(output=output, reward=list(rewards), reward_weights=list(weights or []),
                     steps=budget.ppo_steps, prompts_per_step=budget.ppo_prompts,
                     ppo_epochs=budget.ppo_epochs, mini_batch=budget.ppo_mini_batch, lr=budget.ppo_lr,
                     value_lr=budget.value_lr, kl_coef=kl_coef, max_new_tokens=max_new_tokens,
                     max_prompt_length=max_prompt_length, temperature=temperature, seed=seed, progress=False,
                     save_model=False, overwrite=True)


def ppo_reward_spec(kind: str, rm_spec: str) -> str:
    """The reward spec PPO gets for PPO_REWARDS kind."""
    return rm_spec if kind == "rm" else DEMO_VERIFIER


def run_ppo(cfg, policy, tok, prompts):
    """PPO on `policy` (trained in place: pass a copy of the SFT model to keep it):
    (result, generation + scoring s, rollout + update s)."""
    from prefalign.online.ppo import ppo

    res = ppo(dataclasses.replace(cfg), model=policy, tokenizer=tok, prompts=prompts)
    gen = sum(r["time/generation"] + r["time/scoring"] for r in res.history)
    train = sum(r["time/rollout"] + r["time/training"] for r in res.history)
    return res, gen, train
