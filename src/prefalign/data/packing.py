"""Prefix-shared, padding-free packing: each prompt is computed once, for all its completions.

A pair becomes one segment [prompt | chosen | rejected]:

    tokens     p0 p1 p2 | c0 c1 c2 c3 | r0 r1
    positions   0  1  2 |  3  4  5  6 |  3  4       rejected restarts after the prompt
    branch      0  0  0 |  1  1  1  1 |  2  2       0 = prompt, 1.. = completions

A token attends to earlier tokens of its own segment that are in the prompt or in its
own branch: rejected sees the prompt and earlier rejected tokens, never chosen. With
the same positions, every completion token then sees exactly what it would see in
its own unpacked row [prompt | completion], so its hidden state is the same.

Targets: the first token of every branch is predicted from the last prompt position
(p2 predicts c0 *and* r0); later tokens from the previous token of the same branch.

Segments are laid side by side in rows of at most `token_budget` tokens (first-fit
decreasing), block-diagonal: no segment sees another. Only the last columns of rows
shorter than the longest row are padding. The same layout holds one completion per
prompt (KTO, SFT) with `pack_completions`.

Attention: transformers (5.x) hands a user-provided 4D mask to the attention
implementation as-is (masking_utils._preprocess_mask_arguments). SDPA and eager get an
additive mask (0 / the dtype's min), one tensor every layer shares; 'flex_attention' takes a BlockMask built from the same rule (a mask_mod), whose
fully masked 128 x 128 blocks are skipped. `attention_mask_for(model, packed)` picks the right one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Sequence

import torch
from torch import Tensor

from prefalign import segment_attention
from prefalign.logprobs import SeqLogps, language_model, output_head, scored_logps

try:  # the tokenizer's dataclass; anything with prompt_ids/chosen_ids/rejected_ids works
    from prefalign.data.tokenize import TokenizedPair  # noqa: F401
except ImportError:  # pragma: no cover
    TokenizedPair = None

PAD_ID = 0  # input id of padding columns; they are masked and never scored, so any id works


@dataclass
class PackedBatch:
    """Several segments [prompt | branch 1 | ... | branch K] per row, block-diagonal.

    Output sequences are numbered seq = item * K + (branch - 1): for pairs (K = 2),
    chosen of item i is 2i and rejected 2i + 1. Items may have different numbers of
    branches (GRPO groups split by a micro-batch): then K = 0 and seq counts on through
    the items' branches in order.
    """

    input_ids: Tensor  # [R, L] long
    position_ids: Tensor  # [R, L] long, restart per segment and per branch after the prompt
    segment_ids: Tensor  # [R, L] long, segment index within the row, -1 on padding
    branch_ids: Tensor  # [R, L] long, 0 prompt, 1..K completion branch, -1 padding
    src: Tensor  # [N] long, flat index (row * L + col) of the position that predicts each scored token
    targets: Tensor  # [N] long, the scored token
    seq: Tensor  # [N] long, output sequence of each scored token
    num_items: int  # pairs (or prompts)
    num_branches: int  # K: 2 for pairs, 1 for single completions, 0 when items differ
    num_seqs: int  # output sequences: sum of every item's branches (num_items * K when K > 0)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.segment_ids >= 0).sum())

    def attention_mask(self, dtype: torch.dtype = torch.bool) -> Tensor:
        """[R, 1, L, L] mask: bool (True = may attend) or additive float (0 or dtype's min)."""
        seg, br = self.segment_ids, self.branch_ids
        L = seg.shape[1]
        same_segment = seg[:, :, None] == seg[:, None, :]  # [R, Lq, Lk]
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()  # k <= q (row order)
        visible_branch = (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])  # key in prompt or own branch
        allowed = same_segment & causal & visible_branch
        # Padding (segment -1) matches itself as a "segment": it attends causally to other
        # padding only, so no row is fully masked (fully masked rows give NaN in SDPA,
        # and NaN * 0 would leak into gradients).
        allowed = allowed[:, None]  # [R, 1, L, L]
        if dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(~allowed, torch.finfo(dtype).min)

    def block_mask(self, device: torch.device | str = "cpu"):
        """The same mask as a FlexAttention BlockMask [R, 1, L, L], built on `device`.

        Why: SDPA computes every (query, key) score of a row and masks afterwards, so a
        token pays for all the segments packed beside it; FlexAttention skips the 128 x 128
        blocks the mask_mod rules out (block-diagonal rows are mostly such blocks).
        """
        from torch.nn.attention.flex_attention import create_block_mask

        # The mask_mod indexes these inside the attention kernel: they must live on `device`.
        seg, br = self.segment_ids.to(device), self.branch_ids.to(device)  # [R, L] each

        def mask_mod(b, h, q, k):  # the bool mask of attention_mask(), one (q, k) at a time
            same_segment = seg[b, q] == seg[b, k]
            visible_branch = (br[b, k] == 0) | (br[b, k] == br[b, q])
            return same_segment & (k <= q) & visible_branch

        R, L = seg.shape
        return create_block_mask(mask_mod, R, None, L, L, device=device)


