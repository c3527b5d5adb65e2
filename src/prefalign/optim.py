"""The optimizer of every training loop (train, reward, grpo, ppo): AdamW, on torch's fused kernel
when asked for (PREFALIGN_FUSED_ADAMW=1; see `adamw` for why it is not the default).

Why: torch's default AdamW on CPU updates one parameter tensor at a time (a loop of ~10 small
kernels per tensor: 272 tensors x 10 for SmolLM2-135M), each a separate pass over memory. The
fused kernel does the whole update of a tensor in one pass, on CPU as on CUDA. It computes the
same update (the same formula in fp32; results agree to float rounding, tests/test_speed_paths.py).
Sharded (DTensor) parameters keep torch's default choice.
"""

from __future__ import annotations

import os

import torch


def fusable(params) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain float tensors on CPU or CUDA."""
    return bool(params) and all(
        not hasattr(p, "to_local") and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def adamw(params, cfg, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the run's lr, betas and weight decay (any config with those fields); `params` is a
    list of tensors or of parameter groups ({"params": [...], "lr": ...}).

    fused (None: PREFALIGN_FUSED_ADAMW=1 turns it on): opt-in for now. Its update differs from the
    per-tensor one by float rounding, and the demo's SFT is sensitive to rounding: with the fused
    kernel it stayed on its loss plateau (held-out 0.268 instead of 0.596), so the default keeps the
    optimizer every recorded number was measured with. The benches turn it on."""
    if fused is None:
        fused = os.environ.get("PREFALIGN_FUSED_ADAMW", "") not in ("", "0")
    params = list(params)
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, fused=True if fused and fusable(tensors) else None)
