"""The both-drop alarm, measured on a fixed monitor set.

DPO sees only the margin between chosen and rejected, so it can widen it by pushing BOTH
responses down, which usually precedes degenerate generations. Comparing one step's training
mini-batch with another's compares different examples, and the first step's margin is exactly
0, so any later margin "grows": that alarm fired on noise. Here the same pairs (a held-out
slice of --eval-data, else a seeded sample of the training pairs) are scored by the policy
before the first update and every `monitor_every` steps, and the alarm fires when, on those
pairs, the chosen per-token log-prob fell by more than both the threshold and its noise while
the margin grew beyond its noise.
"""

from __future__ import annotations

import math

import torch

Z = 3.0  # standard errors a change must exceed to count as real, not sampling noise


def pick(items: list, eval_items: list, n: int, seed: int) -> tuple[list, str]:
    """The monitor set and where it comes from: held-out pairs when there are some (they say
    what the model does beyond the data it is fitting), else n training pairs chosen by seed."""
    if eval_items:
        return eval_items[:n], "held-out"
    g = torch.Generator().manual_seed(seed * 7919 + 1)
    idx = sorted(torch.randperm(len(items), generator=g)[:n].tolist())
    return [items[i] for i in idx], "training"


def per_pair(logps) -> dict[str, list[float]]:
    """From a PairLogps: each pair's chosen log-prob per token, and its margin (summed chosen
    minus summed rejected log-prob; with a fixed reference its change is the change of the
    implicit reward margin divided by beta)."""
    chosen = (logps.chosen.double() / logps.chosen_count.clamp(min=1).double()).tolist()
    margin = (logps.chosen.double() - logps.rejected.double()).tolist()
    return {"chosen": chosen, "margin": margin}


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def both_drop(start: dict, now: dict, threshold: float, z: float = Z) -> dict:
    """The alarm's statistic on the same pairs at two times (`per_pair` outputs).

    chosen_drop: mean fall of the chosen per-token log-prob (nats); it counts when it exceeds
    max(threshold, z standard errors of the per-pair falls). margin_growth: mean rise of the
    margin; it counts when positive and beyond z standard errors. Pure: no model, no state."""
    drop, drop_se = _mean_se([a - b for a, b in zip(start["chosen"], now["chosen"])])
    growth, growth_se = _mean_se([b - a for a, b in zip(start["margin"], now["margin"])])
    fired = drop > max(threshold, z * drop_se) and growth > 0 and growth > z * growth_se
    return {"chosen_drop": drop, "chosen_drop_se": drop_se, "margin_growth": growth,
            "margin_growth_se": growth_se, "fired": fired}


class BothDropMonitor:
    """The monitor set, its step-0 scores, the alarm's state, and what each scoring logs. The
    state goes into checkpoints, so a resumed run compares with the same step-0 scores."""

    def __init__(self, items: list, source: str, threshold: float, every: int, state: dict | None = None):
        self.items, self.source, self.threshold, self.every = items, source, threshold, every
        self.rows = row_ids(items)
        state = state or {}
        # A resume onto other data (--resume-changes allow) gets a new set and a new baseline.
        self.start = state.get("start") if state.get("rows") == self.rows else None
        self.fired_at = state.get("fired_at")

    def state(self) -> dict:
        return {"rows": self.rows, "start": self.start, "fired_at": self.fired_at}

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def observe(self, step: int, now: dict) -> tuple[dict, bool]:
        """Record the scores after `step` updates: (metrics to log, True when the alarm fires
        for the first time). The first scores seen become the baseline."""
        if self.start is None:
            self.start = now
        stat = both_drop(self.start, now, self.threshold)
        n = len(now["chosen"])
        record = {"monitor/logps_chosen": sum(now["chosen"]) / n, "monitor/margins": sum(now["margin"]) / n,
                  **{f"monitor/{k}": v for k, v in stat.items() if k != "fired"}}
        first = stat["fired"] and self.fired_at is None
        if first:
            self.fired_at = step
        return record, first

    def message(self, step: int, record: dict) -> str:
        return (f"step {step}: BOTH-DROP ALARM: on {len(self.items)} fixed {self.source} pairs the chosen "
                f"log-prob/token fell {record['monitor/chosen_drop']:.3f} nats (se "
                f"{record['monitor/chosen_drop_se']:.3f}) below step 0's while the margin grew "
                f"{record['monitor/margin_growth']:.3f} nats; the loss is pushing both responses down")


def for_run(s, cfg, total: int, state: dict | None) -> BothDropMonitor | None:
    """The run's monitor, or None: off (monitor_every 0, or no scoring before the run ends) and
    for losses without pairs (SFT, KTO), where there is no chosen/rejected margin to watch."""
    if not cfg.monitor_every or cfg.monitor_every > total or s.spec is None or s.spec.kind != "paired":
        return None
    items, source = pick(s.items, s.eval_items, cfg.monitor_pairs, cfg.seed)
    return BothDropMonitor(items, source, cfg.both_drop_threshold, cfg.monitor_every, state)


def score(s, cfg, ac, items) -> dict[str, list[float]]:
    """The policy's per-pair scores on the monitor set, through the evaluation path."""
    from prefalign.evaluation import policy_pair_logps

    return per_pair(policy_pair_logps(s, cfg, ac, items))


def row_ids(items: list) -> list[str]:
    return [f"{getattr(i, 'source', '')}:{getattr(i, 'row', k)}" for k, i in enumerate(items)]
