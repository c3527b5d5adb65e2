"""The offline training loop: DPO-family losses, KTO and SFT through one readable loop.

One optimizer step consumes `batch_size x grad_accum x processes` examples. Every
process knows the whole step's example indices (the data order is a pure function of
seed and epoch), so loss denominators need no communication and a resumed run picks
up exactly where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from prefalign import checkpoint, fingerprint, hardware, models, monitor, objective, prepare, rundir, sharding
from prefalign.config import TrainConfig, to_dict
from prefalign.errors import UserError
from prefalign.logprobs import language_model
from prefalign.metrics import EVAL_KEYS, Console, MetricsLog, peak_memory_mb, progress_info, run_summary
from prefalign.reference import ModelReference


@dataclass
class RunResult:
    output: str
    steps: int
    history: list = field(default_factory=list)  # the logged records
    final_eval: dict = field(default_factory=dict)
    stopped: str = ""  # why the run stopped early ("" = it finished)
    policy: object = None
    tokenizer: object = None
    already_finished: bool = False  # --resume found the run finished: nothing was done


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop:
    """SIGINT/SIGTERM/SIGHUP ask for a clean stop: the loop finishes its step, saves, and exits.
    A second signal stops at once (KeyboardInterrupt), for a user who really means it.
    The handlers stay after the loop, so a signal during the final eval and save lets them finish
    (see train); `train` puts the previous handlers back when it returns."""

    def __init__(self):
        self.signal = None
        self.signum = 0

    def __enter__(self):
        for s in STOP_SIGNALS:
            try:
                signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.signum = signum

    def agreed(self, device, world: int) -> int:
        """The signal number if any process got one. A signal may reach only some ranks; all
        must stop at the same step, or the others would wait forever in the next all_reduce."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.float64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def __exit__(self, *exc):
        pass


@contextlib.contextmanager
def _signal_handlers_kept():
    """The signal handlers as they were before the run, once it ends (see _Stop)."""
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / set outside Python
                signal.signal(s, h)


def finite_each(params) -> list[bool]:
    """Per weight tensor (this process's shard under FSDP): all finite? One fused norm per
    tensor (a NaN or inf anywhere makes its norm non-finite) and one device sync."""
    local = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in params]
    if not local:
        return []
    return torch.stack([n.float() for n in torch._foreach_norm(local)]).isfinite().tolist()


