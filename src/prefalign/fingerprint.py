"""The identity of a run, stored in every checkpoint, so a resume cannot silently change it.

A fingerprint is a flat mapping: the config fields that change the training trajectory, the
pairs per optimizer step, SHA-256 digests of the data files, and the identity of the model,
reference and tokenizer. Resuming compares the checkpoint's fingerprint with the new run's;
any difference is refused (one line listing `field: old -> new`) unless the user passes
`--resume-changes allow`, and then it is applied, logged and kept in config.yaml's history.
"""

from __future__ import annotations

import hashlib
import json
import os

from prefalign import hardware
from prefalign.config import FIELDS, TrainConfig
from prefalign.errors import UserError, os_error_line

# Fields that do not change what the run computes: where it writes, how often it logs, saves,
# evaluates or monitors, how long it runs (a finished run may be continued to more steps), and
# the layout of the same math (packing, chunking, attention kernel, micro-batch split - the
# pairs per step are fingerprinted instead). Every other field, including ones added later, is
# a trajectory field: an unknown field is refused, never silently accepted.
NOT_TRAJECTORY = frozenset({
    "output", "resume", "overwrite", "resume_changes", "max_steps", "epochs", "log_every", "eval_every",
    "save_every", "keep_checkpoints", "tensorboard", "progress", "save_model", "merge_lora",
    "both_drop_threshold", "both_drop_stop", "monitor_every", "monitor_pairs", "max_nonfinite",
    "chunk_size", "packing", "token_budget", "attention", "lean_mlp", "sharding", "cache_dir",
    "on_bad_row", "trust_remote_code", "batch_size", "grad_accum", "gradient_checkpointing",
})
# The loss's settings enter as the loss the run really computes (its terms, weights and full
# parameters, defaults included), not as the fields that spell it: `--beta 0.1` and the default
# beta of dpo are the same run, and config.yaml records the resolved parameters.
LOSS_FIELDS = frozenset({"loss", "loss_weights", "loss_params", "beta", "label_smoothing", "gamma", "rpo_alpha",
                         "desirable_weight", "undesirable_weight", "ipo_average_logps"})
# Identity entries computed from files rather than copied from the config.
_SOURCES = ("data", "eval_data", "model", "ref_model", "tokenizer")
_SAMPLE = 1 << 20  # bytes read from each end of a large weights file
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def _sha(h, path: str) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def _sampled(h, path: str) -> None:
    """Weights files can be many GB: their size and first and last MiB stand for them. The
    header (tensor names, shapes, offsets) and the first and last tensors differ between any
    two checkpoints worth telling apart, and this costs milliseconds, not minutes."""
    size = os.path.getsize(path)
    if size <= 2 * _SAMPLE:
        return _sha(h, path)
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_SAMPLE))
        fh.seek(size - _SAMPLE)
        h.update(fh.read(_SAMPLE))


def file_digest(path: str) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents), weights
    files sampled; a name that is not a local path (a hub id) is its own identity."""
    if not path:
        return ""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return "name:" + path
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, dirs, names in os.walk(path) for f in names
        if not any(part.startswith(".") for part in os.path.relpath(os.path.join(root, f), path).split(os.sep)))
    for f in files:
        h.update(os.path.relpath(f, path).encode() + b"\0")
        try:
            (_sampled if f.endswith(_WEIGHTS) else _sha)(h, f)
        except OSError as e:
            e.filename = e.filename or f
            raise UserError(f"{os_error_line(e)} (reading it to fingerprint the run)") from None
    return h.hexdigest()


def model_digest(model) -> str:
    """An in-process model's identity: its config and the names and shapes of its weights."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode() if hasattr(config, "to_json_string")
                 else repr(config).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}\n".encode())
    return h.hexdigest()


