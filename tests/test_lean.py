"""Lean MLPs (prefalign.lean): act(gate) and act(gate) * up are recomputed in the backward,
not kept. Values and gradients must be bitwise those of the unpatched model, and the two
tensors must really be gone between the forward and the backward."""

import copy
import gc
import weakref

import pytest
import torch
from tiny_lms import VOCAB, tiny_lm

from prefalign.lean import lean_mlps
from prefalign.logprobs import sequence_logps

ARCHS = ["llama", "qwen2", "mistral", "gemma2", "cohere", "granite"]


def batch(seed=0, b=3, t=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = -100
    labels[attn == 0] = -100
    return ids, attn, labels


def loss_and_grads(model, autocast=False):
    ids, attn, labels = batch()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sequence_logps(model, ids, attn, labels, chunk_size=5)
    w = torch.tensor([1.0, -0.5, 2.0])  # unequal weights: per-row mistakes show in the gradients
    (out.sum * w).sum().backward()
    return out.sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lean_mlp_is_bitwise_the_same(arch, autocast):
    base = tiny_lm(arch).train()
    lean = copy.deepcopy(base)
    assert lean_mlps(lean) == base.config.num_hidden_layers
    v0, g0 = loss_and_grads(base, autocast)
    v1, g1 = loss_and_grads(lean, autocast)
    assert torch.equal(v0, v1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_patching_is_idempotent_and_skips_other_layouts():
    model = tiny_lm("llama")
    assert lean_mlps(model) == 2
    assert lean_mlps(model) == 0  # already patched: not wrapped twice
    assert lean_mlps(tiny_lm("gpt2")) == 0  # GPT-2's MLP is c_fc/c_proj: left alone


@pytest.mark.parametrize("patched", [False, True])
def test_act_and_product_are_freed_until_the_backward(patched):
    """The point of the patch: between forward and backward, act(g) and act(g) * u are not alive
    (unpatched, autograd keeps both for every layer)."""
    model = tiny_lm("llama").train()
    if patched:
        lean_mlps(model)
    alive = []

    class Spy(torch.nn.Module):  # records a weak reference to every act(g) it returns
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, x):
            a = self.act(x)
            alive.append(weakref.ref(a))
            return a

    for mlp in [m for m in model.modules() if type(m).__name__.endswith("MLP")]:
        mlp.act_fn = Spy(mlp.act_fn)
    ids, attn, labels = batch()
    out = sequence_logps(model, ids, attn, labels)
    gc.collect()
    kept = sum(r() is not None for r in alive)
    assert len(alive) == 2 and kept == (0 if patched else 2)
    out.sum.sum().backward()  # the recomputation in the backward still works after they are gone
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_policy_patched_trains_adapters_the_same():
    from peft import LoraConfig, get_peft_model

    def lora(seed_model):
        torch.manual_seed(1)
        return get_peft_model(seed_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False))

    base = lora(tiny_lm("llama").train())
    lean = copy.deepcopy(base)
    assert lean_mlps(lean) == 2
    v0, g0 = loss_and_grads(base)
    v1, g1 = loss_and_grads(lean)
    assert torch.equal(v0, v1)
    assert g0.keys() == g1.keys() and all("lora_" in n for n in g0)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