def _segment(prompt: Sequence[int], branches: Sequence[Sequence[int]]):
    """One segment's (ids, positions, branch ids, [(src offset, target, branch)])."""
    p = len(prompt)
    if p == 0:
        raise ValueError("packing needs a non-empty prompt: the first completion token is predicted from its last token")
    ids, pos, br, scored = list(prompt), list(range(p)), [0] * p, []
    for k, completion in enumerate(branches, start=1):
        start = len(ids)
        ids += completion
        pos += range(p, p + len(completion))
        br += [k] * len(completion)
        for j, tok in enumerate(completion):
            # token j of the branch is predicted from the last prompt token (j = 0) or its predecessor
            scored.append((p - 1 if j == 0 else start + j - 1, tok, k))
    return ids, pos, br, scored


def first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: longest segments first, each into the first row with room.
    Rows of segment indices; every length must be <= budget."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def auto_budget(lengths: Sequence[int], break_even: int) -> int:
    """The token budget (row length) for token_budget -1: the one whose rows cost least.

    With one segment per row (budget = the longest segment), every row is padded to the
    longest: 4 short-answer pairs of 50-88 tokens took 352 columns for 274 tokens, and
    every linear layer, norm and activation computes the padding. Longer rows hold several
    segments with less padding, but a row's masked attention computes all L x L scores.
    Cost of a layout of R rows of L columns, in units of one column's linear work:
    R * L * (1 + L / break_even), where break_even is the row length at which a column's
    attention costs as much as its linear layers (`attention_break_even`). Candidates: the
    budgets that aim at k = 1..n rows; ties go to the shorter rows. Only the layout
    changes: every token sees what it saw before (segments are block-diagonal)."""
    longest, total = max(lengths), sum(lengths)
    best, best_cost = longest, None
    for k in range(1, len(lengths) + 1):
        budget = max(longest, -(-total // k))
        rows = first_fit(lengths, budget)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * width * (1 + width / break_even)
        if best_cost is None or cost < best_cost or (cost == best_cost and budget < best):
            best, best_cost = budget, cost
    return best


def attention_break_even(model) -> int:
    """Row length at which a token's attention FLOPs (4 L d per layer, scores and values)
    equal its linear layers' (2 x ~12 d^2 per layer for a 4x-MLP transformer): ~6 d. 0 (one
    segment per row) when the model does not say its width."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return 6 * int(hidden) if isinstance(hidden, int) and hidden > 0 else 0


def budget_for(token_budget: int, model, lengths: Sequence[int]) -> int:
    """The row length of a micro-batch: token_budget when > 0; 0: the longest segment (the
    default: the layout every recorded result was measured with); -1: `auto_budget` for the
    model's width (the longest segment when the model does not say its width). The layout
    changes float rounding only, not what any token sees, so it is not the default yet: the
    demo's and the experiments' recorded numbers would move by rounding (docs/internals.md)."""
    if token_budget > 0:
        return token_budget
    break_even = attention_break_even(model) if token_budget == -1 else 0
    return auto_budget(lengths, break_even) if break_even else max(lengths)


def _pack(items: list[tuple[Sequence[int], list[Sequence[int]]]], token_budget: int) -> PackedBatch:
    if not items:
        raise ValueError("empty batch")
    counts = [len(branches) for _, branches in items]
    first = [0, *accumulate(counts)][:-1]  # seq of item i's first branch (= i * K when uniform)
    K = counts[0] if len(set(counts)) == 1 else 0
    lengths = [len(prompt) + sum(len(c) for c in branches) for prompt, branches in items]
    too_long = [i for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"item {i} needs {lengths[i]} tokens (prompt + all completions), more than the token budget "
            f"{token_budget}; raise token_budget or lower max_length"
        )

    rows = first_fit(lengths, token_budget)
    R, L = len(rows), max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((R, L), PAD_ID, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    segment_ids = torch.full((R, L), -1, dtype=torch.long)
    branch_ids = torch.full((R, L), -1, dtype=torch.long)
    src, targets, seq = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for s, i in enumerate(row):
            prompt, branches = items[i]
            ids, pos, br, scored = _segment(prompt, branches)
            n = len(ids)
            input_ids[r, col : col + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, col : col + n] = torch.tensor(pos, dtype=torch.long)
            segment_ids[r, col : col + n] = s
            branch_ids[r, col : col + n] = torch.tensor(br, dtype=torch.long)
            for offset, tok, k in scored:
                src.append(r * L + col + offset)
                targets.append(tok)
                seq.append(first[i] + k - 1)
            col += n
    # Padding positions: count up from 0 so absolute-position models (GPT-2) stay in range.
    pad = segment_ids < 0
    position_ids[pad] = (pad.cumsum(1) - 1)[pad]
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(input_ids, position_ids, segment_ids, branch_ids, as_long(src), as_long(targets),
                       as_long(seq), len(items), K, sum(counts))


def pack_pairs(pairs, token_budget: int) -> PackedBatch:
    """Pack TokenizedPair-like items (prompt_ids, chosen_ids, rejected_ids) into rows of <= token_budget."""
    return _pack([(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs], token_budget)


def pack_completions(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     token_budget: int) -> PackedBatch:
    """Pack (prompt, completion) items (KTO, SFT) the same way: one branch per segment."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return _pack([(p, [c]) for p, c in zip(prompts, completions)], token_budget)


def attention_mask_for(model, packed: PackedBatch, device: torch.device | str | None = None):
    """The 4D mask, on `device` (default: the model's), in the form its attention implementation consumes."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    device = device if device is not None else next(model.parameters()).device
    if impl == "sdpa":
        # Additive, in the dtype the scores are computed in: SDPA's CPU kernel turns a bool mask
        # into such a tensor in every layer and keeps each copy for the backward (one [R, L, L]
        # per layer); given this one, every layer shares it. Under autocast, it must already be
        # the autocast dtype, or autocast casts a copy per layer.
        dev = torch.device(device)
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) \
            else output_head(model).weight.dtype
        return packed.attention_mask(dtype).to(device)
    if impl == "eager":
        # eager adds the mask to the scores: make it the dtype of the scores.
        return packed.attention_mask(output_head(model).weight.dtype).to(device)
    if impl == "flex_attention":
        _check_flex_backward(model, torch.device(device))
        return packed.block_mask(device)
    raise NotImplementedError(
        f"packed attention supports the 'sdpa', 'eager' and 'flex_attention' implementations, not {impl!r}")


def _check_flex_backward(model, device: torch.device) -> None:
    # torch (2.13) has no FlexAttention backward on CPU; say so before the first layer does.
    if device.type == "cpu" and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        raise NotImplementedError(
            "flex_attention has no backward pass on CPU in this torch; train with attention 'sdpa' on CPU "
            "(flex_attention on CPU serves no-grad forwards only: the reference, evaluation)")


def _flex_static_shapes_on_cpu(model, device: torch.device):
    # On CPU (torch 2.13), once a second row shape turns transformers' compiled flex_attention
    # dynamic, inductor's C++ kernel for our branch mask_mod fails to compile (CppCompileError,
    # 'cur_kvSplitSize8' not declared). Static shapes compile fine: one kernel per (R, L), up to
    # dynamo's recompile limit, after which dynamo runs flex_attention unfused (correct, slower).
    import contextlib

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != "flex_attention" or device.type != "cpu":
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False)


def _check_sliding_window(model, packed: PackedBatch) -> None:
    # A user 4D mask replaces the model's own masks, sliding-window ones included. Our
    # mask has no window, which is only exact while every segment fits in the window.
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if window and config is not None:
        if getattr(config, "use_sliding_window", True) is False:
            return
        longest = int(packed.position_ids[packed.segment_ids >= 0].max()) + 1  # positions span prompt + branch
        if longest > window:
            raise NotImplementedError(
                f"a segment is longer than the model's sliding window ({window}); packing does not model the window"
            )


def _scored_logps(model, packed: PackedBatch, chunk_size: int | None, temperature: float = 1.0) -> Tensor:
    """log p of every scored token, [N] fp32, in the order of packed.src / targets / seq."""
    base = language_model(model)  # a Scorer (FSDP) holds the LM
    base = base.get_base_model() if hasattr(base, "peft_config") else base  # PEFT: the config lives here
    _check_sliding_window(base, packed)
    dev = next(base.parameters()).device
    mask = attention_mask_for(base, packed, dev)  # [R, 1, L, L]: a tensor, or a BlockMask (built once, used by every layer)
    # Only the predicting positions of scored tokens reach the head.
    with _flex_static_shapes_on_cpu(base, dev), segment_attention.by_segment(base, packed):
        return scored_logps(model, packed.input_ids.to(dev), mask, packed.position_ids.to(dev), packed.src.to(dev),
                            packed.targets.to(dev), chunk_size, temperature)  # [N] fp32


def packed_logps(model, packed: PackedBatch, chunk_size: int | None = None) -> SeqLogps:
    """Summed log-probs and counts of every output sequence: SeqLogps([num_seqs], [num_seqs])."""
    lp = _scored_logps(model, packed, chunk_size)  # [N]
    S, dev = packed.num_seqs, lp.device
    seq = packed.seq.to(dev)
    total = torch.zeros(S, dtype=torch.float32, device=dev).index_add(0, seq, lp)
    count = torch.zeros(S, dtype=torch.long, device=dev).index_add(0, seq, torch.ones_like(seq))
    return SeqLogps(total, count)


def packed_pair_logps(model, packed: PackedBatch, chunk_size: int | None = None) -> tuple[SeqLogps, SeqLogps]:
    """(chosen, rejected) SeqLogps, each [num_pairs], in the order the pairs were given."""
    if packed.num_branches != 2:
        raise ValueError(f"expected a batch of pairs (2 branches), got {packed.num_branches}")
    out = packed_logps(model, packed, chunk_size)
    return SeqLogps(out.sum[0::2], out.count[0::2]), SeqLogps(out.sum[1::2], out.count[1::2])


def pack_groups(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                token_budget: int = 0) -> PackedBatch:
    """GRPO: the completions that share an identical prompt become the branches of one segment
    [prompt | completion 1 | ... | completion G], so the prompt is computed once per group.

    prompts [B] (one per completion, repeats allowed anywhere), completions [B]. Sequences keep
    the input order (seq b = completion b) however the groups were split or interleaved.
    token_budget 0: rows of the longest segment.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    groups: dict[tuple, list[int]] = {}  # prompt -> input indices, in first-appearance order
    for b, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(b)
    items = [(list(p), [completions[b] for b in idx]) for p, idx in groups.items()]
    budget = token_budget or max(len(p) + sum(len(c) for c in cs) for p, cs in items)
    packed = _pack(items, budget)
    # _pack numbers sequences group by group; map them back to input positions.
    order = torch.tensor([b for idx in groups.values() for b in idx], dtype=torch.long)  # [B] packed seq -> input
    return replace(packed, seq=order[packed.seq])


def packed_token_logps(model, packed: PackedBatch, chunk_size: int | None = None,
                       temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of every output sequence: (logps [S, Tmax] fp32, mask [S, Tmax]), S = num_seqs.

    Row s holds sequence s's tokens in order, zeros after its length (as the padded
    completion_token_logps). temperature divides the logits (sampling-policy log-probs).
    """
    lp = _scored_logps(model, packed, chunk_size, temperature)  # [N]
    seq = packed.seq.to(lp.device)
    lengths = torch.bincount(seq, minlength=packed.num_seqs)  # [S]
    mask = torch.arange(int(lengths.max()), device=lp.device)[None, :] < lengths[:, None]  # [S, Tmax]
    # A stable sort by sequence keeps each sequence's tokens in order (_segment emits them so),
    # which is the row-major order of `mask`.
    by_seq = torch.argsort(seq, stable=True)  # [N]
    return lp.new_zeros(mask.shape).masked_scatter(mask, lp[by_seq]), mask
