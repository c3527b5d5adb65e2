"""The fast paths of issue 16 against the reference paths: segment-by-segment attention of packed
rows vs one masked SDPA call per row, and fused AdamW vs torch's per-tensor AdamW (values and
gradients / trajectories)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tiny_lms import VOCAB, tiny_lm

from prefalign import optim, segment_attention
from prefalign.data.packing import pack_completions, pack_groups, pack_pairs, packed_logps, packed_token_logps

TOL = dict(rtol=1e-5, atol=1e-5)


class Pair:
    def __init__(self, p, c, r):
        self.prompt_ids, self.chosen_ids, self.rejected_ids = p, c, r


def _tokens(g, n):
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def pairs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Pair(_tokens(g, p), _tokens(g, c), _tokens(g, r)) for p, c, r in shapes]


# (prompt, chosen, rejected): 1-token prompt and completions, segments that share rows, padding
SHAPES = [(5, 3, 7), (1, 1, 1), (9, 4, 1), (2, 11, 6), (3, 1, 2), (7, 6, 5), (12, 9, 14)]


@contextlib.contextmanager
def segment_path(on: bool):
    old = segment_attention.ENABLED
    segment_attention.ENABLED = on
    try:
        yield
    finally:
        segment_attention.ENABLED = old


class CountCalls:
    """Counts the SDPA calls that reach transformers' sdpa function (to see the split happen)."""

    def __enter__(self):
        from transformers.modeling_utils import AttentionInterface

        self.registry, self.calls = AttentionInterface._global_mapping, []
        self.original = self.registry["sdpa"]

        def counted(module, query, *a, **k):
            self.calls.append(tuple(query.shape))
            return self.original(module, query, *a, **k)
        self.registry["sdpa"] = counted
        return self

    def __exit__(self, *exc):
        self.registry["sdpa"] = self.original


def logps_and_grads(model, packed, on: bool, token_level=False):
    model.zero_grad(set_to_none=True)
    with segment_path(on):
        if token_level:
            lp, mask = packed_token_logps(model, packed)
            out = lp[mask]
        else:
            out = packed_logps(model, packed).sum
    w = torch.linspace(0.5, 1.5, out.shape[0])
    (-(F.logsigmoid(0.3 * out) * w).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, **TOL)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL, msg=n)


@pytest.mark.parametrize("name,budget", [("llama", 40), ("qwen2", 36), ("mistral", 1000), ("llama", 70)])
def test_pairs_equal_reference_path(name, budget):
    model = tiny_lm(name).train()
    packed = pack_pairs(pairs(SHAPES), budget)
    assert (packed.segment_ids < 0).any() or packed.input_ids.shape[0] == 1, "rows of several lengths: padding"
    ref = logps_and_grads(model, packed, on=False)
    with CountCalls() as counted:
        fast = logps_and_grads(model, packed, on=True)
    assert_same(fast, ref)
    # one call per (segment, branch) per layer, each over that piece's queries only
    n_layers = model.config.num_hidden_layers
    assert len(counted.calls) == n_layers * len(SHAPES) * 2
    assert max(c[2] for c in counted.calls) < packed.input_ids.shape[1]


def test_completions_and_groups_equal_reference_path():
    model = tiny_lm("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [_tokens(g, n) for n in (4, 1, 8, 3)]
    comps = [_tokens(g, n) for n in (6, 2, 1, 9)]
    packed = pack_completions(prompts, comps, 20)
    assert_same(logps_and_grads(model, packed, on=True), logps_and_grads(model, packed, on=False))
    # GRPO: 3 groups of 4 completions (4 branches per segment), per-token log-probs
    gp = [prompts[i % 3] for i in range(12)]
    gc = [_tokens(g, 1 + (5 * i) % 11) for i in range(12)]
    packed = pack_groups(gp, gc, token_budget=60)
    assert_same(logps_and_grads(model, packed, True, token_level=True),
                logps_and_grads(model, packed, False, token_level=True))


def test_bf16_autocast_close_and_registry_restored():
    from transformers.modeling_utils import AttentionInterface

    before = AttentionInterface._global_mapping["sdpa"]
    model = tiny_lm("qwen2")
    packed = pack_pairs(pairs(SHAPES, seed=1), 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = logps_and_grads(model, packed, on=True)
        ref = logps_and_grads(model, packed, on=False)
    torch.testing.assert_close(fast[0], ref[0], rtol=2e-2, atol=0.5)
    assert AttentionInterface._global_mapping["sdpa"] is before


def test_plan_tiles_every_row():
    packed = pack_pairs(pairs(SHAPES), 40)
    layout = segment_attention.plan(packed.segment_ids, packed.branch_ids)
    for r, pieces in enumerate(layout.pieces):
        cols = [c for pc in pieces for c in range(pc.q0, pc.q1)]
        assert cols == list(range(layout.used[r]))  # contiguous, in order, no overlap
        assert int((packed.segment_ids[r] >= 0).sum()) == layout.used[r]
        for pc in pieces:  # a branch piece sees the prompt and itself: shift = prompt length
            if pc.shift is not None:
                assert pc.kv[0][1] - pc.kv[0][0] == pc.shift and pc.kv[1] == (pc.q0, pc.q1)


def test_eager_and_unpacked_calls_untouched():
    model = tiny_lm("llama", attn="eager")
    packed = pack_pairs(pairs(SHAPES), 40)
    with CountCalls() as counted:
        packed_logps(model, packed)
    assert counted.calls == []  # eager never goes through the registry's sdpa


def test_fused_adamw_matches_per_tensor_adamw():
    class Cfg:
        lr, adam_beta1, adam_beta2, weight_decay = 1e-2, 0.9, 0.99, 0.1

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = optim.adamw(a, Cfg, fused=True)
    plain = torch.optim.AdamW(b, lr=Cfg.lr, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not optim.fusable([torch.zeros(2, dtype=torch.long)]) and not optim.fusable([])
    assert optim.adamw([torch.zeros(2, requires_grad=True)], Cfg).defaults["fused"] is None  # opt-in


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (bench/gpu_check.sh runs it)")


@cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_segment_attention_on_cuda(dtype):
    model = tiny_lm("llama").cuda()
    packed = pack_pairs(pairs(SHAPES), 40)
    ctx = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
    with ctx:
        fast, ref = logps_and_grads(model, packed, True), logps_and_grads(model, packed, False)
    if dtype is None:
        assert_same(fast, ref)
    else:
        torch.testing.assert_close(fast[0], ref[0], rtol=2e-2, atol=0.5)


@cuda
def test_qlora_packed_step_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    from prefalign import models

    tiny_lm("llama").save_pretrained(tmp_path)
    model = models.apply_lora(models.load_model(str(tmp_path), qlora=True), 8, 16, 0.0, qlora=True)
    packed = pack_pairs(pairs(SHAPES), 40)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = packed_logps(model, packed).sum
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(out).all()


def test_default_is_one_masked_call_per_row(monkeypatch):
    # opt-in (slower on CPU, unmeasured on CUDA; see segment_attention.ENABLED): by default the masked rows
    monkeypatch.delenv("PREFALIGN_SEGMENT_ATTENTION", raising=False)
    model = tiny_lm("llama")
    packed = pack_pairs(pairs(SHAPES), 40)
    assert segment_attention.ENABLED is None
    with CountCalls() as counted:
        packed_logps(model, packed)
    assert counted.calls == [tuple(packed.input_ids.shape[:1]) + (4, packed.input_ids.shape[1], 8)] * 2
