"""The output directory of a run: one writer at a time, never someone else's files, no half-written
model, nothing left over from the run it replaced.

- `claim` holds an exclusive lock (`fcntl.flock` on OUTPUT/.lock) for the whole run, taken before
  anything is written or loaded; a second run into the same directory is refused with the pid of
  the one that holds it. Under several processes only rank 0 locks (the others write nothing).
- Under the lock it checks what the directory holds: another tool's files or another prefalign run
  are never written over without --overwrite, and --resume OTHER/checkpoint never replaces a run.
- `begin` runs once the new run's data and model loaded: only then is the replaced run's output
  removed (a failing --overwrite run leaves the old one intact) and this run's rejects file, written
  to a temporary name while loading, moved into place.
- `swap_in` puts a finished directory (the model) in place by rename: a crash or a full disk
  leaves the previous one or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil

from prefalign.errors import UserError, os_error_line

LOCK = ".lock"
TMP = ".tmp-"  # prefix of every temporary name prefalign writes in a run directory
# What a run writes besides config.yaml, its checkpoints and its rejects: removed when a run is replaced.
OUTPUTS = ("checkpoints", "model", "merged", "plots", "metrics.jsonl", "tb")
REJECTS = ("rejects.jsonl", "rejects_eval.jsonl")
STAGED = ".new"  # a rejects file while its run has not started for real
# Harmless in a directory about to be used: ours (the lock, a failed start's rejects) or a content-keyed cache.
NEUTRAL = (LOCK, "ref_cache", *(r + STAGED for r in REJECTS))
FINISHED_MARKS = ("model", "merged", "plots")  # written only at the end of a run
_STEP_DIR = re.compile(r"^step-(\d+)$")  # a checkpoint's directory (checkpoint.save writes them)


def staged(output: str, name: str) -> str:
    """Where a run writes `name` until it starts for real (see `begin`); a run that fails to start
    leaves it there for the user to read."""
    return os.path.join(output, name + STAGED)


def published(path: str) -> str:
    """The name a staged file gets when its run starts."""
    return path[: -len(STAGED)] if path and path.endswith(STAGED) else path


def list_checkpoints(root: str) -> list[str]:
    """Checkpoint directories (step-N) under root, oldest first (temporary ones excluded)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return [os.path.join(root, d) for _, d in sorted(found)]


