"""Metrics: metrics.jsonl (one object per step), the console, TensorBoard (the both-drop alarm: monitor.py).

Names follow the ecosystem (rewards/chosen, rewards/margins, logps/chosen, ...), so
dashboards built for TRL read prefalign runs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, else the peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def write_jsonl(path: str, rows) -> str:
    """Write `rows` (dicts) as JSON Lines, atomically: a crash never leaves half a file. Lines as
    data.jsonsafe.json_text writes them (readable non-ASCII, a lone surrogate escaped, what JSON
    cannot hold as its str). Returns the path."""
    from prefalign.data.jsonsafe import json_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json_text(r) + "\n" for r in rows)
    os.replace(tmp, path)
    return path


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics file. A process killed mid-write can leave a cut-off last
    line; it is dropped (the resumed run writes that step again) rather than failing the resume."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # damage in the middle is not a crash artefact: say where
                from prefalign.errors import UserError

                raise UserError(f"{path}, line {i + 1}: not valid JSON; the metrics file is damaged") from None
    return records


class MetricsLog:
    """Appends one JSON line per logged step; on resume, drops lines past the checkpoint first."""

    def __init__(self, output: str, enabled: bool, tensorboard: bool = False, resume_step: int | None = None):
        self.path = os.path.join(output, "metrics.jsonl")
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            # The steps after the checkpoint will be run again: their old lines must go,
            # so no step appears twice in the file.
            write_jsonl(self.path, [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step])
        elif os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from prefalign.errors import UserError

                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(os.path.join(output, "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def progress_info(record: dict, keys) -> str:
    """'loss 0.6931  rewards/margins 0.01 ...': each of `keys` the record has, under its full
    name (a cut name is ambiguous: logps/chosen vs rewards/chosen). A value that is not a
    finite number (no desirable rows in a KTO batch: nan; null in metrics.jsonl) shows '-'."""
    parts = []
    for k in keys:
        if k not in record:
            continue
        v = record[k]
        finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        parts.append(f"{k} {v:.4g}" if finite else f"{k} -")
    return "  ".join(parts)


EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins")  # the held-out figures the console shows


def run_summary(*, stats: dict, steps: int, start: int, batch: int, accum: int, world: int, unit: str,
                trainable: int, params: int, precision: str, reference: str, tokens_per_step: float) -> str:
    """The run in two lines, printed once before the first step: what was read, what will run."""
    resumed = f" (resuming at step {start})" if start else ""
    return (f"data: {stats.get('rows', 0)} rows used, {stats.get('skipped', 0)} skipped, "
            f"{stats.get('truncated', 0)} truncated\n"
            f"run: {steps} steps{resumed} of {batch * accum * world} {unit} (batch {batch} x accum {accum} x "
            f"{world} processes), ~{tokens_per_step:.0f} tokens/step, {trainable:,} of {params:,} parameters "
            f"trainable ({100 * trainable / max(params, 1):.2f}%), precision {precision}, reference {reference}")


def plain_every(total: int) -> int:
    """Steps between two plain progress lines: about 20 per run."""
    return max(1, total // 20)


class Console:
    """A progress bar with ETA and the key figures (rich), or plain lines when not a TTY."""

    KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logratio/pairs", "kl")

    def __init__(self, total: int, enabled: bool, start: int = 0, label: str = "train", messages: bool | None = None):
        self.enabled = enabled
        # Messages (resumed from, skipped checkpoint, non-finite step) matter even without a
        # progress bar: `messages` keeps them on under --no-progress (off on ranks other than 0).
        self.messages = enabled if messages is None else messages
        self.total = total
        self.t0 = time.time()
        self.start = start
        self.progress = None
        # Without a terminal (a log file, a job scheduler) one line per step buries the log: about
        # 20 lines per run, plus the last step's.
        self.every = plain_every(total)
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.progress.add_task(label, total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        info = progress_info(record, self.KEYS)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg)
        elif self.messages:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class Phase:
    """Progress of a phase before training (the reference pass): a rich bar on a terminal, else
    a plain line about every tenth of the way and at the end. Call it with the units just done."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.done, self.t0 = label, total, 0, time.time()
        self.enabled, self.bar, self.next_line = enabled and total > 0, None, 0
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task(label, total=total)
            self.bar.start()

    def __call__(self, n: int) -> None:
        if not self.enabled:
            return
        self.done = min(self.total, self.done + n)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            if self.done >= self.total:
                self.bar.stop()
        elif self.done >= self.next_line or self.done == self.total:
            self.next_line = self.done + max(1, self.total // 10)
            print(f"{self.label}: {self.done}/{self.total}  {time.time() - self.t0:.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
