"""Everything a run needs before its first step: the tokenizer, the tokenized data,
the policy (with LoRA if asked) and the reference strategy.

Shared by `train`, `sft`, `eval` and the experiments, so each command loads data and
models the same way.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field

import torch

from prefalign import hardware, models, reference as refs, rundir
from prefalign.config import TrainConfig
from prefalign.data.formats import load_examples, pairs_to_unpaired
from prefalign.data.tokenize import tokenize_examples
from prefalign.errors import UserError
from prefalign.lean import lean_mlps
from prefalign.metrics import Phase
from prefalign.objective import LossPlan, loss_plan
from prefalign.schedule import step_indices


def loss_spec(cfg: TrainConfig) -> LossPlan | None:
    """None for SFT; the run's loss (terms, weights, parameters) otherwise."""
    return loss_plan(cfg)


def data_kind(spec: LossPlan | None) -> str:
    if spec is None:
        return "sft"
    return "unpaired" if spec.kind == "unpaired" else "paired"


def max_prompt_length(cfg: TrainConfig) -> int:
    return cfg.max_prompt_length or cfg.max_length // 2


def load_items(cfg: TrainConfig, tokenizer, path: str, kind: str, rejects_path: str | None, log=print):
    """Read, validate and tokenize a data file into items for `kind` (paired | unpaired | sft)."""
    want = {"paired": "paired", "unpaired": "auto", "sft": "sft"}[kind]
    loaded = load_examples(path, kind=want, on_bad_row=cfg.on_bad_row, rejects_path=rejects_path,
                           split=cfg.data_split)
    examples = loaded.examples
    if kind == "unpaired" and loaded.kind == "paired":
        examples = pairs_to_unpaired(examples)  # KTO on paired data: chosen -> good, rejected -> bad
    elif kind == "unpaired" and loaded.kind != "unpaired":
        raise UserError(f"{path}: loss {cfg.loss} needs unpaired rows (prompt, completion, label) or pairs; "
                        f"found {loaded.kind} rows")
    elif kind == "sft":
        if loaded.kind == "paired":
            examples = pairs_to_unpaired(examples)
        examples = [e for e in examples if e.label]  # SFT imitates the good side only
    plan = loss_plan(cfg)
    result = tokenize_examples(examples, tokenizer, max_length=cfg.max_length,
                               max_prompt_length=max_prompt_length(cfg), on_bad_row=cfg.on_bad_row,
                               rejects_path=rejects_path, prepend_bos=plan is not None and plan.prepend_bos)
    skipped = loaded.skipped + result.stats.get("skipped", 0)
    if skipped:
        log(f"{path}: skipped {skipped} bad rows (written to {rundir.published(rejects_path)})")
    if result.stats.get("special_text"):
        log(f"{path}: {result.stats['special_text']} rows hold special-token strings (such as '</s>') in their "
            "text; they are tokenized as plain text, not as special tokens")
    if result.stats.get("truncated"):
        log(f"{path}: truncated {result.stats['truncated']} rows to max_length {cfg.max_length}")
    if not result.items:
        raise UserError(f"{path}: no usable rows")
    # After the tokenizer's own counts: rows used, and rows skipped by reading and tokenizing both.
    return result.items, {**result.stats, "rows": len(result.items), "skipped": skipped}


@dataclass
class Setup:
    tokenizer: object
    policy: torch.nn.Module
    reference: refs.Reference
    spec: LossPlan | None  # the loss plan (objective.LossPlan); None = SFT
    items: list
    eval_items: list
    data_stats: dict
    loss_state: dict = field(default_factory=dict)  # carried across steps and checkpoints (bco_pair's delta)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for matmuls; weights stay fp32 (master copy) and log-prob reductions fp32."""
    if hardware.concrete(cfg.precision) == "bf16":  # auto, unresolved in eval: as train would resolve it
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def reference_strategy(cfg: TrainConfig, spec: LossPlan | None) -> str:
    if spec is None or not spec.needs_reference:
        if cfg.reference not in ("auto", "none"):
            raise UserError(f"loss {cfg.loss} uses no reference; drop --reference {cfg.reference}")
        return "none"
    if cfg.reference == "none":
        raise UserError(f"loss {cfg.loss} needs a reference model; use --reference copy, adapters-off or precomputed")
    if cfg.reference == "auto":
        return "adapters-off" if cfg.lora_r > 0 else "copy"
    return cfg.reference