def latest_checkpoint(output: str) -> tuple[int, bool] | None:
    """(step, finished) of the newest checkpoint directory, read without validating it: enough to
    say what a directory holds, never used to resume."""
    found = list_checkpoints(os.path.join(output, "checkpoints"))
    if not found:
        return None
    try:
        with open(os.path.join(found[-1], "state.json")) as fh:
            state = json.load(fh)
        return int(state["step"]), bool(state.get("trainer", {}).get("finished"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holds_run_message(output: str, steps_flag: str) -> str:
    """The refusal for a directory holding a run; it suggests --resume auto only where that continues it
    (steps_flag: the command's flag for the run's length, --max-steps or ppo's --steps)."""
    last = latest_checkpoint(output)
    if last is None:
        return f"{output} already holds a run with no checkpoint to continue from; use --overwrite to replace it"
    step, finished = last
    if finished:
        return (f"{output} already holds a run, finished at step {step}; use --resume auto {steps_flag} N "
                f"(N > {step}) to train it further or --overwrite to replace it")
    return f"{output} already holds a run (checkpoint at step {step}); use --resume auto to continue it " \
           f"or --overwrite to replace it"


def _own_checkpoint(output: str, spec: str) -> bool:
    root = os.path.realpath(os.path.join(output, "checkpoints"))
    return os.path.dirname(os.path.realpath(spec.rstrip("/"))) == root


def check(cfg) -> None:
    """Refuse a directory this run must not write into (run under the lock)."""
    out = cfg.output
    try:
        names = [n for n in os.listdir(out) if n not in NEUTRAL and not n.startswith(TMP)]
    except OSError as e:
        raise UserError(f"--output {out}: {e.strerror}") from None
    if not names or cfg.overwrite:
        return
    if not os.path.isfile(os.path.join(out, "config.yaml")):
        listed = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(f"{out} is not empty and holds no prefalign run ({listed}); use --overwrite to write "
                        f"into it anyway, or choose another --output")
    if not cfg.resume:
        raise UserError(_holds_run_message(out, "--max-steps" if hasattr(cfg, "max_steps") else "--steps"))
    if cfg.resume != "auto" and not _own_checkpoint(out, cfg.resume):
        raise UserError(f"{out} already holds a run; resuming {cfg.resume} into it would replace it: use "
                        f"--overwrite to replace it, or another --output")


def check_nothing_finished(cfg) -> None:
    """--resume with no checkpoint starts from step 0: refused where that would retrain a finished
    run, unless --overwrite says to replace it."""
    output = cfg.output
    if not cfg.overwrite and any(os.path.exists(os.path.join(output, n)) for n in FINISHED_MARKS):
        raise UserError(f"{output} holds a finished run but no valid checkpoint to continue from; "
                        f"use --overwrite to replace it, or another --output")


def nothing_left(step: int, total: int, finished: bool) -> bool:
    """After reading the checkpoint of step `step`, for a run of `total` steps: True when the run
    already finished there (nothing to do); False when steps (or only the final save) remain."""
    if step < total or (step == total and not finished):
        return False
    if finished:
        return True
    raise UserError(f"the checkpoint is at step {step}, beyond this run's {total} steps; "
                    f"raise --max-steps above {step} to continue it")


def _lock(output: str) -> int:
    path = os.path.join(output, LOCK)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a failed start that created the directory just removed it
            os.makedirs(output, exist_ok=True)
            continue
        except OSError as e:
            raise UserError(f"--output {output}: cannot create {LOCK}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise UserError(f"--output {output}: cannot lock {LOCK}: {e.strerror}") from None
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{output} is in use by pid {pid} (another prefalign run); wait for it to end "
                            f"or choose another --output") from None
        # The previous holder removes the file when it ends; a lock on a removed file guards nothing.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _unlock(fd: int, output: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(output, LOCK))  # while still locked: see _lock
    os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def claim(cfg):
    """Hold OUTPUT for one run (see the module docstring)."""
    out = cfg.output
    if not out:
        raise UserError("no output directory given (--output)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output {out} exists and is not a directory")
    lead = os.environ.get("RANK", "0") == "0"
    fd, created = None, not os.path.exists(out)
    if lead:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            e.filename = e.filename or out
            raise UserError(f"--output {os_error_line(e)} (cannot create it)") from None
        fd = _lock(out)
    try:
        if lead:
            check(cfg)
            for name in REJECTS:  # the rejects writer appends: start from nothing
                remove(staged(out, name))
        yield
    finally:
        if fd is not None:
            _unlock(fd, out)
            if created:  # a start that failed before writing anything leaves no directory behind
                with contextlib.suppress(OSError):
                    os.rmdir(out)


def begin(output: str, replace: bool) -> None:
    """The new run's inputs loaded: now, and only now, it takes over the directory (rank 0).
    `replace`: a fresh start (or a resume from another run's checkpoint) replaces what is there."""
    for name in os.listdir(output):
        if name.startswith(TMP):
            remove(os.path.join(output, name))  # a killed run's leftovers; the lock says nobody uses them
    if replace:
        for name in OUTPUTS:
            remove(os.path.join(output, name))
    # The rejects file lists the rows this run skipped, once: rewritten whole, never appended to.
    for name in REJECTS:
        final = os.path.join(output, name)
        if os.path.exists(staged(output, name)):
            os.replace(staged(output, name), final)
        elif os.path.exists(final):
            os.remove(final)


def swap_in(tmp: str, final: str) -> None:
    """Put the complete directory `tmp` in place of `final` by renames (the old one goes last)."""
    old = None
    if os.path.lexists(final):
        old = os.path.join(os.path.dirname(final) or ".", f"{TMP}old-{os.path.basename(final)}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        remove(old)


def follow_umask(root: str) -> None:
    """safetensors writes its files 0600; give every file under `root` the mode the umask allows,
    as any other tool's output gets."""
    mode = 0o666 & ~_umask()
    paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    for p in paths:
        os.chmod(p, mode)


def _umask() -> int:
    try:  # read, not set: os.umask would briefly change it for every thread of the process
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
