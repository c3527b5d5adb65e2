"""Atomic, validated checkpoints: everything needed to continue a run exactly.

A checkpoint is a directory `step-000123/` holding the trainable weights
(safetensors), the optimizer and scheduler state, the RNG states and the trainer
state (step, data position, alarms). It is written under a temporary name and
renamed into place, and carries a manifest of file sizes and SHA-256 digests, so a
checkpoint cut short by a crash is never mistaken for a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prefalign.errors import UserError, os_error_from
from prefalign.rundir import follow_umask, list_checkpoints  # noqa: F401  (list_checkpoints: also this module's API)

MANIFEST = "manifest.json"


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights that training changes: all of them, or only the LoRA adapters."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in names}


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save(root: str, step: int, weights: dict[str, torch.Tensor], optim_state: dict, scheduler,
         trainer_state: dict, keep: int) -> str:
    """Write checkpoint `root/step-N` atomically and prune to the newest `keep`.

    `weights`: the trainable weights (`trainable_state`, or gathered shards under FSDP);
    `optim_state`: the optimizer's state dict."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}-{os.getpid()}")
    # Half-written checkpoints of a killed run are never read (list_checkpoints skips them); the
    # run directory's lock (rundir.claim) lets one process write here, so any temporary left is garbage.
    for d in os.listdir(root):
        if d.startswith(".tmp-step-"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write(tmp, step, weights, optim_state, scheduler, trainer_state)
    except BaseException as e:  # a full disk, a signal: no half checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        error = os_error_from(e, final)
        if error is None:
            raise
        error.filename = final  # not the temporary name, which is gone
        raise error from None
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: str, step: int, weights, optim_state, scheduler, trainer_state) -> None:
    save_file(weights, os.path.join(tmp, "weights.safetensors"))
    with open(os.path.join(tmp, "optim.pt"), "wb") as fh:  # a file object: a failed write is an OSError
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, fh)
    with open(os.path.join(tmp, "state.json"), "w") as fh:
        json.dump({"step": step, "trainer": trainer_state, "rng": rng_state()}, fh)
    files = sorted(os.listdir(tmp))
    manifest = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": _digest(os.path.join(tmp, f))}
                for f in files}
    with open(os.path.join(tmp, MANIFEST), "w") as fh:
        json.dump({"step": step, "files": manifest}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    follow_umask(tmp)


FILES = ("weights.safetensors", "optim.pt", "state.json")


def validate(path: str) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return "no manifest (the write did not finish)"
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
        return "unreadable manifest"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(_is_entry(m) for m in files.values()):
        return "manifest has the wrong structure (not written by prefalign, or edited)"
    for name in FILES:
        if name not in files:
            return f"the manifest does not list {name}"
    for name, meta in files.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return f"missing {name}"
        if os.path.getsize(f) != meta["bytes"]:
            return f"{name} has {os.path.getsize(f)} bytes, expected {meta['bytes']} (truncated)"
        if _digest(f) != meta["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return _contents_problem(path)


def _is_entry(meta) -> bool:
    return (isinstance(meta, dict) and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str))


def _contents_problem(path: str) -> str | None:
    """Files that match their manifest can still be wrong inside (written damaged, or the
    manifest rewritten to match): each must parse and hold what `read` and `restore` use."""
    try:
        read(path, check_only=True)
    except UserError as e:
        return str(e).removeprefix(f"checkpoint {path}: ")
    return None


def find_resume(root: str, spec: str, warn=print) -> str | None:
    """The checkpoint to resume from: a named one (must be valid), or the newest valid one."""
    if spec not in ("", "auto"):
        problem = validate(spec) if os.path.isdir(spec) else "not found"
        if problem:
            raise UserError(f"cannot resume from {spec}: {problem}")
        return spec
    for path in reversed(list_checkpoints(root)):
        problem = validate(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}; falling back to the previous one")
    return None


def read(path: str, check_only: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(weights, optimizer state, scheduler state, {"step", "trainer", "rng"}) of a checkpoint.
    A file that does not parse, or lacks what a resume needs, is a UserError naming it.
    check_only: read the weights' header and map the optimizer state, without loading them."""
    def damaged(name, why):
        return UserError(f"checkpoint {path}: {name} is damaged ({why})")

    try:
        wpath = os.path.join(path, "weights.safetensors")
        if check_only:
            with safe_open(wpath, "pt") as fh:
                weights = dict.fromkeys(fh.keys())
        else:
            weights = load_file(wpath)
    except (SafetensorError, OSError) as e:
        raise damaged("weights.safetensors", e) from None
    try:
        # weights_only: never unpickle arbitrary objects from disk.
        opt = torch.load(os.path.join(path, "optim.pt"), weights_only=True, mmap=check_only)
    except Exception as e:  # torch raises many types for a bad archive; all mean the same here
        raise damaged("optim.pt", str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None
    if not (isinstance(opt, dict) and isinstance(opt.get("optimizer"), dict)
            and isinstance(opt.get("scheduler"), dict) and "param_groups" in opt["optimizer"]):
        raise damaged("optim.pt", "no optimizer and scheduler state")
    try:
        with open(os.path.join(path, "state.json")) as fh:
            state = json.load(fh)
    except (OSError, ValueError) as e:
        raise damaged("state.json", e) from None
    if not _state_ok(state):
        raise damaged("state.json", "missing or wrong step, trainer or rng fields")
    return weights, opt["optimizer"], opt["scheduler"], state


def _state_ok(state) -> bool:
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
            and isinstance(state.get("trainer"), dict) and isinstance(state.get("rng"), dict)):
        return False
    py, tr = state["rng"].get("python"), state["rng"].get("torch")
    # The lengths of CPython's Mersenne Twister state and of torch's CPU generator state.
    return (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list) and len(py[1]) == 625
            and isinstance(tr, list) and len(tr) == torch.get_rng_state().numel()
            and all(isinstance(b, int) and 0 <= b < 256 for b in tr))


def check_weights(path: str, model, weights: dict) -> None:
    """The checkpoint holds every trainable tensor of this model, with the same shapes, and
    nothing this model lacks."""
    own = dict(model.named_parameters())
    missing = [n for n, p in own.items() if p.requires_grad and n not in weights]
    if missing:
        raise UserError(f"checkpoint {path} does not match this model (missing {missing[0]}, ...)")
    extra = [n for n in weights if n not in own]
    if extra:
        raise UserError(f"checkpoint {path} does not match this model (it has {extra[0]}, which this model lacks)")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise UserError(f"checkpoint {path} does not match this model: {name} has shape "
                            f"{list(tensor.shape)} in the checkpoint, {list(own[name].shape)} in the model")


def check_layout(path: str, optim_state: dict, sharded: bool) -> None:
    """FSDP checkpoints key the optimizer state by parameter name, plain ones by index: a run
    resumes the way it was written (any number of processes, but FSDP or not as before)."""
    groups = optim_state.get("param_groups") or [{}]
    by_name = any(isinstance(p, str) for p in groups[0].get("params", []))
    if by_name != sharded:
        raise UserError(f"checkpoint {path} was written {'with' if by_name else 'without'} FSDP; resume it "
                        f"with --sharding {'fsdp' if by_name else 'none'} (any number of processes)")


def apply(model, optimizer, weights: dict, optim_state: dict) -> None:
    """Copy saved weights and optimizer state into a plain (unsharded) model and optimizer."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError, TypeError) as e:  # torch's own check: groups or sizes differ
        raise UserError(f"the checkpoint's optimizer state does not fit this model: {e}") from None


def restore(scheduler, sched_state: dict, state: dict) -> dict:
    """Scheduler and RNG back as saved; the trainer state with its step."""
    scheduler.load_state_dict(sched_state)
    set_rng_state(state["rng"])
    return {"step": state["step"], **state["trainer"]}
