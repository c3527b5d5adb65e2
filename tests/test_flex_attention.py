"""FlexAttention for packed rows (`--attention flex_attention`): same log-probs as the padded computation.

On CPU, torch 2.13 runs FlexAttention forward only (compiled by inductor, a few seconds per row
shape) and refuses its backward, so here the values are checked on CPU with no grad, and the
gradients only where a CUDA device is present. Every CPU test packs to the same row shape so the
kernel compiles once for the file.
"""

import json

import pytest
import torch
from test_packing import SHAPES, TOL, dpo_like, make_pairs, padded_pair_logps, param_grads
from tiny import make_model, make_tokenizer
from tiny_lms import tiny_lm

from prefalign import models, prepare
from prefalign.config import build
from prefalign.data.packing import pack_pairs, packed_pair_logps
from prefalign.errors import UserError

flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")

BUDGET = 32  # SHAPES pack into rows of [3, 32] with this budget: one compiled kernel for the file


def flex_model(name, device="cpu"):
    model = tiny_lm(name).to(device)
    return model, models.set_attention(tiny_lm(name).to(device), "flex_attention")


def test_block_mask_is_the_bool_mask():
    # Rows of several segments with padding, long enough for several 128-token blocks per row.
    pairs = make_pairs([(60, 70, 50), (30, 20, 40), (5, 9, 3), (100, 30, 20), (40, 40, 40)], seed=2)
    packed = pack_pairs(pairs, 300)
    bm = packed.block_mask()
    R, L = packed.input_ids.shape
    dense = flex.create_mask(bm.mask_mod, R, 1, L, L, device="cpu")  # the mask_mod at every (q, k)
    assert torch.equal(dense, packed.attention_mask(torch.bool))
    # The kernel evaluates the mask_mod only inside the blocks the BlockMask lists: every allowed
    # (q, k) must lie in one, and blocks with nothing allowed must be left out (that is the saving).
    B = bm.BLOCK_SIZE[0]
    listed = bm.to_dense().bool().repeat_interleave(B, 2).repeat_interleave(B, 3)[:, :, :L, :L]
    assert not bool((dense & ~listed).any())
    nb = -(-L // B)
    has_allowed = torch.nn.functional.pad(dense, (0, nb * B - L, 0, nb * B - L)).reshape(R, 1, nb, B, nb, B).any(5).any(3)
    assert torch.equal(bm.to_dense().bool(), has_allowed)
    assert bm.sparsity() > 0  # some blocks skipped


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_flex_packed_values_equal_padded(name):
    sdpa, model = flex_model(name)
    pairs = make_pairs(SHAPES)
    (rc, rc_n), (rr, rr_n) = padded_pair_logps(sdpa, pairs)  # SDPA, one padded row per sequence
    packed = pack_pairs(pairs, BUDGET)
    assert packed.input_ids.shape == (3, BUDGET)
    with torch.no_grad():  # torch has no FlexAttention backward on CPU
        c, r = packed_pair_logps(model, packed, chunk_size=5)
    assert model.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(c.sum, rc, **TOL)
    torch.testing.assert_close(r.sum, rr, **TOL)
    assert c.count.tolist() == rc_n.tolist() and r.count.tolist() == rr_n.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FlexAttention has no backward on CPU (torch 2.13); gradients are checked on CUDA")
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_flex_packed_grads_equal_padded_cuda(name):
    sdpa, model = flex_model(name, "cuda")
    pairs = make_pairs(SHAPES)
    (rc, _), (rr, _) = padded_pair_logps(sdpa.cpu(), pairs)
    dpo_like(rc, rr).backward()
    ref_grads = {n: g.cuda() for n, g in param_grads(sdpa).items()}
    c, r = packed_pair_logps(model, pack_pairs(pairs, BUDGET), chunk_size=5)
    dpo_like(c.sum.cpu(), r.sum.cpu()).backward()
    grads = param_grads(model)
    torch.testing.assert_close(c.sum.cpu(), rc, **TOL)
    torch.testing.assert_close(r.sum.cpu(), rr, **TOL)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL, msg=lambda m: f"{n}: {m}")


def test_training_with_flex_on_cpu_is_a_clear_error():
    _, model = flex_model("llama")
    with pytest.raises(NotImplementedError, match="no backward pass on CPU"):
        packed_pair_logps(model, pack_pairs(make_pairs(SHAPES), BUDGET))


def test_attention_flag_and_refusals(tmp_path):
    assert build({}).attention == "auto"
    assert build({"attention": "flex_attention"}).attention == "flex_attention"
    with pytest.raises(UserError, match="attention must be one of auto, sdpa, eager, flex_attention"):
        build({"attention": "flash"})
    with pytest.raises(UserError, match="'flex_attention' is not available for this model.*--attention sdpa"):
        models.set_attention(tiny_lm("gpt2"), "flex_attention")  # GPT-2 has no flex path in transformers
    tiny_lm("qwen2").save_pretrained(tmp_path)
    assert models.load_model(str(tmp_path), attention="flex_attention").config._attn_implementation == "flex_attention"
    assert models.load_model(str(tmp_path), attention="eager").config._attn_implementation == "eager"


def test_build_applies_attention_to_policy_and_reference(tmp_path):
    """`--attention` reaches both models prepare.build sets up, loaded from disk or passed in."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " yes", "rejected": " no"}) + "\n"
                            for i in range(4)))
    model_dir = tmp_path / "model"  # make_model: the vocabulary of make_tokenizer (checked on loading)
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    cfg = build({"model": str(model_dir), "data": str(data), "output": str(tmp_path / "o"), "attention": "eager"})
    s = prepare.build(cfg, device=torch.device("cpu"), log=lambda m: None)
    assert s.policy.config._attn_implementation == "eager"
    assert s.reference.model.config._attn_implementation == "eager"
    passed = prepare.build(cfg, device=torch.device("cpu"), model=make_model("llama"), ref_model=make_model("llama"),
                           log=lambda m: None)
    assert passed.policy.config._attn_implementation == "eager"
    assert passed.reference.model.config._attn_implementation == "eager"