def reference_batches(cfg: TrainConfig, n_train: int, n_eval: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of the precomputed reference pass: the first epoch's, exactly
    as the training loop will cut them (so step-1 log-ratios are exactly 0), then the pairs the
    first epoch drops (the remainder of n_train / step size), then evaluation's batches.
    Indices >= n_train are eval items."""
    bs, per_step = cfg.batch_size, cfg.batch_size * cfg.grad_accum * world
    mine, seen = [], set()
    for step in range(n_train // per_step):
        idx = step_indices(n_train, step, per_step, cfg.seed)
        seen.update(idx)
        mine += [idx[lo:lo + bs] for lo in ((j * world + rank) * bs for j in range(cfg.grad_accum))]
    rest = [i for i in range(n_train) if i not in seen][rank::world]
    mine += [rest[lo:lo + bs] for lo in range(0, len(rest), bs)]
    evals = [list(range(n_train + lo, n_train + min(lo + bs, n_eval))) for lo in range(0, n_eval, bs)]
    return mine + evals[rank::world]


def checkpoint_layers(model) -> None:
    """Gradient checkpointing on the policy: each decoder layer's activations are recomputed in the
    backward. Non-reentrant: the same gradients, and the frozen inputs of a LoRA model need no
    requires_grad trick (set anyway, as peft expects). The lean MLP patch is left off: the layer's
    recompute already drops the MLP's activations, and its saved-tensor hooks would keep g and u
    alive across the layer instead."""
    if not getattr(model, "supports_gradient_checkpointing", True):
        raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if models.is_peft(model):
        model.enable_input_require_grads()


def load_tokenizer(cfg, model=None, tokenizer=None):
    """The run's tokenizer: `tokenizer` if given, else cfg.tokenizer's or cfg.model's (train, grpo, iterate)."""
    if tokenizer is None:
        if model is None and not cfg.tokenizer:  # name --model, not the tokenizer, when the path is wrong
            models._check_source(cfg.model, "model")
        tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    return tokenizer


def load_model(cfg, tokenizer, model=None, path: str = "", qlora: bool = False):
    """A policy or reference model: `model` if given, else loaded from `path` (default cfg.model) with
    the run's attention and trust settings; either way checked against the tokenizer's ids."""
    path = path or cfg.model
    if model is None:
        model = models.load_model(path, trust_remote_code=cfg.trust_remote_code, qlora=qlora, attention=cfg.attention)
    else:
        models.set_attention(model, cfg.attention)
    models.check_vocab(tokenizer, model, path)
    return model


def with_lora(cfg, model, qlora: bool = False):
    """The policy with LoRA adapters when cfg.lora_r > 0 (seeded: the same adapters each run);
    qlora: the model was loaded in 4-bit (load_model's qlora)."""
    if cfg.lora_r > 0 and not models.is_peft(model):
        torch.manual_seed(cfg.seed)
        model = models.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                                  qlora=qlora)
    return model


def build(cfg: TrainConfig, *, device: torch.device, model=None, tokenizer=None, ref_model=None,
          accelerator=None, log=print) -> Setup:
    """Load tokenizer, data, policy and reference. `model`/`tokenizer` objects may be passed in
    (the demo and the tests build them in-process); otherwise they load from cfg.model."""
    spec = loss_spec(cfg)
    strategy = reference_strategy(cfg, spec)
    tokenizer = load_tokenizer(cfg, model, tokenizer)
    kind = data_kind(spec)
    # Rejects go to a temporary name until the run starts for real (rundir.begin moves them into
    # place): a resume must not append the same rows again, a failing run not touch the old file.
    # Rank 0 alone writes them (every rank reads the same rows).
    lead = cfg.output and (accelerator is None or accelerator.is_main_process)
    rejects = rundir.staged(cfg.output, "rejects.jsonl") if lead else None
    items, stats = load_items(cfg, tokenizer, cfg.data, kind, rejects, log)
    eval_items = []
    if cfg.eval_data:
        eval_items, _ = load_items(cfg, tokenizer, cfg.eval_data, kind,
                                   rundir.staged(cfg.output, "rejects_eval.jsonl") if lead else None, log)
    model = with_lora(cfg, load_model(cfg, tokenizer, model, qlora=cfg.qlora), qlora=cfg.qlora)
    if cfg.gradient_checkpointing:
        checkpoint_layers(model)
    elif cfg.lean_mlp:
        lean_mlps(model)  # the policy only: the reference runs without autograd
    model.to(device)
    model.train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False

    ref_kw = dict(pad_id=tokenizer.pad_token_id, packing=cfg.packing, token_budget=cfg.token_budget,
                  chunk_size=cfg.chunk_size, autocast=autocast(cfg, device))
    reference: refs.Reference = refs.Reference()
    if strategy in ("copy", "precomputed") and not (strategy == "precomputed" and cfg.lora_r > 0):
        # fp32 weights under the policy's autocast, whatever --precision says: a bf16 copy would
        # round its norms, embeddings and residual stream too, so the step-1 log-ratio would be
        # precision noise (loss 0.6808, not ln 2). The price is 4 bytes/param, not 2; LoRA
        # (adapters-off) or --reference precomputed (the copy is freed after one pass) avoid it.
        ref_model = load_model(cfg, tokenizer, ref_model, cfg.ref_model or cfg.model)
        reference = refs.ModelReference(models.freeze(ref_model).to(device), **ref_kw)
    elif strategy in ("adapters-off", "precomputed"):
        reference = refs.ModelReference(model, adapters_off=True, **ref_kw)
    if strategy == "precomputed":
        if kind != "paired":
            raise UserError("reference precomputed supports paired losses only; use --reference copy")
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        settings = {"max_length": cfg.max_length, "packing": cfg.packing, "precision": cfg.precision,
                    "token_budget": cfg.token_budget, "chunk_size": cfg.chunk_size,
                    "layout": [cfg.seed, cfg.batch_size, cfg.grad_accum, world]}
        key = refs.cache_key(cfg.ref_model or cfg.model or "in-process", reference.model, items + eval_items,
                             settings)
        cache_dir = cfg.cache_dir or os.path.join(cfg.output, "ref_cache")
        log(f"precomputing reference log-probs for {len(items) + len(eval_items)} pairs (cache {cache_dir})")
        batches = reference_batches(cfg, len(items), len(eval_items), rank, world)
        phase = Phase("reference", len(items) + len(eval_items),
                      cfg.progress and (accelerator is None or accelerator.is_main_process))
        reference = refs.precompute(reference, items + eval_items, batches, cache_dir, key, accelerator,
                                    progress=phase, log=log)
        phase.close()
        ref_model = None  # the reference model is freed: training runs no reference forward
        gc.collect()
    return Setup(tokenizer, model, reference, spec, items, eval_items, stats)
