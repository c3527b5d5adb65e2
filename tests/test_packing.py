"""Packed prefix-shared log-probs equal the unpacked, padded per-sequence computation."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from tiny_lms import VOCAB, tiny_lm

from prefalign.data.packing import (pack_completions, pack_groups, pack_pairs, packed_logps, packed_pair_logps,
                                    packed_token_logps)
from prefalign.logprobs import sequence_logps

TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass
class Pair:  # TokenizedPair's fields that packing reads
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list


def make_pairs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [Pair(tok(p), tok(c), tok(r)) for p, c, r in shapes]


# (prompt, chosen, rejected) lengths: odd lengths, single-token completions, a 1-token prompt
SHAPES = [(5, 3, 7), (1, 1, 1), (9, 4, 1), (2, 11, 6), (3, 1, 2), (7, 6, 5)]


def padded_logps(model, prompts, completions):
    """The unpacked reference: one right-padded row per (prompt, completion)."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    B = len(prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(p + c)
        am[b, :n] = 1
        labels[b, len(p):n] = torch.tensor(c)
    return sequence_logps(model, ids, am, labels)


def padded_pair_logps(model, pairs):
    prompts = [p.prompt_ids for p in pairs]
    out = padded_logps(model, prompts * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs])
    B = len(pairs)
    return (out.sum[:B], out.count[:B]), (out.sum[B:], out.count[B:])


def dpo_like(chosen, rejected):
    # Pair-dependent weights so a mix-up of pairs or of chosen/rejected would show.
    w = torch.linspace(0.5, 1.5, chosen.shape[0])
    return -(F.logsigmoid(0.3 * (chosen - rejected)) * w).sum()


def param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,budget", [("llama", 32), ("qwen2", 24), ("gpt2", 40), ("gemma2", 29), ("llama", 1000)])
def test_packed_equals_padded_values_and_grads(name, budget):
    model = tiny_lm(name)
    pairs = make_pairs(SHAPES)

    model.zero_grad()
    (rc, rc_n), (rr, rr_n) = padded_pair_logps(model, pairs)
    dpo_like(rc, rr).backward()
    ref_grads = param_grads(model)

    model.zero_grad()
    packed = pack_pairs(pairs, budget)
    c, r = packed_pair_logps(model, packed, chunk_size=5)
    dpo_like(c.sum, r.sum).backward()
    grads = param_grads(model)

    assert packed.input_ids.shape[1] <= budget
    assert packed.num_tokens == sum(map(sum, SHAPES))  # each prompt once
    torch.testing.assert_close(c.sum, rc, **TOL)
    torch.testing.assert_close(r.sum, rr, **TOL)
    assert c.count.tolist() == rc_n.tolist() == [s[1] for s in SHAPES]
    assert r.count.tolist() == rr_n.tolist() == [s[2] for s in SHAPES]
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL, msg=lambda m: f"{n}: {m}")


def test_segments_exactly_fill_the_budget():
    # 20 | 15 + 5 | 12 + 8 tokens into a budget of 20: three full rows and no padding at all.
    pairs = make_pairs([(10, 1, 9), (5, 4, 3), (3, 3, 2), (4, 6, 5), (2, 2, 1)], seed=1)
    packed = pack_pairs(pairs, 20)
    assert packed.input_ids.shape == (3, 20)
    assert bool((packed.segment_ids >= 0).all())  # not one padding column
    model = tiny_lm("qwen2")
    c, r = packed_pair_logps(model, packed)
    (rc, _), (rr, _) = padded_pair_logps(model, pairs)
    torch.testing.assert_close(c.sum, rc, **TOL)
    torch.testing.assert_close(r.sum, rr, **TOL)


