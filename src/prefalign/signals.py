"""Clean stops on SIGINT / SIGTERM / SIGHUP, shared by every training loop (train, reward, ppo).

    with signals.handlers_restored():      # the caller's handlers come back when the run returns
        ... load ...
        stop = signals.StopRequest()       # from here a signal asks the loop to stop
        for step in ...:
            ...
            if stop.signal: checkpoint, break

A first signal lets the step finish, the loop save and the process exit 128+n; a second one
stops at once (KeyboardInterrupt), for a user who really means it. The handlers stay installed
after the loop, so a signal during the final evaluation and save lets them finish.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """Installs the stop handlers when made; `signal` is the first signal's name ("" = none)."""

    def __init__(self):
        self.signal = ""
        self.signum = 0
        for s in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, no stops
                signal.signal(s, self._handle)

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
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.float64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


@contextlib.contextmanager
def handlers_restored():
    """The signal handlers as they were before the run, once it ends (see StopRequest)."""
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / set outside Python
                signal.signal(s, h)
