"""`prefalign reward`: train a Bradley-Terry reward model on preference pairs.

The pieces are `train`'s: the same data layer (formats, tokenization, bad rows, rejects files),
the same step order (train.step_indices: a pure function of seed and epoch, so a resumed run
continues exactly), the same schedule, checkpoints (checkpoint.py), run directory guard and lock
(rundir.py), fingerprint refusal of a changed resume (fingerprint.py), metrics.jsonl and console.
Only the model (reward_model.py) and the loss (losses/reward.py) differ. One process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from dataclasses import dataclass, field

import torch

from prefalign import checkpoint, fields, fingerprint, hardware, models, optim, prepare, reward_model, rundir, signals
from prefalign.config import TrainConfig
from prefalign.data.formats import load_examples, place, read_records
from prefalign.errors import UserError
from prefalign.losses.reward import bradley_terry
from prefalign.metrics import Console, MetricsLog, progress_info, run_summary
from prefalign.reward_config import NOT_TRAJECTORY, RewardConfig
from prefalign.schedule import lr_lambda, step_indices, total_steps

EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


@dataclass
class RewardRun:
    output: str
    steps: int
    history: list = field(default_factory=list)
    final_eval: dict = field(default_factory=dict)
    stopped: str = ""
    model: object = None
    tokenizer: object = None
    already_finished: bool = False


@dataclass
class _State:
    """What the loop needs, built once (see _setup)."""
    cfg: RewardConfig
    model: object
    tokenizer: object
    items: list
    margins: list          # [n] per-pair margin (0.0 without --margin-column)
    eval_items: list
    eval_margins: list
    stats: dict
    settings: dict         # the tokenization settings saved with the model (reward_model.CONFIG_KEY)
    fp: dict
    autocast_ctx: object   # bf16 autocast or a null context (prepare.autocast); scores come out fp32


# ----------------------------------------------------------------------------------------------
# Data: train's loader, plus the margin column


def _data_view(cfg: RewardConfig) -> TrainConfig:
    """The data settings as prepare.load_items reads them: the reward model tokenizes pairs exactly
    as DPO does (no BOS prepended by a loss: loss 'sft' here only means that)."""
    return TrainConfig(data=cfg.data, data_split=cfg.data_split, max_length=cfg.max_length,
                       max_prompt_length=cfg.max_prompt_length, on_bad_row=cfg.on_bad_row, loss="sft")


def _margins(cfg: RewardConfig, path: str, items) -> list[float]:
    """Each item's margin from its row's --margin-column (a finite number), or 0.0 without one."""
    if not cfg.margin_column:
        return [0.0] * len(items)
    by_row = {(r.source, r.row): r.data for r in read_records(path, cfg.data_split)}
    out = []
    for it in items:
        value = by_row[(it.source, it.row)].get(cfg.margin_column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{place(it.source, it.row, cfg.margin_column)}: the margin must be a finite number; "
                            f"got {value!r}")
        out.append(float(value))
    return out


def _is_chat(cfg: RewardConfig) -> bool:
    """Did the pairs come as conversations? The scorer must then render text through the chat template."""
    first = load_examples(cfg.data, kind="paired", on_bad_row="skip", split=cfg.data_split).examples[0]
    return isinstance(first.prompt, list)


def _load_data(cfg: RewardConfig, tokenizer, log):
    view = _data_view(cfg)
    rejects = rundir.staged(cfg.output, "rejects.jsonl")
    items, stats = prepare.load_items(view, tokenizer, cfg.data, "paired", rejects, log)
    eval_items = []
    if cfg.eval_data:
        eval_items, _ = prepare.load_items(view, tokenizer, cfg.eval_data, "paired",
                                           rundir.staged(cfg.output, "rejects_eval.jsonl"), log)
    return items, stats, eval_items


# ----------------------------------------------------------------------------------------------
# Set-up


def fingerprint_of(cfg: RewardConfig, model=None, tokenizer=None) -> dict:
    """The run's identity (see fingerprint.py): trajectory settings, pairs per step, data and model digests."""
    fp = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in NOT_TRAJECTORY and f.name not in ("model", "tokenizer", "data", "eval_data")}
    fp["command"] = "reward"
    fp["pairs_per_step"] = cfg.batch_size * cfg.grad_accum
    fp["paths"] = {k: getattr(cfg, k) for k in ("data", "eval_data", "model", "tokenizer")}
    given = {"model": model, "tokenizer": tokenizer}
    for key in ("data", "eval_data", "model", "tokenizer"):
        obj = given.get(key)
        if obj is None:
            fp[key + "/sha256"] = fingerprint.file_digest(getattr(cfg, key))
        elif hasattr(obj, "named_parameters"):
            fp[key + "/sha256"] = "in-process:" + fingerprint.model_digest(obj)
        else:
            fp[key + "/sha256"] = "in-process:" + type(obj).__name__
    return fp