def test_layout_and_mask():
    pairs = [Pair([11, 12, 13], [21, 22, 23, 24], [31, 32])]
    packed = pack_pairs(pairs, 16)
    assert packed.input_ids[0].tolist() == [11, 12, 13, 21, 22, 23, 24, 31, 32]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4]  # rejected restarts after the prompt
    # chosen tokens predicted from 2 (last prompt), 3, 4, 5; rejected from 2 (last prompt!), 7
    assert packed.src.tolist() == [2, 3, 4, 5, 2, 7]
    assert packed.targets.tolist() == [21, 22, 23, 24, 31, 32]
    m = packed.attention_mask()[0, 0]
    assert m[7].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 0]  # first rejected: prompt + itself, never chosen
    assert m[8].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert m[6].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0]  # last chosen: prompt + chosen


def test_block_diagonal_rows_and_padding():
    pairs = make_pairs([(4, 2, 3), (2, 2, 2), (3, 5, 1)])
    packed = pack_pairs(pairs, 12)
    m = packed.attention_mask()[:, 0]  # [R, L, L]
    seg = packed.segment_ids
    cross = (seg[:, :, None] != seg[:, None, :]) & (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
    assert not bool((m & cross).any())  # no segment sees another
    assert bool(m.diagonal(dim1=1, dim2=2).all())  # every position (padding too) sees itself: no NaN rows
    # additive form for eager attention
    add = packed.attention_mask(torch.float32)
    assert bool((add[:, 0][m] == 0).all()) and bool((add[:, 0][~m] == torch.finfo(torch.float32).min).all())


def test_eager_attention_matches():
    model = tiny_lm("llama", attn="eager")
    pairs = make_pairs(SHAPES, seed=3)
    c, r = packed_pair_logps(model, pack_pairs(pairs, 30))
    (rc, _), (rr, _) = padded_pair_logps(model, pairs)
    torch.testing.assert_close(c.sum, rc, **TOL)
    torch.testing.assert_close(r.sum, rr, **TOL)


def test_pack_completions_kto_sft():
    model = tiny_lm("gpt2")
    g = torch.Generator().manual_seed(5)
    tok = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    prompts = [tok(n) for n in (3, 1, 6, 2)]
    completions = [tok(n) for n in (5, 1, 2, 7)]
    out = packed_logps(model, pack_completions(prompts, completions, 17), chunk_size=4)
    ref = padded_logps(model, prompts, completions)
    torch.testing.assert_close(out.sum, ref.sum, **TOL)
    assert out.count.tolist() == ref.count.tolist() == [5, 1, 2, 7]


def test_peft_packed():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    pairs = make_pairs(SHAPES[:3], seed=7)
    c, r = packed_pair_logps(model, pack_pairs(pairs, 40))
    (rc, _), (rr, _) = padded_pair_logps(model, pairs)
    torch.testing.assert_close(c.sum, rc, **TOL)
    torch.testing.assert_close(r.sum, rr, **TOL)


def test_sliding_window_longer_than_segment_refused():
    model = tiny_lm("gemma2")  # sliding_window 64
    pairs = make_pairs([(40, 30, 5)])
    with pytest.raises(NotImplementedError, match="sliding window"):
        packed_pair_logps(model, pack_pairs(pairs, 100))


def test_bf16_autocast_close():
    model = tiny_lm("llama")
    pairs = make_pairs(SHAPES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c, r = packed_pair_logps(model, pack_pairs(pairs, 32))
        (rc, _), (rr, _) = padded_pair_logps(model, pairs)
    assert c.sum.dtype == torch.float32
    torch.testing.assert_close(c.sum, rc, rtol=0.01, atol=0.1)  # bf16 matmuls; fp32 reductions
    torch.testing.assert_close(r.sum, rr, rtol=0.01, atol=0.1)


EOS = 2  # tiny_lms' eos_token_id


def make_groups(seed=0):
    """GRPO-like completions: prompt k repeated once per sample, lengths differ within a group,
    single-token completions, EOS-terminated and truncated (no EOS) ones mixed."""
    g = torch.Generator().manual_seed(seed)
    tok = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    prompts = [tok(n) for n in (4, 1, 6)]
    # (prompt, completion length, EOS-terminated?)
    spec = [(0, 3, True), (0, 1, False), (0, 6, False), (0, 1, True),   # EOS alone is a 1-token completion
            (1, 5, True), (1, 2, False), (1, 1, False), (1, 4, True),
            (2, 2, False), (2, 7, True), (2, 1, True), (2, 3, False)]
    comps = [tok(n - 1) + [EOS] if eos else tok(n) for _, n, eos in spec]
    return [prompts[k] for k, _, _ in spec], comps


def padded_token_logps(model, prompts, comps, temperature=1.0):
    from prefalign.online.common import completion_token_logps

    return completion_token_logps(model, prompts, comps, pad_id=0, temperature=temperature, packing=False)


# Orders of the 12 completions: whole groups; a micro-batch that splits groups (3 + 4 + 1
# samples, so segments have different branch counts); interleaved prompts (0, 1, 2, 0, 1, 2, ...).
ORDERS = {"groups": list(range(12)), "split": list(range(1, 9)), "interleaved": [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]}


@pytest.mark.parametrize("name,budget,order,temperature", [
    ("llama", 0, "groups", 1.0), ("qwen2", 20, "split", 0.7), ("gpt2", 30, "interleaved", 1.0),
])
def test_packed_token_logps_equal_padded_values_and_grads(name, budget, order, temperature):
    model = tiny_lm(name)
    all_prompts, all_comps = make_groups()
    prompts, comps = [all_prompts[i] for i in ORDERS[order]], [all_comps[i] for i in ORDERS[order]]
    B, T = len(comps), max(map(len, comps))
    # Token-dependent weights: a shifted, swapped or mis-ordered token would change the gradient.
    w = torch.linspace(-1.0, 2.0, B * T).reshape(B, T)

    model.zero_grad()
    ref, ref_mask = padded_token_logps(model, prompts, comps, temperature)
    (ref * w).sum().backward()
    ref_grads = param_grads(model)

    model.zero_grad()
    packed = pack_groups(prompts, comps, budget)
    lp, mask = packed_token_logps(model, packed, chunk_size=5, temperature=temperature)
    (lp * w).sum().backward()
    grads = param_grads(model)

    groups = len({tuple(p) for p in prompts})
    assert packed.num_items == groups and packed.num_seqs == B  # one segment per distinct prompt
    assert packed.num_tokens == sum(len(p) for p in {tuple(p): p for p in prompts}.values()) + sum(map(len, comps))
    if budget:
        assert packed.input_ids.shape[1] <= budget
    assert lp.dtype == torch.float32 and mask.tolist() == ref_mask.tolist()
    torch.testing.assert_close(lp, ref, **TOL)
    assert bool((lp[~mask] == 0).all())
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL, msg=lambda m: f"{n}: {m}")


def test_pack_groups_layout():
    # prompt A's two completions split around prompt B's: one segment per prompt, outputs in input order
    packed = pack_groups([[11, 12], [13], [11, 12]], [[21, 22], [31], [41]], 16)
    assert packed.input_ids.tolist() == [[11, 12, 21, 22, 41, 13, 31]]  # longest segment first
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 2, 0, 1]
    assert packed.num_branches == 0 and packed.num_seqs == 3  # 2 and 1 branches: ragged
    assert packed.targets.tolist() == [21, 22, 41, 31] and packed.seq.tolist() == [0, 0, 2, 1]
    lp, mask = packed_token_logps(tiny_lm("llama"), packed)
    assert mask.tolist() == [[True, True], [True, False], [True, False]]


def test_errors():
    with pytest.raises(ValueError, match="token budget"):
        pack_pairs(make_pairs([(5, 5, 5)]), 10)
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_pairs([Pair([], [5], [6])], 10)
    with pytest.raises(ValueError, match="empty batch"):
        pack_pairs([], 10)