def of_run(cfg: TrainConfig, world: int = 1, model=None, ref_model=None, tokenizer=None) -> dict:
    """The fingerprint of the run `cfg` describes, on `world` processes. In-process objects
    (the demo, the experiments, tests) stand in for the paths they replace."""
    # Files are compared by content: a dataset or model moved to another path is the same run.
    from prefalign.objective import loss_plan

    skip = NOT_TRAJECTORY | LOSS_FIELDS
    fp = {name: getattr(cfg, name) for name in FIELDS if name not in skip and name not in _SOURCES}
    plan = loss_plan(cfg)
    fp["loss"] = "sft" if plan is None else plan.name
    if plan is not None:  # named as config.yaml's loss_params names them: beta, or dpo.beta in a combination
        single = len(plan.params) == 1
        fp.update({(k if single else f"{t}.{k}"): v for t, p in plan.params.items() for k, v in p.items()})
        if not single:
            fp["loss_weights"] = plan.weights
    fp["precision"] = hardware.concrete(cfg.precision)  # auto is what it runs as on this machine
    fp["paths"] = {key: getattr(cfg, key) for key in _SOURCES}
    fp["pairs_per_step"] = cfg.batch_size * cfg.grad_accum * world
    given = {"model": model, "ref_model": ref_model, "tokenizer": tokenizer}
    for key in _SOURCES:
        obj = given.get(key)
        if obj is not None:
            fp[key + "/sha256"] = "in-process:" + (model_digest(obj) if hasattr(obj, "named_parameters")
                                                   else type(obj).__name__)
        else:
            fp[key + "/sha256"] = file_digest(getattr(cfg, key))
    return json.loads(json.dumps(fp))  # plain JSON values, as a checkpoint stores them


def _short(v) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    if isinstance(v, str) and v.startswith("in-process:"):
        return v[:23]
    return repr(v) if isinstance(v, str) else str(v)


def differences(old: dict, new: dict) -> dict:
    """{field: [old, new]} for every field both fingerprints have and that differs, with the
    path of each file whose content changed (when the path changed too). A field only one side
    knows (a newer or older prefalign) cannot be compared and is left out."""
    out = {}
    for k in new:
        if k != "paths" and k in old and old[k] != new[k]:
            name = k.removesuffix("/sha256")
            was, now = old.get("paths", {}).get(name), new.get("paths", {}).get(name)
            if k != name and was is not None and was != now:
                out[name] = [was, now]
            out[k] = [old[k], new[k]]
    return out


def describe(changes: dict) -> str:
    return "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())


def check(path: str, saved: dict | None, current: dict, policy: str, say) -> dict:
    """Compare a checkpoint's fingerprint with this run's: the changes to apply ({} = none).
    Raises a UserError listing them unless `policy` is 'allow'."""
    if saved is None:
        say(f"warning: checkpoint {path} has no run fingerprint (an older prefalign wrote it); cannot check "
            f"that the data, model and settings are those of the original run")
        return {}
    changes = differences(saved, current)
    if changes and policy != "allow":
        raise UserError(f"cannot resume from {path}: the run changed ({describe(changes)}); resume with the "
                        f"original settings, or pass --resume-changes allow to apply the changes")
    if changes:
        say(f"resuming with changes (--resume-changes allow): {describe(changes)}")
    return changes


def apply_optimizer_settings(optimizer, scheduler, cfg: TrainConfig) -> None:
    """After restoring a checkpoint with allowed changes: its optimizer and scheduler state carry
    the OLD lr, betas and weight decay; the run continues with the new ones (the loss, data and
    clipping settings are read from the config at each step already)."""
    for g in optimizer.param_groups:
        g.update(initial_lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs


def history(output: str) -> list:
    """The `history:` list of the run's config.yaml (empty when there is none)."""
    import yaml

    path = os.path.join(output, "config.yaml")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return []
    got = data.get("history") if isinstance(data, dict) else None
    return got if isinstance(got, list) else []


def write_config(output: str, values: dict, past: list, step: int, changes: dict) -> None:
    """config.yaml: the current config, and a `history:` of the changes each resume applied, so
    the file describes the whole run, not only its last leg."""
    import yaml

    entries = list(past) + ([{"step": step, "changes": changes}] if changes else [])
    doc = dict(values, **({"history": entries} if entries else {}))
    tmp = os.path.join(output, ".config.yaml.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    os.replace(tmp, os.path.join(output, "config.yaml"))
