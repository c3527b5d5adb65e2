"""Chunked log-probs equal the plain full-logits computation, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from tiny_lms import VOCAB, tiny_lm

from prefalign.logprobs import (
    Head,
    SeqLogps,
    default_chunk_size,
    hidden_states,
    output_head,
    sequence_logps,
    token_logps,
)

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# helpers


def dense_token_logps(hidden, head: Head, targets):
    """The naive reference: full logits, log_softmax, gather."""
    return head.logits(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def dense_sequence_logps(model, input_ids, attention_mask, labels):
    """What everyone writes first: model(...).logits -> log_softmax -> shift -> gather -> masked sum."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # [B, T, V]
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    mask = targets != -100
    tok = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    return SeqLogps(tok.sum(1), mask.sum(1))


def make_batch(seed=0, prompt_lens=(3, 5, 1), completion_lens=(6, 2, 9)):
    """Right-padded rows [prompt | completion | pad] with labels only on completions."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + c for p, c in zip(prompt_lens, completion_lens)]
    T = max(lens) + 2  # some padding on every row
    B = len(lens)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, n) in enumerate(zip(prompt_lens, lens)):
        input_ids[b, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[b, :n] = 1
        labels[b, p:n] = input_ids[b, p:n]
    return input_ids, attention_mask, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_model(model, chunk_size):
    input_ids, attention_mask, labels = make_batch()
    w = torch.tensor([0.7, -1.3, 0.4])  # a loss that weighs rows differently

    model.zero_grad()
    ref = dense_sequence_logps(model, input_ids, attention_mask, labels)
    (w * ref.sum).sum().backward()
    ref_grads = grads(model)

    model.zero_grad()
    out = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=chunk_size)
    (w * out.sum).sum().backward()
    out_grads = grads(model)

    assert out.sum.dtype == torch.float32 and out.count.dtype == torch.long
    torch.testing.assert_close(out.sum, ref.sum, **TOL)
    assert out.count.tolist() == ref.count.tolist() == [6, 2, 9]
    assert out_grads.keys() == ref_grads.keys() and len(out_grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(out_grads[name], ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------
# models


@pytest.mark.parametrize(
    "name,chunk_size",
    [("llama", 4), ("qwen2", 5), ("mistral", None), ("gpt2", 3), ("gemma2", 7), ("cohere", 6), ("granite", 16)],
)
def test_sequence_logps_match_full_logits(name, chunk_size):
    check_model(tiny_lm(name), chunk_size)  # 17 scored tokens: no chunk size above divides it


def test_output_head_families():
    gpt2 = tiny_lm("gpt2")
    assert output_head(gpt2).weight is gpt2.transformer.wte.weight  # tied
    llama = tiny_lm("llama")
    assert output_head(llama).weight is llama.lm_head.weight
    assert output_head(llama).weight is not llama.model.embed_tokens.weight  # untied
    assert output_head(tiny_lm("gemma2")).softcap == 1.0
    assert output_head(tiny_lm("cohere")).scale == 0.5  # logit_scale multiplies
    assert output_head(tiny_lm("granite")).scale == 0.25  # logits_scaling divides


def test_no_full_logits_computed():
    model = tiny_lm("llama")

    def boom(*_):
        raise AssertionError("lm_head ran: full logits were computed")

    model.lm_head.register_forward_hook(boom)
    input_ids, attention_mask, labels = make_batch()
    sequence_logps(model, input_ids, attention_mask, labels).sum.sum().backward()


def test_hidden_states_are_post_norm():
    model = tiny_lm("qwen2")
    input_ids, attention_mask, _ = make_batch()
    h = hidden_states(model, input_ids, attention_mask)
    ref = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(h, ref)


def test_peft_lora():
    from peft import LoraConfig, get_peft_model

    base = tiny_lm("llama")
    # init_lora_weights=False: B is random, so the adapters change the outputs.
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    check_model(model, chunk_size=5)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    # The reference-by-disabled-adapters strategy: the same call sees the base model.
    input_ids, attention_mask, labels = make_batch()
    with torch.no_grad():
        with_lora = sequence_logps(model, input_ids, attention_mask, labels).sum
        with model.disable_adapter():
            without = sequence_logps(model, input_ids, attention_mask, labels).sum
            plain = dense_sequence_logps(model, input_ids, attention_mask, labels).sum
    torch.testing.assert_close(without, plain, **TOL)
    assert (with_lora - without).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# token_logps directly: bias, scale, softcap, dtypes


@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.37, None), (1.0, 2.0), (3.0, 1.5)])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_token_logps_values_and_grads(scale, softcap, chunk_size):
    torch.manual_seed(0)
    N, H, V = 37, 16, 97
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.5).requires_grad_()
    bias = torch.randn(V).requires_grad_()
    targets = torch.randint(0, V, (N,))
    head = Head(weight, bias, scale, softcap)
    w = torch.randn(N)

    ref = dense_token_logps(hidden, head, targets)
    ref_g = torch.autograd.grad((w * ref).sum(), [hidden, weight, bias])
    out = token_logps(hidden, head, targets, chunk_size=chunk_size)
    out_g = torch.autograd.grad((w * out).sum(), [hidden, weight, bias])

    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, **TOL)


def test_token_logps_only_needed_grads():
    # A frozen head (LoRA training) costs no weight gradient; hidden gets one.
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    head = Head(torch.randn(50, 8), None)
    token_logps(hidden, head, torch.randint(0, 50, (10,)), chunk_size=3).sum().backward()
    assert hidden.grad is not None and head.weight.grad is None


def test_bf16_inputs_give_fp32_output():
    torch.manual_seed(0)
    N, H, V = 29, 16, 97
    hidden = torch.randn(N, H).bfloat16().requires_grad_()
    weight = torch.randn(V, H).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,))
    head = Head(weight, None)
    out = token_logps(hidden, head, targets, chunk_size=8)
    assert out.dtype == torch.float32
    # Same as bf16 logits upcast to fp32 before the log_softmax (the matmul is the only bf16 step).
    ref = F.linear(hidden, weight).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    ref_g = torch.autograd.grad(ref.sum(), [hidden, weight])
    torch.testing.assert_close(hidden.grad, ref_g[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad, ref_g[1], rtol=2e-2, atol=2e-2)


def test_autocast_fp32_master_weights():
    # bf16 autocast: head matmul in bf16, log-probs in fp32, weight grad in the master dtype.
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logps(hidden, Head(weight, None), targets, chunk_size=6)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    ref = dense_token_logps(hidden.detach(), Head(weight.detach(), None), targets)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.1)  # bf16 matmul error only


def test_default_chunk_size():
    assert default_chunk_size(151_936) * 151_936 * 4 <= 64 * 2**20  # <= 64 MB of fp32 logits per chunk
    assert default_chunk_size(100) >= 16


def test_shapes_checked():
    with pytest.raises(ValueError):
        token_logps(torch.randn(2, 3, 4), Head(torch.randn(5, 4), None), torch.zeros(2, 3, dtype=torch.long))
