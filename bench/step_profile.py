"""Where a training step's time goes: wall-clock buckets from hooks, for any tool (issue 16, item 2).

Installed in a benchmark worker before the tool runs (`install(tool)`); `buckets(t0, t1)` then sums
the recorded intervals that start inside the timed window [t0, t1]:

  attention    the policy's *Attention modules, forward + backward (projections, RoPE, SDPA)
  mlp          the policy's *MLP modules, forward + backward (prefalign's lean recompute included)
  layer rest   the policy's decoder layers minus the two above (norms, residual adds, hook overhead)
  reference    the reference forward (prefalign: ModelReference.pair_logps; TRL: ref_model(...)),
               head and log-probs included
  optimizer    Optimizer.step (global optimizer hooks)
  grad clip    torch.nn.utils.clip_grad_norm_
  data         prefalign: packing (pack_pairs, policy and reference); TRL: the DataLoader's next batch
  other        the rest of the step: embedding, output head and log-probs, loss, Python between them

Backward intervals come from tensor hooks: a module's backward starts when the gradient of its
output arrives and ends when the gradient of its input is complete (its input has no other
consumer in a Llama/Qwen2 layer: the normed hidden state). Autograd runs on the calling thread on
CPU, so the wall-clock marks are in order. Forward hooks are added lazily, on a module's first
call (a global hook cannot see keyword arguments), so the first step is not profiled: it is the
warm-up anyway.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

EVENTS: list[tuple[str, float, float]] = []  # (bucket, start, end)
_SEEN: set[int] = set()


def _record(bucket: str, t0: float, t1: float) -> None:
    EVENTS.append((bucket, t0, t1))


def _kind(module) -> str | None:
    name = type(module).__name__
    if name.endswith("DecoderLayer"):
        return "layer"
    if name.endswith("Attention"):
        return "attention"
    if name.endswith("MLP"):
        return "mlp"
    return None


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _attach(module, kind: str) -> None:
    def pre(mod, args, kwargs):
        if not torch.is_grad_enabled():
            mod._sp_call = None
            return
        rec = {"f0": time.perf_counter()}
        mod._sp_call = rec
        x = _first_tensor(args) if args else None
        x = x if x is not None else _first_tensor(kwargs.get("hidden_states"))
        if x is not None and x.requires_grad:
            x.register_hook(lambda g, rec=rec: _end_backward(rec))

    def post(mod, args, kwargs, out):
        rec = getattr(mod, "_sp_call", None)
        if rec is None:
            return
        now = time.perf_counter()
        _record(kind, rec["f0"], now)
        y = _first_tensor(out)
        if y is not None and y.requires_grad:
            y.register_hook(lambda g, rec=rec: rec.__setitem__("b0", time.perf_counter()))

    def _end_backward(rec):
        if "b0" in rec:
            _record(kind, rec["b0"], time.perf_counter())

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)


def _global_pre(module, args):
    if id(module) in _SEEN:
        return
    _SEEN.add(id(module))
    kind = _kind(module)
    if kind is not None:
        _attach(module, kind)


def _timed(bucket: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _record(bucket, t0, time.perf_counter())
    wrapper.__wrapped__ = fn
    return wrapper


def install(tool: str) -> None:
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_module_forward_pre_hook(_global_pre)
    starts = {}
    register_optimizer_step_pre_hook(lambda opt, a, k: starts.__setitem__(id(opt), time.perf_counter()))
    register_optimizer_step_post_hook(lambda opt, a, k: _record("optimizer", starts.pop(id(opt)), time.perf_counter()))
    torch.nn.utils.clip_grad_norm_ = _timed("grad clip", torch.nn.utils.clip_grad_norm_)
    if tool == "prefalign":
        from prefalign import reference
        from prefalign.data import packing

        reference.ModelReference.pair_logps = _timed("reference", reference.ModelReference.pair_logps)
        packing.pack_pairs = _timed("data", packing.pack_pairs)
    else:
        from torch.utils.data import dataloader
        from trl.trainer import dpo_trainer

        it = dataloader._BaseDataLoaderIter
        it.__next__ = _timed("data", it.__next__)
        _patch_trl_reference(dpo_trainer.DPOTrainer)


def _patch_trl_reference(cls) -> None:
    # TRL calls self.ref_model(...) under no_grad inside _compute_loss: time that module's forward.
    init = cls.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        ref = getattr(self, "ref_model", None)
        if ref is not None:
            marks = {}
            ref.register_forward_pre_hook(lambda m, a: marks.__setitem__("t", time.perf_counter()))
            ref.register_forward_hook(lambda m, a, o: _record("reference", marks["t"], time.perf_counter()))
    cls.__init__ = patched


ORDER = ("attention", "mlp", "layer rest", "reference", "optimizer", "grad clip", "data", "other")


def buckets(t0: float, t1: float) -> dict:
    """Seconds per bucket over [t0, t1] (the timed steps); 'layer rest' and 'other' by difference."""
    s = defaultdict(float)
    for bucket, a, b in EVENTS:
        if t0 <= a and b <= t1:
            s[bucket] += b - a
    out = {k: s.get(k, 0.0) for k in ("attention", "mlp", "reference", "optimizer", "grad clip", "data")}
    out["layer rest"] = max(0.0, s.get("layer", 0.0) - out["attention"] - out["mlp"])
    out["other"] = max(0.0, (t1 - t0) - sum(out.values()))
    out["total"] = t1 - t0
    return out