def weights_finite(params, device, world: int) -> bool:
    """Whether every given weight is finite after an update, agreed by all processes."""
    ok = all(finite_each(params))
    if world > 1:
        flag = torch.tensor([float(ok)], dtype=torch.float64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return ok


def _all_reduce_grads(params, world: int) -> None:
    """Average gradients over processes in one flat buffer (plain DDP semantics)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def item_tokens(item) -> int:
    """Tokens one example feeds the policy: prompt + chosen + rejected, or prompt + completion."""
    return (len(item.prompt_ids) + len(getattr(item, "chosen_ids", getattr(item, "completion_ids", [])))
            + len(getattr(item, "rejected_ids", [])))


def _logp_kw(s: prepare.Setup, cfg: TrainConfig) -> dict:
    return dict(pad_id=s.tokenizer.pad_token_id, chunk_size=cfg.chunk_size, packing=cfg.packing,
                token_budget=cfg.token_budget)


def micro_step(s: prepare.Setup, cfg: TrainConfig, items, ac, kl: torch.Tensor | None = None):
    """Forward one micro-batch: (loss summed over its examples, metric sums).

    `kl`: KTO's reference point for the step (see `kto_kl`); computed here from the micro-batch
    alone when not given (evaluation)."""
    kw = _logp_kw(s, cfg)
    if s.spec is None:  # SFT
        with ac():
            pol = objective.completion_logps(s.policy, [i.prompt_ids for i in items],
                                             [i.completion_ids for i in items], **kw)
        return objective.sft_loss(pol)
    if s.spec.kind == "unpaired":
        prompts = [i.prompt_ids for i in items]
        comps = [i.completion_ids for i in items]
        desirable = torch.tensor([bool(i.label) for i in items], device=s.policy.device)
        ref = s.reference.completion_logps(prompts, comps)  # first: see below
        with ac():
            pol = objective.completion_logps(s.policy, prompts, comps, **kw)
        if kl is None:
            kl = kto_kl(s, cfg, items, ac, rank=0, world=1)
        return objective.kto_loss(s.spec, cfg, pol, ref, desirable, kl)
    # The reference first: its forward's temporaries are gone before the policy's saved
    # activations pile up, so the two never coexist at the step's memory peak.
    ref = s.reference.pair_logps(items)
    with ac():
        pol = objective.pair_logps(s.policy, items, **kw)
        prompt = objective.prompt_logps(s.policy, items, **kw) if s.spec.needs_prompt_logps else None
    if ref is not None:
        ref = objective.PairLogps(*(t.to(pol.chosen.device) for t in ref))
    return objective.paired_loss(s.spec, cfg, pol, ref, s.loss_state, prompt)


def kto_kl(s: prepare.Setup, cfg: TrainConfig, items, ac, rank: int, world: int) -> torch.Tensor:
    """KTO's reference point: KL(policy || ref) estimated on mismatched (prompt_i, completion_i-1)
    pairs of the whole optimizer step, so it does not depend on how the step is split into
    micro-batches or processes. Each process scores every world-th mismatched pair; the sum is
    all-reduced. No gradient flows through it."""
    mine = list(range(rank, len(items), world))
    prompts = [items[i].prompt_ids for i in mine]
    shifted = [items[i - 1].completion_ids for i in mine]  # i - 1 = -1 wraps to the last item
    total = torch.zeros((), dtype=torch.float64, device=s.policy.device)
    with torch.no_grad():
        for lo in range(0, len(mine), cfg.batch_size):
            with ac():
                pol = objective.completion_logps(s.policy, prompts[lo:lo + cfg.batch_size],
                                                 shifted[lo:lo + cfg.batch_size], **_logp_kw(s, cfg))
            ref = s.reference.completion_logps(prompts[lo:lo + cfg.batch_size], shifted[lo:lo + cfg.batch_size])
            total += (pol.sum - ref.sum.to(pol.sum.device)).double().sum()
    if world > 1:
        dist.all_reduce(total)
    return (total / len(items)).float()


def _normalise(sums: dict, n: float, kto: bool) -> dict:
    out = {}
    for k, v in sums.items():
        if kto and k.startswith(("rewards/", "logps/")) and not k.startswith("count/"):
            denom = sums["count/desirable"] if k.endswith("chosen") else sums["count/undesirable"]
            out[k] = v / denom if denom > 0 else float("nan")
        elif k.startswith("count/"):
            out[k] = v
        else:
            out[k] = v / n
    if kto:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def _reduce(sums: dict, device, world: int) -> dict:
    keys = sorted(sums)
    vec = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))


def forward_backward(s: prepare.Setup, cfg: TrainConfig, step_items, ac, params, rank: int, world: int,
                     sharded: bool = False):
    """Gradients of one optimizer step's examples (this process's micro-batches), averaged over
    processes and clipped; returns the step's metrics (global means) and the gradient norm.
    `sharded`: FSDP averages the gradients itself (reduce-scatter in each backward)."""
    per_micro, per_step = cfg.batch_size, len(step_items)
    # SFT normalises by the scored completion tokens of the whole step (as evaluation does);
    # the others by examples.
    denom = (objective.scored_tokens(step_items) if s.spec is None else per_step) / world
    sums: dict = {}
    loss_value = 0.0
    kto = s.spec is not None and s.spec.kind == "unpaired"
    kl = kto_kl(s, cfg, step_items, ac, rank, world) if kto else None
    for j in range(cfg.grad_accum):
        lo = (j * world + rank) * per_micro
        loss, m = micro_step(s, cfg, step_items[lo:lo + per_micro], ac, kl)
        (loss / denom).backward()
        loss_value += loss.item() / denom
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if world > 1 and not sharded:
        _all_reduce_grads(params, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already the global norm
        grad_norm = grad_norm.full_tensor()
    # Each process's loss_value is its share scaled by world/denominator: the sum over
    # processes (in _reduce) divided by world is the step's mean loss.
    sums["loss"] = loss_value
    reduced = _reduce(sums, params[0].device, world)
    record = _normalise({k: v for k, v in reduced.items() if k != "loss"}, per_step, kto)
    record["loss"] = reduced["loss"] / world
    return record, grad_norm


def train(cfg: TrainConfig, *, model=None, tokenizer=None, ref_model=None) -> RunResult:
    """Run one offline training job described by `cfg`; returns what it logged. It holds the
    output directory (rundir.claim: locked, checked) from before loading to the end."""
    with rundir.claim(cfg), _signal_handlers_kept():
        return _train(cfg, model=model, tokenizer=tokenizer, ref_model=ref_model)


def _train(cfg: TrainConfig, *, model=None, tokenizer=None, ref_model=None) -> RunResult:
    from accelerate import Accelerator

    from prefalign import evaluation, report

    resuming = bool(cfg.resume)
    how = sharding.plan(cfg)
    if how is not None:
        sharding.check(cfg)
    # The loop drives FSDP itself (see sharding.plan); accelerate only sets up the process group.
    # Left set, this variable would make it build a DeepSpeed engine nobody steps.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank0, world, device = acc.is_main_process, acc.num_processes, acc.device
    if how is not None and not dist.is_initialized():
        raise UserError(f"sharding ({how.source}) needs several processes: add --num-processes N, or launch "
                        f"with accelerate launch / torchrun")

    def say(msg):  # plain lines until the progress bar starts; messages print even under --no-progress
        if rank0:
            print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(cfg.seed)
    sharded = how is not None
    cfg = dataclasses.replace(cfg, precision=hardware.announce(cfg.precision, say))  # auto: fingerprint, config.yaml
    run_fp = fingerprint.of_run(cfg, world, model, ref_model, tokenizer)  # before LoRA wraps the model
    s = prepare.build(cfg, device=device, model=model, tokenizer=tokenizer, ref_model=ref_model,
                      accelerator=acc, log=say)
    if sharded:
        s.policy = sharding.shard(s.policy, how, trainable=True)
        if isinstance(s.reference, ModelReference):  # the copy; precomputed needs no model now
            s.reference.model = sharding.shard(s.reference.model, how, trainable=False)
        say(f"FSDP ({how.source}): weights, gradients and optimizer state sharded over {world} processes"
            + ("" if how.reshard_after_forward else "; a layer's weights stay gathered until its backward")
            + ("; offloaded to host RAM" if how.offload else ""))
    lm = language_model(s.policy)
    ac = prepare.autocast(cfg, device)
    params = [p for p in s.policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    total = total_steps(cfg, len(s.items), world)
    per_step = cfg.batch_size * cfg.grad_accum * world
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    ckpt_root = os.path.join(cfg.output, "checkpoints")

    start, trainer_state, changes, path = 0, {}, {}, None
    if resuming:
        path = checkpoint.find_resume(ckpt_root, cfg.resume, warn=say)
        if path is None:
            rundir.check_nothing_finished(cfg)
            say(f"no valid checkpoint in {ckpt_root}; starting from step 0")
        else:
            weights, optim_state, sched_state, state = checkpoint.read(path)
            checkpoint.check_weights(path, lm, weights)
            checkpoint.check_layout(path, optim_state, sharded)
            changes = fingerprint.check(path, state["trainer"].get("fingerprint"), run_fp, cfg.resume_changes, say)
            if sharded:
                sharding.load_full(s.policy, opt, weights, optim_state)
            else:
                checkpoint.apply(s.policy, opt, weights, optim_state)
            trainer_state = checkpoint.restore(sched, sched_state, state)
            if changes:
                fingerprint.apply_optimizer_settings(opt, sched, cfg)
            start = trainer_state["step"]
            s.loss_state.update(trainer_state.get("loss_state", {}))
            if rundir.nothing_left(start, total, trainer_state.get("finished", False)):
                say(f"{cfg.output}: the run already finished at step {start}; nothing to do (to train it "
                    f"further: --resume auto --max-steps N, N > {start})")
                return RunResult(cfg.output, start, already_finished=True)
            say(f"resumed from {path} (step {start})")
    if rank0:
        # Only now, after the new run's data and model loaded without error: a fresh start (--overwrite)
        # drops the old run's outputs, or a later --resume auto would continue the OLD run.
        rundir.begin(cfg.output, replace=path is None or os.path.dirname(os.path.realpath(path))
                     != os.path.realpath(ckpt_root))
        fingerprint.write_config(cfg.output, objective.record_loss_params(to_dict(cfg), s.spec),
                                 fingerprint.history(cfg.output) if resuming else [], start, changes)
    log = MetricsLog(cfg.output, rank0, cfg.tensorboard, resume_step=start if resuming else None)
    mon = monitor.for_run(s, cfg, total, trainer_state.get("monitor"))
    if mon is not None and mon.start is None:  # step 0: the policy before any update
        mon.observe(start, monitor.score(s, cfg, ac, mon.items))
    trainable, n_params = models.trainable_parameters(s.policy)
    say(run_summary(stats=s.data_stats, steps=total, start=start, batch=cfg.batch_size, accum=cfg.grad_accum,
                    world=world, unit="pairs" if prepare.data_kind(s.spec) == "paired" else "examples",
                    trainable=trainable, params=n_params, precision=cfg.precision, reference=s.reference.name,
                    tokens_per_step=per_step * sum(map(item_tokens, s.items)) / len(s.items)))
    console = Console(total, cfg.progress and rank0, start, messages=rank0)

    # Weights already non-finite when loaded (a broken model) are not the update's doing: only
    # the others are watched, so an update that breaks them is caught.
    watched = [p for p, ok in zip(params, finite_each(params)) if ok]
    history, stopped, nonfinite, done = [], "", trainer_state.get("nonfinite_in_row", 0), start
    skipped_steps = trainer_state.get("skipped_steps", 0)

    def save(step, **extra):
        if sharded:  # gathering is a collective: every rank takes part, rank 0 writes
            weights, optim_state = sharding.full_weights(s.policy), sharding.full_optimizer_state(s.policy, opt)
        elif rank0:
            weights, optim_state = checkpoint.trainable_state(s.policy), opt.state_dict()
        if rank0:
            checkpoint.save(ckpt_root, step, weights, optim_state, sched,
                            {"monitor": mon and mon.state(), "nonfinite_in_row": nonfinite,
                             "skipped_steps": skipped_steps, "loss_state": s.loss_state, "fingerprint": run_fp,
                             **extra},
                            cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()

    with _Stop() as stop:
        for step in range(start, total):
            t0 = time.time()
            done = step + 1
            idx = step_indices(len(s.items), step, per_step, cfg.seed)
            step_items = [s.items[i] for i in idx]
            record, grad_norm = forward_backward(s, cfg, step_items, ac, params, acc.process_index, world, sharded)
            finite = math.isfinite(record["loss"]) and math.isfinite(float(grad_norm))
            if finite:
                opt.step()
                nonfinite = 0
                if not weights_finite(watched, device, world):
                    stopped = "non-finite weights"
            else:
                nonfinite += 1
                skipped_steps += 1
                rows = [f"{it.source}:{it.row}" for it in step_items]
                console.say(f"step {step + 1}: non-finite loss or gradient; update skipped (rows {', '.join(rows[:8])})")
                record["nonfinite/rows"] = rows
            opt.zero_grad(set_to_none=True)
            sched.step()
            n_tokens = sum(map(item_tokens, step_items))
            dt = time.time() - t0
            record.update({"step": step + 1, "epoch": (step + 1) * per_step / len(s.items),
                           "lr": sched.get_last_lr()[0] if finite else opt.param_groups[0]["lr"],
                           "grad_norm": float(grad_norm), "pairs_per_s": per_step / dt,
                           "tokens_per_s": n_tokens / dt, "peak_memory_mb": peak_memory_mb(),
                           "nonfinite/skipped_steps": skipped_steps})
            if mon is not None and mon.due(step + 1) and not stopped:
                scores, fired = mon.observe(step + 1, monitor.score(s, cfg, ac, mon.items))
                record.update(scores)
                if fired:
                    record["alarm/both_drop"] = 1
                    console.say(mon.message(step + 1, scores))
                    if cfg.both_drop_stop:
                        stopped = "both-drop alarm"
            if s.eval_items and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                held_out = evaluation.pair_metrics(s, cfg, ac)
                record.update({f"eval/{k}": v for k, v in held_out.items()})
                console.say(f"eval at step {step + 1}: {progress_info(held_out, EVAL_KEYS)}")
            # A skipped step or an alarm is always logged, whatever log_every says: they are the evidence.
            if (step + 1) % cfg.log_every == 0 or step + 1 == total or not finite or "alarm/both_drop" in record:
                log.write(record)
                history.append(record)
                console.update(step + 1, record)
            if nonfinite >= cfg.max_nonfinite:
                stopped = f"{nonfinite} non-finite steps in a row"
            signum = stop.agreed(device, world)
            if signum and not stopped:
                stopped = f"signal {signal.Signals(signum).name}"
            # Non-finite weights are never saved: the last good checkpoint stays the newest.
            if (stopped and stopped != "non-finite weights") or (
                    cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total):
                save(step + 1)
            if stopped:
                break
    console.close()
    final_eval = {}
    if not stopped and s.eval_items:
        final_eval = evaluation.pair_metrics(s, cfg, ac)
        log.write({"step": done, **{f"eval/{k}": v for k, v in final_eval.items()}})
    log.close()
    final = lm
    # A both-drop stop keeps its model: the user stopped a run that was going wrong, not a broken one.
    keep_model = not stopped or stopped == "both-drop alarm"
    if sharded and cfg.save_model and keep_model:
        weights = sharding.full_weights(s.policy)  # collective
        final = sharding.plain_copy(lm, weights) if rank0 else lm
    if rank0 and keep_model:
        if cfg.save_model:
            from prefalign.models import save_model

            save_model(final, s.tokenizer, os.path.join(cfg.output, "model"),
                       os.path.join(cfg.output, "merged") if cfg.merge_lora else None)
        report.plot_training(cfg.output)
    if not stopped:
        # Last, so a checkpoint marked finished means the model above is complete. It is what
        # --resume auto --max-steps N continues from (--save-every 0 = "only at the end").
        save(done, finished=True)
        late = stop.agreed(device, world)
        if late:  # the handlers kept the signal from cutting the eval or the save short
            stopped = f"signal {signal.Signals(late).name}"
            console.say(f"{stopped} during the final save; the save completed (model and checkpoint at "
                        f"step {done}); exiting with status {128 + late}")
    elif stopped.startswith(("signal", "both")):
        console.say(f"stopped at step {done}: {stopped}; checkpoint saved in {ckpt_root}"
                    + (", model in " + os.path.join(cfg.output, "model") if keep_model and cfg.save_model else "")
                    + ", continue with --resume auto")
    elif stopped == "non-finite weights":
        kept = f", the last good checkpoint is kept in {ckpt_root}" if checkpoint.list_checkpoints(ckpt_root) else ""
        raise UserError(f"step {done}: the update made the weights non-finite (NaN or inf); no model written{kept}. "
                        f"Check --lr, --max-grad-norm, --weight-decay and the Adam betas")
    else:
        raise UserError(f"stopped after {stopped} (step {done}); checkpoint saved in {ckpt_root}. "
                        f"Check the data rows logged above, lower --lr, or use --precision fp32")
    return RunResult(cfg.output, done, history, final_eval, stopped, final, s.tokenizer)


# `prefalign.train(...)` is the Python API's train (prefalign.api.train); see prefalign/__init__.py.
__import__("prefalign").callable_module(__name__, "train")
