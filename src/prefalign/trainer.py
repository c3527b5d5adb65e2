"""The offline training loop: DPO-family losses, KTO and SFT through one readable loop.

    train: set_up -> resume -> begin -> train_step for each step -> finish

The shape of a torchtune recipe: `set_up` builds the process group, data, models and
optimizer; `resume` loads a checkpoint; `train_step` is one optimizer step (its forward and
backward live in prefalign.step, shared with evaluation); `finish` evaluates, writes the model
and the finished checkpoint. The data order and the learning rate are pure functions of the
config and the seed (prefalign.schedule), so a resumed run picks up exactly where its
checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from prefalign import (checkpoint, evaluation, fingerprint, hardware, models, monitor, objective, optim, prepare, report,
                       rundir, sharding, signals)
from prefalign.config import TrainConfig, to_dict
from prefalign.errors import UserError
from prefalign.logprobs import language_model
from prefalign.metrics import EVAL_KEYS, Console, MetricsLog, peak_memory_mb, progress_info, run_summary
from prefalign.reference import ModelReference
from prefalign.schedule import lr_lambda, step_indices, total_steps
from prefalign.step import forward_backward


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


@dataclass
class _Run:
    """What the set-up builds and the resume, the loop, the checkpoints and the finish share."""
    cfg: TrainConfig
    setup: prepare.Setup
    acc: object  # the accelerate.Accelerator: the process group, this process's rank and device
    sharded: bool  # FSDP (sharding.plan): weights, gradients and optimizer state sharded over processes
    run_fp: dict  # the run's fingerprint, checked on resume
    autocast_ctx: object
    params: list  # the trainable weights
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total: int  # optimizer steps of the whole run
    ckpt_root: str
    say: object  # prints a line on rank 0 (see _say)
    start: int = 0  # the first step this invocation runs (> 0 after a resume)
    resumed_from: str | None = None  # the checkpoint resumed from
    changes: dict = field(default_factory=dict)  # the settings the resume changed (fingerprint.check)
    trainer_state: dict = field(default_factory=dict)  # the resumed checkpoint's, else empty
    log: MetricsLog | None = None
    mon: monitor.BothDropMonitor | None = None
    console: Console | None = None
    watched: list = field(default_factory=list)  # the weights checked for finiteness after each update
    history: list = field(default_factory=list)  # the logged records
    stopped: str = ""  # why the loop stopped early ("" = it ran to the end)
    nonfinite: int = 0  # non-finite steps in a row
    skipped_steps: int = 0
    done: int = 0  # steps done, counting those before a resume

    @property
    def rank0(self) -> bool:
        return self.acc.is_main_process

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def device(self):
        return self.acc.device

    @property
    def per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world


def _say(rank0: bool):
    """Plain lines until the progress bar starts; messages print even under --no-progress."""
    def say(msg: str) -> None:
        if rank0:
            print(msg, file=sys.stderr, flush=True)
    return say


def train(cfg: TrainConfig, *, model=None, tokenizer=None, ref_model=None) -> RunResult:
    """Run one offline training job described by `cfg`; returns what it logged. It holds the
    output directory (rundir.claim: locked, checked) from before loading to the end."""
    with rundir.claim(cfg), signals.handlers_restored():
        run = set_up(cfg, model=model, tokenizer=tokenizer, ref_model=ref_model)
        if resume(run):
            return RunResult(cfg.output, run.start, already_finished=True)
        begin(run)
        stop = signals.StopRequest()
        for step in range(run.start, run.total):
            train_step(run, step, stop)
            if run.stopped:
                break
        return finish(run, stop)


def set_up(cfg: TrainConfig, *, model=None, tokenizer=None, ref_model=None) -> _Run:
    """The process group, the data, the policy (sharded under FSDP), the reference, the
    optimizer and the schedule: everything before the resume."""
    from accelerate import Accelerator

    how = sharding.plan(cfg)
    if how is not None:
        sharding.check(cfg)
    # The loop drives FSDP itself (see sharding.plan); accelerate only sets up the process group.
    # Left set, this variable would make it build a DeepSpeed engine nobody steps.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if how is not None and not dist.is_initialized():
        raise UserError(f"sharding ({how.source}) needs several processes: add --num-processes N, or launch "
                        f"with accelerate launch / torchrun")
    say = _say(acc.is_main_process)
    torch.manual_seed(cfg.seed)
    cfg = dataclasses.replace(cfg, precision=hardware.announce(cfg.precision, say))  # auto: fingerprint, config.yaml
    run_fp = fingerprint.of_run(cfg, acc.num_processes, model, ref_model, tokenizer)  # before LoRA wraps the model
    setup = prepare.build(cfg, device=acc.device, model=model, tokenizer=tokenizer, ref_model=ref_model,
                          accelerator=acc, log=say)
    if how is not None:
        _shard(setup, how, acc.num_processes, say)
    params = [p for p in setup.policy.parameters() if p.requires_grad]
    opt = optim.adamw(params, cfg)
    total = total_steps(cfg, len(setup.items), acc.num_processes)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    return _Run(cfg, setup, acc, how is not None, run_fp, prepare.autocast(cfg, acc.device), params, opt, sched,
                total, os.path.join(cfg.output, "checkpoints"), say)


def _shard(setup: prepare.Setup, how, world: int, say) -> None:
    setup.policy = sharding.shard(setup.policy, how, trainable=True)
    if isinstance(setup.reference, ModelReference):  # the copy; precomputed needs no model now
        setup.reference.model = sharding.shard(setup.reference.model, how, trainable=False)
    say(f"FSDP ({how.source}): weights, gradients and optimizer state sharded over {world} processes"
        + ("" if how.reshard_after_forward else "; a layer's weights stay gathered until its backward")
        + ("; offloaded to host RAM" if how.offload else ""))


def resume(run: _Run) -> bool:
    """--resume: load the newest valid checkpoint into the run (weights, optimizer, schedule,
    trainer state), checking it belongs to this run. True when the run had already finished."""
    cfg, setup = run.cfg, run.setup
    if not cfg.resume:
        return False
    path = checkpoint.find_resume(run.ckpt_root, cfg.resume, warn=run.say)
    if path is None:
        rundir.check_nothing_finished(cfg)
        run.say(f"no valid checkpoint in {run.ckpt_root}; starting from step 0")
        return False
    weights, optim_state, sched_state, state = checkpoint.read(path)
    checkpoint.check_weights(path, language_model(setup.policy), weights)
    checkpoint.check_layout(path, optim_state, run.sharded)
    run.changes = fingerprint.check(path, state["trainer"].get("fingerprint"), run.run_fp, cfg.resume_changes,
                                    run.say)
    if run.sharded:
        sharding.load_full(setup.policy, run.opt, weights, optim_state)
    else:
        checkpoint.apply(setup.policy, run.opt, weights, optim_state)
    run.trainer_state = checkpoint.restore(run.sched, sched_state, state)
    if run.changes:
        fingerprint.apply_optimizer_settings(run.opt, run.sched, cfg)
    run.start, run.resumed_from = run.trainer_state["step"], path
    setup.loss_state.update(run.trainer_state.get("loss_state", {}))
    if rundir.nothing_left(run.start, run.total, run.trainer_state.get("finished", False)):
        run.say(f"{cfg.output}: the run already finished at step {run.start}; nothing to do (to train it "
                f"further: --resume auto --max-steps N, N > {run.start})")
        return True
    run.say(f"resumed from {path} (step {run.start})")
    return False


def begin(run: _Run) -> None:
    """The run starts for real: its directory and config.yaml, the metrics log, the both-drop
    monitor (its step-0 scores), the run summary and the progress bar; the loop's counters from
    the resumed checkpoint."""
    cfg, setup, state = run.cfg, run.setup, run.trainer_state
    if run.rank0:
        # Only now, after the new run's data and model loaded without error: a fresh start (--overwrite)
        # drops the old run's outputs, or a later --resume auto would continue the OLD run.
        path = run.resumed_from
        rundir.begin(cfg.output, replace=path is None or os.path.dirname(os.path.realpath(path))
                     != os.path.realpath(run.ckpt_root))
        fingerprint.write_config(cfg.output, objective.record_loss_params(to_dict(cfg), setup.spec),
                                 fingerprint.history(cfg.output) if cfg.resume else [], run.start, run.changes)
    run.log = MetricsLog(cfg.output, run.rank0, cfg.tensorboard, resume_step=run.start if cfg.resume else None)
    run.mon = monitor.for_run(setup, cfg, run.total, state.get("monitor"))
    if run.mon is not None and run.mon.start is None:  # step 0: the policy before any update
        run.mon.observe(run.start, monitor.score(setup, cfg, run.autocast_ctx, run.mon.items))
    trainable, n_params = models.trainable_parameters(setup.policy)
    run.say(run_summary(stats=setup.data_stats, steps=run.total, start=run.start, batch=cfg.batch_size,
                        accum=cfg.grad_accum, world=run.world,
                        unit="pairs" if prepare.data_kind(setup.spec) == "paired" else "examples",
                        trainable=trainable, params=n_params, precision=cfg.precision,
                        reference=setup.reference.name,
                        tokens_per_step=run.per_step * sum(i.num_tokens for i in setup.items) / len(setup.items)))
    run.console = Console(run.total, cfg.progress and run.rank0, run.start, messages=run.rank0)
    # Weights already non-finite when loaded (a broken model) are not the update's doing: only
    # the others are watched, so an update that breaks them is caught.
    run.watched = [p for p, ok in zip(run.params, finite_each(run.params)) if ok]
    run.nonfinite, run.done = state.get("nonfinite_in_row", 0), run.start
    run.skipped_steps = state.get("skipped_steps", 0)


def train_step(run: _Run, step: int, stop: signals.StopRequest) -> None:
    """Optimizer step `step` (0-based): forward and backward, the update (skipped when the loss
    or the gradient is not finite), the monitor and the evaluation when due, the log line, and
    a checkpoint when due or when the run must stop (run.stopped says why)."""
    cfg, setup, opt = run.cfg, run.setup, run.opt
    t0 = time.time()
    run.done = step + 1
    step_items = [setup.items[i] for i in step_indices(len(setup.items), step, run.per_step, cfg.seed)]
    record, grad_norm = forward_backward(setup, cfg, step_items, run.autocast_ctx, run.params,
                                         run.acc.process_index, run.world, run.sharded)
    finite = math.isfinite(record["loss"]) and math.isfinite(float(grad_norm))
    if finite:
        opt.step()
        run.nonfinite = 0
        if not weights_finite(run.watched, run.device, run.world):
            run.stopped = "non-finite weights"
    else:
        run.nonfinite += 1
        run.skipped_steps += 1
        rows = [f"{it.source}:{it.row}" for it in step_items]
        run.console.say(f"step {step + 1}: non-finite loss or gradient; update skipped (rows {', '.join(rows[:8])})")
        record["nonfinite/rows"] = rows
    opt.zero_grad(set_to_none=True)
    run.sched.step()
    dt = time.time() - t0
    record.update({"step": step + 1, "epoch": (step + 1) * run.per_step / len(setup.items),
                   "lr": run.sched.get_last_lr()[0] if finite else opt.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "pairs_per_s": run.per_step / dt,
                   "tokens_per_s": sum(i.num_tokens for i in step_items) / dt, "peak_memory_mb": peak_memory_mb(),
                   "nonfinite/skipped_steps": run.skipped_steps})
    _observe(run, step + 1, record)
    # A skipped step or an alarm is always logged, whatever log_every says: they are the evidence.
    if (step + 1) % cfg.log_every == 0 or step + 1 == run.total or not finite or "alarm/both_drop" in record:
        run.log.write(record)
        run.history.append(record)
        run.console.update(step + 1, record)
    if run.nonfinite >= cfg.max_nonfinite:
        run.stopped = f"{run.nonfinite} non-finite steps in a row"
    signum = stop.agreed(run.device, run.world)
    if signum and not run.stopped:
        run.stopped = f"signal {signal.Signals(signum).name}"
    # Non-finite weights are never saved: the last good checkpoint stays the newest.
    if (run.stopped and run.stopped != "non-finite weights") or (
            cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run.total):
        save(run, step + 1)


def _observe(run: _Run, done: int, record: dict) -> None:
    """After `done` updates: the both-drop monitor and the held-out evaluation, when due."""
    cfg, setup = run.cfg, run.setup
    if run.mon is not None and run.mon.due(done) and not run.stopped:
        scores, fired = run.mon.observe(done, monitor.score(setup, cfg, run.autocast_ctx, run.mon.items))
        record.update(scores)
        if fired:
            record["alarm/both_drop"] = 1
            run.console.say(run.mon.message(done, scores))
            if cfg.both_drop_stop:
                run.stopped = "both-drop alarm"
    if setup.eval_items and cfg.eval_every and done % cfg.eval_every == 0 and done < run.total:
        held_out = evaluation.pair_metrics(setup, cfg, run.autocast_ctx)
        record.update({f"eval/{k}": v for k, v in held_out.items()})
        run.console.say(f"eval at step {done}: {progress_info(held_out, EVAL_KEYS)}")


def save(run: _Run, step: int, **extra) -> None:
    """A checkpoint after `step` updates (every process takes part; rank 0 writes)."""
    setup = run.setup
    if run.sharded:  # gathering is a collective: every rank takes part, rank 0 writes
        weights, optim_state = sharding.full_weights(setup.policy), sharding.full_optimizer_state(setup.policy, run.opt)
    elif run.rank0:
        weights, optim_state = checkpoint.trainable_state(setup.policy), run.opt.state_dict()
    if run.rank0:
        checkpoint.save(run.ckpt_root, step, weights, optim_state, run.sched,
                        {"monitor": run.mon and run.mon.state(), "nonfinite_in_row": run.nonfinite,
                         "skipped_steps": run.skipped_steps, "loss_state": setup.loss_state,
                         "fingerprint": run.run_fp, **extra},
                        run.cfg.keep_checkpoints)
    if run.world > 1:
        dist.barrier()


def finish(run: _Run, stop: signals.StopRequest) -> RunResult:
    """After the loop: the final evaluation, the model, the plots and the finished checkpoint;
    or, for a run stopped early, what happened and what is kept (an error where it failed)."""
    cfg, setup, stopped, done = run.cfg, run.setup, run.stopped, run.done
    run.console.close()
    final_eval = {}
    if not stopped and setup.eval_items:
        final_eval = evaluation.pair_metrics(setup, cfg, run.autocast_ctx)
        run.log.write({"step": done, **{f"eval/{k}": v for k, v in final_eval.items()}})
    run.log.close()
    # A both-drop stop keeps its model: the user stopped a run that was going wrong, not a broken one.
    keep_model = not stopped or stopped == "both-drop alarm"
    final = _write_model(run, keep_model)
    if not stopped:
        # Last, so a checkpoint marked finished means the model above is complete. It is what
        # --resume auto --max-steps N continues from (--save-every 0 = "only at the end").
        save(run, done, finished=True)
        late = stop.agreed(run.device, run.world)
        if late:  # the handlers kept the signal from cutting the eval or the save short
            stopped = f"signal {signal.Signals(late).name}"
            run.console.say(f"{stopped} during the final save; the save completed (model and checkpoint at "
                            f"step {done}); exiting with status {128 + late}")
    elif stopped.startswith(("signal", "both")):
        run.console.say(f"stopped at step {done}: {stopped}; checkpoint saved in {run.ckpt_root}"
                        + (", model in " + os.path.join(cfg.output, "model") if keep_model and cfg.save_model
                           else "") + ", continue with --resume auto")
    elif stopped == "non-finite weights":
        kept = (f", the last good checkpoint is kept in {run.ckpt_root}"
                if checkpoint.list_checkpoints(run.ckpt_root) else "")
        raise UserError(f"step {done}: the update made the weights non-finite (NaN or inf); no model written{kept}. "
                        f"Check --lr, --max-grad-norm, --weight-decay and the Adam betas")
    else:
        raise UserError(f"stopped after {stopped} (step {done}); checkpoint saved in {run.ckpt_root}. "
                        f"Check the data rows logged above, lower --lr, or use --precision fp32")
    return RunResult(cfg.output, done, run.history, final_eval, stopped, final, setup.tokenizer)


def _write_model(run: _Run, keep_model: bool):
    """OUTPUT/model (and merged/) and the plots, when the model is kept; returns the trained
    model (under FSDP a plain copy, on rank 0)."""
    cfg, setup = run.cfg, run.setup
    final = language_model(setup.policy)
    if run.sharded and cfg.save_model and keep_model:
        weights = sharding.full_weights(setup.policy)  # collective
        final = sharding.plain_copy(final, weights) if run.rank0 else final
    if run.rank0 and keep_model:
        if cfg.save_model:
            models.save_model(final, setup.tokenizer, os.path.join(cfg.output, "model"),
                              os.path.join(cfg.output, "merged") if cfg.merge_lora else None)
        report.plot_training(cfg.output)
    return final
