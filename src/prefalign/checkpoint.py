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
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from prefalign.errors import UserError
from prefalign.rundir import follow_umask

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    save_file(weights, os.path.join(tmp, "weights.safetensors"))
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()},
               os.path.join(tmp, "optim.pt"))
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
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Checkpoint directories under root, oldest first (temporary ones excluded)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return [os.path.join(root, d) for _, d in sorted(found)]


def validate(path: str) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return "no manifest (the write did not finish)"
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return "unreadable manifest"
    for name, meta in manifest.get("files", {}).items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return f"missing {name}"
        if os.path.getsize(f) != meta["bytes"]:
            return f"{name} has {os.path.getsize(f)} bytes, expected {meta['bytes']} (truncated)"
        if _digest(f) != meta["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
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


def read(path: str) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(weights, optimizer state, scheduler state, {"step", "trainer", "rng"}) of a checkpoint."""
    weights = load_file(os.path.join(path, "weights.safetensors"))
    # weights_only: never unpickle arbitrary objects from disk.
    opt = torch.load(os.path.join(path, "optim.pt"), weights_only=True)
    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    return weights, opt["optimizer"], opt["scheduler"], state


def check_weights(path: str, model, weights: dict) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise UserError(f"checkpoint {path} does not match this model (missing {missing[0]}, ...)")


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
    optimizer.load_state_dict(optim_state)


def restore(scheduler, sched_state: dict, state: dict) -> dict:
    """Scheduler and RNG back as saved; the trainer state with its step."""
    scheduler.load_state_dict(sched_state)
    set_rng_state(state["rng"])
    return {"step": state["step"], **state["trainer"]}
