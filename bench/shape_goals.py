"""Issue 16's goals for bench/real_shapes.py's rows, and the bound that stops a row that misses one.

Goals (fp32, side by side in one run): UltraFeedback-like >= 3x TRL's pairs/s and <= 0.5x its peak
RSS; short answers >= 2x pairs/s.

Speed bound: the work both tools must do per step, in matmul FLOPs (forward 2, backward 4, reference
forward 2 per parameter per column), from the pairs each timed step holds:
  TRL        2B rows (chosen, rejected), each padded to the batch's longest prompt + completion; the
             tied head over every column
  prefalign  its packed columns (each prompt once, `auto_budget`'s layout, padding included); the
             head over completion tokens only, plus the chunked head's recompute in the backward
At TRL's own FLOP efficiency, prefalign's step could be at most (TRL work / prefalign work) faster.
A goal above that figure needs prefalign to run its matmuls at a higher efficiency than TRL does on
the same shapes, which on a CPU bound by the same BLAS calls is not on offer: the rest of the step
(optimizer, clipping, norms, activations) also scales with the same weights and tokens.
Memory bound: the fp32 training state (weights, gradients, two AdamW moments, the reference copy:
5 x 4 bytes per parameter) over TRL's peak RSS.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

GOALS = {"ultrafeedback": {"pairs_per_s": 3.0, "peak_rss": 0.5}, "short": {"pairs_per_s": 2.0}}


def kind_of(name: str) -> str | None:
    return next((k for k in GOALS if f"/{k}/" in name), None)


def pair_lengths(model_dir: str, data: str, max_length: int) -> list[tuple[int, int, int]]:
    from transformers import AutoTokenizer

    from prefalign.data.formats import load_examples
    from prefalign.data.tokenize import tokenize_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    items = tokenize_examples(load_examples(data, kind="paired").examples, tok, max_length, max_length - 1).items
    return [(len(i.prompt_ids), len(i.chosen_ids), len(i.rejected_ids)) for i in items]


def step_work(lengths: list[tuple[int, int, int]], hidden: int, n_body: int, n_head: int) -> tuple[float, float]:
    """(TRL, prefalign) matmul FLOPs of one step over these pairs (see the module docstring)."""
    from prefalign.data.packing import auto_budget, first_fit

    trl_cols = 2 * len(lengths) * max(p + max(c, r) for p, c, r in lengths)
    seg = [p + c + r for p, c, r in lengths]
    rows = first_fit(seg, auto_budget(seg, 6 * hidden))
    pa_cols = len(rows) * max(sum(seg[i] for i in row) for row in rows)
    scored = sum(c + r for _, c, r in lengths)
    return 8.0 * trl_cols * (n_body + n_head), 8.0 * pa_cols * n_body + 10.0 * scored * n_head


def speed_bound(row: dict) -> float:
    """prefalign / TRL pairs/s at equal FLOP efficiency, over the row's timed steps."""
    import json

    import dpo_vs_trl as shared

    with open(os.path.join(row["model_dir"], "config.json")) as fh:
        hidden = json.load(fh)["hidden_size"]
    n = shared._n_params(row["model_dir"])
    n_head = n["embedding"] if n["head"] == 0 else n["head"]
    n_body = n["non_embedding"] - (n["head"] if n["head"] else 0)
    lengths = pair_lengths(row["model_dir"], row["data"], row["max_length"])
    b, order = row["batch"], row["order"]
    steps = row["prefalign"]["timed_steps"]
    trl = pa = 0.0
    for s in range(row["warmup"], row["warmup"] + steps):
        t, p = step_work([lengths[order[i]] for i in range(s * b, (s + 1) * b)], hidden, n_body, n_head)
        trl, pa = trl + t, pa + p
    return trl / pa


def goal_lines(row: dict) -> list[str]:
    """One line per goal the row misses, with its bound; [] when it meets them (or has no TRL)."""
    kind = kind_of(row["name"])
    if kind is None or "ratios" not in row or "model_dir" not in row:
        return []
    lines, goal, got = [], GOALS[kind], row["ratios"]
    if got["pairs_per_s"] < goal["pairs_per_s"]:
        bound = speed_bound(row)
        mfu = row.get("bounds", {}).get("trl_mfu") if row.get("precision") == "fp32" else None  # fp32 peak
        lines.append(f"  missed: {got['pairs_per_s']:.2f}x < {goal['pairs_per_s']:.0f}x pairs/s; bound: the matmul work "
                     f"each tool must do (weights x columns) is {bound:.2f}x less for prefalign: more needs it to run "
                     f"its matmuls faster than TRL does{f' ({100 * mfu:.0f}% of the matmul peak)' if mfu else ''}")
    if "peak_rss" in goal and got["peak_rss"] > goal["peak_rss"]:
        floor = row.get("bounds", {}).get("rss_ratio_floor", float("nan"))
        lines.append(f"  missed: {got['peak_rss']:.2f}x > {goal['peak_rss']}x peak RSS; bound: fp32 training state "
                     f"alone is {floor:.2f}x of TRL's peak")
    if not lines:
        lines.append("  goal met")
    return lines
