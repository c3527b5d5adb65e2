"""The run's schedule: how many optimizer steps, which examples each step takes, and the
learning rate at each step. Pure functions of the config, the data size and the seed, so
every process (and a resumed run) computes the same schedule without communicating.
"""

from __future__ import annotations

import math

import torch

from prefalign.config import TrainConfig
from prefalign.errors import UserError


def warmup_steps(cfg, total: int) -> int:
    """--warmup-steps, else TRL's warmup_ratio of the run's steps, rounded up (GRPOConfig has no ratio)."""
    return cfg.warmup_steps or math.ceil(getattr(cfg, "warmup_ratio", 0.0) * total)


def lr_lambda(cfg: TrainConfig, total: int):
    warmup = warmup_steps(cfg, total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def step_indices(n_items: int, step: int, per_step: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): a fresh permutation each epoch."""
    steps_per_epoch = n_items // per_step
    epoch, k = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n_items, generator=g).tolist()
    return perm[k * per_step:(k + 1) * per_step]


def total_steps(cfg: TrainConfig, n_items: int, world: int) -> int:
    per_step = cfg.batch_size * cfg.grad_accum * world
    if n_items < per_step:
        raise UserError(f"{cfg.data}: {n_items} usable rows, fewer than one optimizer step needs "
                        f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes)")
    return cfg.max_steps or max(1, int(cfg.epochs * (n_items // per_step)))