def _setup(cfg: RewardConfig, model, tokenizer, say) -> _State:
    if not cfg.data:
        raise UserError("no training pairs given (--data)")
    fp = fingerprint_of(cfg, model, tokenizer)  # before the score head and LoRA change the model
    if tokenizer is None:
        if model is None and not cfg.tokenizer:
            models._check_source(cfg.model, "model")  # name --model, not the tokenizer, when the path is wrong
        tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    items, stats, eval_items = _load_data(cfg, tokenizer, say)
    margins, eval_margins = _margins(cfg, cfg.data, items), _margins(cfg, cfg.eval_data, eval_items)
    lm = prepare.load_model(cfg, tokenizer, model)  # as train loads its policy: attention, trust, vocabulary
    rm = reward_model.from_causal_lm(lm, tokenizer.pad_token_id, cfg.seed)
    if cfg.lora_r > 0:
        rm = reward_model.apply_lora(rm, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rm.to(device).train()
    settings = {"chat": _is_chat(cfg), "max_length": cfg.max_length,
                "max_prompt_length": prepare.max_prompt_length(_data_view(cfg))}
    return _State(cfg, rm, tokenizer, items, margins, eval_items, eval_margins, stats, settings, fp,
                  prepare.autocast(cfg, device))


# ----------------------------------------------------------------------------------------------
# Steps and evaluation


def _batch_loss(st: _State, items, margins):
    """(summed loss, summed metrics) of one micro-batch."""
    with st.autocast_ctx():  # bf16 matmuls over fp32 weights; the scores and the loss stay fp32
        chosen, rejected = reward_model.pair_scores(st.model, items)
    margin = torch.tensor(margins, device=chosen.device) if st.cfg.margin_column else None
    out = bradley_terry(chosen, rejected, margin, st.cfg.center_coef)
    sums = {"rewards/accuracies": out.correct.sum().item(), "rewards/margins": out.margins.sum().item(),
            "rewards/chosen": chosen.detach().sum().item(), "rewards/rejected": rejected.detach().sum().item()}
    return out.losses.sum(), sums


def _step(st: _State, idx: list[int], params) -> tuple[dict, float]:
    """One optimizer step's gradients (mean over its pairs, clipped): (metrics, grad norm)."""
    n, bs = len(idx), st.cfg.batch_size
    total, sums = 0.0, {}
    for lo in range(0, n, bs):
        part = idx[lo:lo + bs]
        loss, m = _batch_loss(st, [st.items[i] for i in part], [st.margins[i] for i in part])
        (loss / n).backward()
        total += loss.item() / n
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    grad_norm = torch.nn.utils.clip_grad_norm_(params, st.cfg.max_grad_norm or float("inf"))
    return {"loss": total, **{k: v / n for k, v in sums.items()}}, float(grad_norm)


@torch.no_grad()
def evaluate(st: _State, items=None, margins=None) -> dict:
    """Held-out loss, pairwise accuracy and mean margin (the model left in train mode as found)."""
    items = st.eval_items if items is None else items
    margins = st.eval_margins if margins is None else margins
    was_training = st.model.training
    st.model.eval()
    total, sums = 0.0, {}
    for lo in range(0, len(items), st.cfg.batch_size):
        loss, m = _batch_loss(st, items[lo:lo + st.cfg.batch_size], margins[lo:lo + st.cfg.batch_size])
        total += loss.item()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    st.model.train(was_training)
    return {"loss": total / len(items), **{k: v / len(items) for k, v in sums.items()}}


# ----------------------------------------------------------------------------------------------
# The run


def train_reward(cfg: RewardConfig, *, model=None, tokenizer=None) -> RewardRun:
    """Run `prefalign reward`. `model` (a causal LM) / `tokenizer` objects may replace cfg's paths.
    Holds the output directory (rundir.claim: locked, checked) from before loading to the end."""
    from prefalign.config import check_attention

    check_attention(cfg.attention)  # flex_attention trains on CUDA only: refused before OUTPUT is touched
    with rundir.claim(cfg), signals.handlers_restored():
        return _run(cfg, model, tokenizer)


def _run(cfg: RewardConfig, model, tokenizer) -> RewardRun:
    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    cfg = dataclasses.replace(cfg, precision=hardware.announce(cfg.precision, say))  # config.yaml: what ran
    torch.manual_seed(cfg.seed)
    st = _setup(cfg, model, tokenizer, say)
    params = [p for p in st.model.parameters() if p.requires_grad]
    opt = optim.adamw(params, cfg)
    total = total_steps(cfg, len(st.items), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    start, changes, path = _resume(st, opt, sched, say)
    if start is None:
        return RewardRun(cfg.output, total, already_finished=True)
    ckpt_root = os.path.join(cfg.output, "checkpoints")
    rundir.begin(cfg.output, replace=path is None or os.path.dirname(os.path.realpath(path))
                 != os.path.realpath(ckpt_root))
    fingerprint.write_config(cfg.output, {"command": "reward", **fields.as_dict(cfg)},
                             fingerprint.history(cfg.output) if cfg.resume else [], start, changes)
    trainable, n_params = models.trainable_parameters(st.model)
    n_tokens = sum(len(i.prompt_ids) * 2 + len(i.chosen_ids) + len(i.rejected_ids) for i in st.items)
    say(run_summary(stats=st.stats, steps=total, start=start, batch=cfg.batch_size, accum=cfg.grad_accum, world=1,
                    unit="pairs", trainable=trainable, params=n_params, precision=cfg.precision, reference="none",
                    tokens_per_step=cfg.batch_size * cfg.grad_accum * n_tokens / len(st.items)))
    log = MetricsLog(cfg.output, True, resume_step=start if cfg.resume else None)
    history, stopped, done = _loop(st, opt, sched, params, start, total, log)
    try:
        return _finish(st, opt, sched, history, stopped, done, log, say)
    finally:
        log.close()


def _save_checkpoint(st: _State, opt, sched, step: int, **extra) -> None:
    checkpoint.save(os.path.join(st.cfg.output, "checkpoints"), step, checkpoint.trainable_state(st.model),
                    opt.state_dict(), sched, {"fingerprint": st.fp, **extra}, st.cfg.keep_checkpoints)


def _resume(st: _State, opt, sched, say):
    """(start step, fingerprint changes, checkpoint path); start None = the run already finished."""
    cfg = st.cfg
    if not cfg.resume:
        return 0, {}, None
    path = checkpoint.find_resume(os.path.join(cfg.output, "checkpoints"), cfg.resume, warn=say)
    if path is None:
        rundir.check_nothing_finished(cfg)
        say(f"no valid checkpoint in {cfg.output}/checkpoints; starting from step 0")
        return 0, {}, None
    weights, optim_state, sched_state, state = checkpoint.read(path)
    checkpoint.check_weights(path, st.model, weights)
    checkpoint.check_layout(path, optim_state, sharded=False)
    changes = fingerprint.check(path, state["trainer"].get("fingerprint"), st.fp, cfg.resume_changes, say)
    checkpoint.apply(st.model, opt, weights, optim_state)
    trainer = checkpoint.restore(sched, sched_state, state)
    if changes:
        fingerprint.apply_optimizer_settings(opt, sched, cfg)
    total = total_steps(cfg, len(st.items), 1)
    if rundir.nothing_left(trainer["step"], total, trainer.get("finished", False)):
        say(f"{cfg.output}: the run already finished at step {trainer['step']}; nothing to do (to train it "
            f"further: --resume auto --max-steps N, N > {trainer['step']})")
        return None, changes, path
    say(f"resumed from {path} (step {trainer['step']})")
    return trainer["step"], changes, path


def _loop(st: _State, opt, sched, params, start: int, total: int, log: MetricsLog):
    cfg = st.cfg
    per_step = cfg.batch_size * cfg.grad_accum
    console = Console(total, cfg.progress, start, label="reward", messages=True)
    history, stopped, done = [], "", start
    stop = signals.StopRequest()
    for step in range(start, total):
        done = step + 1
        record, grad_norm = _step(st, step_indices(len(st.items), step, per_step, cfg.seed), params)
        if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
            stopped = "a non-finite loss or gradient"
            opt.zero_grad(set_to_none=True)
            break
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        record.update({"step": done, "epoch": done * per_step / len(st.items), "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm})
        if st.eval_items and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            held_out = evaluate(st)
            record.update({f"eval/{k}": v for k, v in held_out.items()})
            console.say(f"eval at step {done}: {progress_info(held_out, EVAL_KEYS)}")
        if done % cfg.log_every == 0 or done == total:
            log.write(record)
            history.append(record)
            console.update(done, record)
        if stop.signum:
            stopped = f"signal {signal.Signals(stop.signum).name}"
        if stopped or (cfg.save_every and done % cfg.save_every == 0 and done < total):
            _save_checkpoint(st, opt, sched, done)
        if stopped:
            break
    console.close()
    return history, stopped, done


def _finish(st: _State, opt, sched, history, stopped: str, done: int, log: MetricsLog, say) -> RewardRun:
    cfg = st.cfg
    if stopped.startswith("a non-finite"):
        raise UserError(f"step {done}: {stopped}; no model written. Lower --lr or check the data rows")
    final_eval = {}
    if not stopped and st.eval_items:
        final_eval = evaluate(st)
        log.write({"step": done, **{f"eval/{k}": v for k, v in final_eval.items()}})
    if not stopped:
        if cfg.save_model:
            reward_model.save(st.model, st.tokenizer, os.path.join(cfg.output, "model"), st.settings)
        _save_checkpoint(st, opt, sched, done, finished=True)  # last: finished means the model is complete
    else:
        say(f"stopped at step {done}: {stopped}; checkpoint saved in {cfg.output}/checkpoints, "
            f"continue with --resume auto")
    return RewardRun(cfg.output, done, history, final_eval, stopped, st.model, st.tokenizer)
