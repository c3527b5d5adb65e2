"""Attention of packed rows computed segment by segment: its cost follows the real lengths.

A packed row [seg 1 | seg 2 | ... | padding] of length L gets one additive [L, L] mask from
data/packing; SDPA with a mask computes every (query, key) score of the row and masks
afterwards, so a token pays for the whole row: the other segments, the padding, the other
branch of its own pair, and the half of its own branch that causality hides.

Here each segment [prompt | branch 1 | branch 2 | ...] becomes SDPA calls that only see what the
mask allows:
  * queries prompt + branch 1, keys the same columns, plain causal (SDPA's is_causal kernels skip
    the hidden half);
  * queries branch k > 1, keys prompt + branch k (concatenated), causal shifted by the prompt
    length: query i sees keys 0 .. len(prompt) + i.
Padding columns get zeros (nothing reads them: they are never scored nor attended to by a real
token). Scores are the same numbers as the masked row's (a masked key adds exp(-huge) = 0 to the
softmax there), so values and gradients agree to float rounding (tests/test_speed_paths.py).

Mechanism: while `by_segment(model, packed)` is active, transformers' "sdpa" entry of its
attention registry points at a dispatcher that splits the call when the query is the active
packed batch's [R, H, L, D] and otherwise (another model, dropout, a recompute under gradient
checkpointing after the context ended) calls the original SDPA with the full mask, which is
still passed. It is on for CUDA only by default (see ENABLED).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Piece:
    """One SDPA call: queries [q0, q1) of a row against the keys of `kv` (column ranges, in order).
    shift None: plain causal (kv == queries); else query i sees the first shift + i + 1 keys."""

    q0: int
    q1: int
    kv: tuple[tuple[int, int], ...]
    shift: int | None


@dataclass
class Layout:
    rows: int
    length: int
    pieces: list[list[Piece]]  # per row, in column order; they tile [0, used) of the row
    used: list[int]  # per row: columns before the padding
    masks: dict  # (shift, n_q, device) -> bool mask [1, 1, n_q, shift + n_q], built once per batch


def plan(segment_ids: Tensor, branch_ids: Tensor) -> Layout:
    """The SDPA calls of a packed batch, from its segment and branch ids ([R, L] each)."""
    seg, br = segment_ids.cpu().tolist(), branch_ids.cpu().tolist()
    pieces, used = [], []
    for s_row, b_row in zip(seg, br):
        runs = _runs(s_row, b_row)  # [(segment, branch, start, end)], consecutive equal ids
        row, i = [], 0
        while i < len(runs):
            seg_id, branch, start, end = runs[i]
            if seg_id < 0:
                break  # padding: only at the end of a row
            # a segment: its prompt run (branch 0), then one run per completion branch
            prompt = (start, end)
            j = i + 1
            branches = []
            while j < len(runs) and runs[j][0] == seg_id:
                branches.append(runs[j][2:])
                j += 1
            first_end = branches[0][1] if branches else prompt[1]
            row.append(Piece(prompt[0], first_end, ((prompt[0], first_end),), None))
            for b0, b1 in branches[1:]:
                row.append(Piece(b0, b1, (prompt, (b0, b1)), prompt[1] - prompt[0]))
            i = j
        pieces.append(row)
        used.append(row[-1].q1 if row else 0)
    return Layout(len(seg), len(seg[0]) if seg else 0, pieces, used, {})


def _runs(seg: list[int], br: list[int]) -> list[tuple[int, int, int, int]]:
    out, start = [], 0
    for c in range(1, len(seg) + 1):
        if c == len(seg) or seg[c] != seg[start] or br[c] != br[start]:
            out.append((seg[start], br[start], start, c))
            start = c
    return out


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("prefalign_segment_layout", default=None)


# Off unless asked for (PREFALIGN_SEGMENT_ATTENTION=1, or True here: tests, A/B runs). On CPU
# (torch 2.13, AVX512 EPYC) the split measured slower: the CPU SDPA kernels' time does not follow
# the score count at these lengths (a causal 300-token call cost half of a 900-token one, not a
# ninth), so more, smaller calls lose (bench/segment_attention.py: 0.26x on 4 UltraFeedback-like
# pairs, SmolLM2's heads). On CUDA it is expected to win but has not been measured yet:
# bench/gpu_check.sh runs it against the masked path, and the default follows that measurement.
ENABLED: bool | None = None


def _shifted_mask(layout: Layout, shift: int, n: int, device) -> Tensor:
    key = (shift, n, str(device))
    if key not in layout.masks:
        layout.masks[key] = torch.ones(n, shift + n, dtype=torch.bool, device=device).tril(shift)[None, None]
    return layout.masks[key]


def _keys(t: Tensor, r: int, ranges) -> Tensor:
    parts = [t[r:r + 1, :, a:b] for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _split_attention(original, layout: Layout, module, query, key, value, scaling, kw) -> Tensor:
    rows = []
    for r, pieces in enumerate(layout.pieces):
        outs = []
        for pc in pieces:
            q = query[r:r + 1, :, pc.q0:pc.q1]
            k, v = _keys(key, r, pc.kv), _keys(value, r, pc.kv)
            mask = None if pc.shift is None else _shifted_mask(layout, pc.shift, pc.q1 - pc.q0, query.device)
            o, _ = original(module, q, k, v, mask, dropout=0.0, scaling=scaling, is_causal=mask is None, **kw)
            outs.append(o)  # [1, n, H, D]
        pad = layout.length - layout.used[r]
        if pad:
            outs.append(query.new_zeros(1, pad, query.shape[1], query.shape[3]))
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def _dispatcher(original):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        layout = _ACTIVE.get()
        kw.pop("is_causal", None)
        fits = (layout is not None and not dropout and kw.get("position_bias") is None
                and kw.get("softcap") is None and query.shape[0] == layout.rows
                and query.shape[2] == layout.length == key.shape[2])
        if not fits:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
        return _split_attention(original, layout, module, query, key, value, scaling, kw), None
    attention._prefalign_original = original
    return attention


@contextlib.contextmanager
def by_segment(model, packed):
    """Within: the model's SDPA attention over `packed`'s rows runs segment by segment."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    on = ENABLED if ENABLED is not None else os.environ.get("PREFALIGN_SEGMENT_ATTENTION", "") not in ("", "0")
    if impl != "sdpa" or not on:
        yield
        return
    from transformers.modeling_utils import AttentionInterface

    registry = AttentionInterface._global_mapping
    previous = registry["sdpa"]
    original = getattr(previous, "_prefalign_original", previous)
    registry["sdpa"] = _dispatcher(original)
    token = _ACTIVE.set(plan(packed.segment_ids, packed.branch_ids))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        registry["sdpa"] = previous
