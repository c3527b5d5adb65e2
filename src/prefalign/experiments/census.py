"""Models in memory, counted, not asserted: the distinct model objects alive in the process at the
moment a method's training first runs a forward pass with gradients.

    with ModelCensus() as census:
        grpo(cfg, model=policy, ...)
    census.count, census.models        # 2, ["LlamaForCausalLM 0.33M", "LlamaForCausalLM 0.33M"]

A model is a transformers PreTrainedModel or a prefalign ValueModel that is not part of another
one (a ValueModel's body, a causal LM's inner LlamaModel count with their owner). The count is
taken from the garbage collector's live objects (after a collection), so a reference copy, a
reward model held by a reward function, or a value model all count, wherever they are held;
a model already dropped does not. The caller must not hold models of its own while the census
runs (compare drops its SFT model and reloads it for evaluation).
"""

from __future__ import annotations

import functools
import gc
import warnings

import torch
from torch import nn


@functools.cache
def _model_types() -> tuple:
    from transformers import PreTrainedModel

    from prefalign.online.value import ValueModel

    return PreTrainedModel, ValueModel


def _is_model(obj) -> bool:
    return isinstance(obj, _model_types())


def resident_models() -> list[nn.Module]:
    """The live model objects that are not a submodule of another live model."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated module attributes
        warnings.simplefilter("ignore")
        models = [o for o in gc.get_objects() if isinstance(o, nn.Module) and _is_model(o)]
    inner = {id(m) for owner in models for _, m in owner.named_modules() if m is not owner}
    return [m for m in models if id(m) not in inner]


def describe(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} {n / 1e6:.2f}M"


class ModelCensus:
    """Counts resident models at the first forward pass with gradients inside the block (the
    first training step); nothing if the block never trains (count stays None)."""

    def __init__(self):
        self.count: int | None = None
        self.models: list[str] = []
        self._handle = None

    def _hook(self, module, args):
        if self.count is None and torch.is_grad_enabled() and _is_model(module):
            found = resident_models()
            self.count, self.models = len(found), sorted(describe(m) for m in found)
            self._handle.remove()

    def __enter__(self) -> "ModelCensus":
        self._handle = nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
