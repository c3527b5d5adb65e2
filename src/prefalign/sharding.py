"""FSDP (fully sharded data parallel, torch FSDP2) for the offline loop.

Each process keeps 1/N of every weight, gradient and AdamW state; a transformer layer's
weights are all-gathered just before its forward (and again for its backward) and freed
after. The policy is wrapped in a `logprobs.Scorer`, whose forward is the whole
log-prob computation, so the embeddings, final norm and output head (the root group)
are gathered around our chunked head too. Gradients are averaged by the engine's
reduce-scatter: the loop does not all-reduce them itself.

We apply `fully_shard` ourselves rather than through `accelerate.prepare`: accelerate
runs FSDP only on accelerators (on CPU it silently falls back to DDP), and sharding
the Scorer needs the LM's layer classes, which we know. Under
`accelerate launch --config_file configs/accelerate/fsdp.yaml` the plugin's
reshard/offload settings are read from the environment the launcher sets, and an
accelerate DeepSpeed config runs as the FSDP equivalent of its ZeRO stage (`plan`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from prefalign.errors import UserError
from prefalign.logprobs import Scorer


@dataclass
class Plan:
    """How to shard: FSDP2's two knobs, and where the request came from (for the log line)."""

    reshard_after_forward: bool = True  # False: keep a layer's gathered weights until its backward
    offload: bool = False  # weights, gradients and optimizer state live in host RAM
    source: str = "--sharding fsdp"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def _flag(name: str, default: bool) -> bool:
    return _env(name, str(default)) in ("1", "true", "yes")


def _deepspeed_stage() -> int:
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none":
        with open(path) as fh:
            return int(json.load(fh).get("zero_optimization", {}).get("stage", 0))
    return int(_env("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def plan(cfg) -> Plan | None:
    """The sharding asked for, or None for plain data parallel.

    `--sharding fsdp`, or an accelerate FSDP config (its reshard/offload settings). An accelerate
    DeepSpeed config maps to the FSDP equivalent of its ZeRO stage: the loop drives FSDP, not
    DeepSpeed's engine (which would own backward and the optimizer step): stage 3 = weights,
    gradients and optimizer state sharded (FSDP full shard); stages 1-2 = the same, but a layer's
    weights stay gathered from its forward to its backward (FSDP's SHARD_GRAD_OP); stage 0 =
    plain data parallel; any offload device = FSDP's CPU offload.
    """
    if cfg.sharding == "none":
        return None
    if cfg.sharding == "fsdp" or _flag("ACCELERATE_USE_FSDP", False):
        return Plan(_flag("FSDP_RESHARD_AFTER_FORWARD", True), _flag("FSDP_OFFLOAD_PARAMS", False),
                    "--sharding fsdp" if cfg.sharding == "fsdp" else "accelerate FSDP config")
    if _flag("ACCELERATE_USE_DEEPSPEED", False):
        stage = _deepspeed_stage()
        if stage == 0:
            return None
        offload = any(_env(v, "none") not in ("none", "") for v in
                      ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"))
        return Plan(stage >= 3, offload, f"accelerate DeepSpeed ZeRO-{stage} config, run as its FSDP equivalent")
    return None


def check(cfg) -> None:
    if cfg.lora_r > 0 or cfg.qlora:
        raise UserError("sharding (FSDP, or a DeepSpeed config) with LoRA is not supported: LoRA's optimizer "
                        "state is tiny, so plain data parallel (--sharding none) covers it; see docs/distributed.md")


def shard(lm: nn.Module, how: Plan, *, trainable: bool) -> Scorer:
    """Shard `lm` across the process group: one FSDP unit per transformer layer, plus the root
    (embeddings, final norm, head). Returns the Scorer to call for log-probs."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    layer_classes = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise UserError(f"{type(lm).__name__} names no transformer layer classes (_no_split_modules); "
                        f"FSDP needs them to shard layer by layer")
    # A frozen reference never runs a backward: always free its gathered weights after the forward.
    kw = {"reshard_after_forward": how.reshard_after_forward if trainable else True}
    if how.offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **kw)
    scorer = Scorer(lm)
    fully_shard(scorer, **kw)
    return scorer


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_weights(scorer: Scorer) -> dict[str, torch.Tensor]:
    """The LM's full state dict, gathered; a collective (every rank calls it), filled on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(scorer, options=_options())
    # Parameters only, once each: a tied head would otherwise appear twice (safetensors refuses).
    names = {n for n, _ in scorer.lm.named_parameters()}
    return {k.removeprefix("lm."): v for k, v in sd.items() if k.removeprefix("lm.") in names}


def full_optimizer_state(scorer: Scorer, optimizer) -> dict:
    """The optimizer state keyed by parameter name, gathered (collective; filled on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(scorer, optimizer, options=_options())


def load_full(scorer: Scorer, optimizer, weights: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Scatter full weights and optimizer state (as saved by the two functions above) to the shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(scorer, {f"lm.{k}": v for k, v in weights.items()},
                         options=_options(strict=False))
    set_optimizer_state_dict(scorer, optimizer, optim_state, options=_options())


def plain_copy(lm: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded copy of `lm` holding `weights` (rank 0, for save_pretrained)."""
    with torch.device("meta"):
        fresh = type(lm)(lm.config)
    fresh.load_state_dict(weights, assign=True, strict=False)
    if getattr(lm.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh
