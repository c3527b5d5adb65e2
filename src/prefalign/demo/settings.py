"""The demo's settings, apart from the pipeline: `prefalign compare --help` shows them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.demo import task

MAX_NEW_TOKENS = 5  # the longest answer is "198" + EOS; a little slack shows run-on outputs


@dataclass
class DemoSettings:
    """Every knob of the demo. The defaults were found with bench/demo_prototype.py."""

    seed: int = 0
    n_heldout: int = 500
    max_operand: int = task.MAX_OPERAND  # 99: two-digit addition
    carry_slip: float = task.DEFAULT_CARRY_SLIP
    random_noise: float = task.DEFAULT_RANDOM_NOISE
    # SFT on the careless teacher's demonstrations. Shorter is risky: the SFT loss sits on a
    # plateau (~0.95) that breaks somewhere between steps 700 and 1400 depending on the seed.
    sft_steps: int = 2500
    sft_batch: int = 128
    sft_lr: float = 3e-3
    sft_warmup: int = 50
    # on-policy pairs from the SFT model, labelled by the verifier; many prompts with one pair
    # each generalise better than fewer prompts with several pairs
    dpo_prompts: int = 2048
    samples: int = 8
    temperature: float = 1.0
    pairs_per_prompt: int = 1
    # DPO against the frozen SFT model. A high lr (5e-4) pushes both log-probs down and wrecks
    # the model; a low lr with a larger beta keeps it near the reference and works best.
    beta: float = 0.5
    dpo_lr: float = 5e-5
    dpo_steps: int = 150
    dpo_batch: int = 32
    precision: str = "fp32"
    # A model this small is faster on one thread: two threads fight over 2 cores for tiny matmuls.
    threads: int = 1
    progress: bool = True

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoSettings":
        """A reduced run for tests and smoke checks (seconds, not minutes; the story may not hold)."""
        # One-digit operands: a task small enough that 60 SFT steps learn part of it, so samples
        # hold both right and wrong answers and every stage has something to do.
        return cls(seed=seed, max_operand=9, n_heldout=20, sft_steps=60, sft_batch=64, sft_lr=1e-2,
                   dpo_prompts=64, samples=8, dpo_steps=4, dpo_batch=8, progress=False)
