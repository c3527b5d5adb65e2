"""Per-token and per-sequence log-probs from a causal LM, without full logits.

The one place for shifting, masking, chunking and sum-vs-mean (see docs/internals.md).

A causal LM is `logits = softcap(scale * (hidden @ W.T + b))` on top of a
transformer that yields the final, post-norm `hidden` states. We split the
model there: `hidden_states()` runs the transformer only, `output_head()` reads
(W, b, scale, softcap) from the model, and `token_logps()` computes
log softmax(logits)[target] a chunk of tokens at a time, forward *and*
backward, so the [tokens, vocab] logits never exist whole. With a 151,936-token
vocabulary the full logits of 4 x 1024 tokens are 2.5 GB in fp32 (and autograd
keeps several copies); a 128-token chunk is 78 MB.

`sequence_logps()` puts it together for padded batches: shift, gather the
scored positions first (prompt and padding never reach the head), sum per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------
# The output head


@dataclass
class Head:
    """logits = softcap(scale * (hidden @ weight.T + bias)), softcap(z) = c * tanh(z / c)."""

    weight: Tensor  # [V, H] the live parameter (tied to the embeddings where the model ties them)
    bias: Tensor | None  # [V] or None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """Full fp32 logits [..., V]. For tests and small inputs only: this is what we avoid."""
        z = F.linear(hidden, self.weight, self.bias).float() * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


# How each model family post-processes `lm_head(hidden)`, read from the transformers
# 5.24 sources (the *ForCausalLM forward of each family). Keyed by the text config's
# model_type; value: (config attribute, "mul" | "div").
_LOGIT_SCALES = {
    **{t: ("logit_scale", "mul") for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass")},
    **{
        t: ("logits_scaling", "div")
        for t in (
            "granite", "granitemoe", "granitemoehybrid", "granitemoeshared", "granite_swa",
            "granitemoe_swa", "granite4_vision", "granite_docling",
            # MiniCPM3 divides the hidden states before a bias-free head: the same thing.
            "minicpm3",
        )
    },
    # HyperCLOVA X multiplies by `logits_scaling` (the opposite of Granite, same name).
    **{t: ("logits_scaling", "mul") for t in ("hyperclovax", "hyperclovax_vision_v2")},
    "falcon_h1": ("lm_head_multiplier", "mul"),
    # MuseSpark / MuseGlimmer scale *before* the softcap, which is our order too.
    **{t: ("output_multiplier", "mul") for t in ("muse_spark", "muse_glimmer")},
}

# Heads that are not (linear -> scale -> softcap): per-vocab learned scales, logits
# masked to a sub-vocabulary, vocab padding sliced off. Refuse rather than be wrong.
_UNSUPPORTED = {"dory", "chameleon", "inkling", "blt"}


def _unwrap_peft(model: nn.Module) -> nn.Module:
    # PeftModel -> the transformers model with LoRA layers injected in place. Calling
    # its submodules keeps the adapters (and `with model.disable_adapter():`) in effect.
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def _as_linear(module: nn.Module) -> nn.Module:
    """The Linear that actually runs, looking through PEFT's modules_to_save wrapper."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = getattr(module, "active_adapters", None) or []
        if getattr(module, "disable_adapters", False) or not active or active[0] not in module.modules_to_save:
            return module.original_module
        return module.modules_to_save[active[0]]
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        raise NotImplementedError(
            "LoRA on the output head (lm_head) is not supported by chunked log-probs; "
            "train the head fully (modules_to_save) or leave it out of target_modules"
        )
    return module


def output_head(model: nn.Module, temperature: float = 1.0) -> Head:
    """The output head of any HF causal LM (PEFT-wrapped too), as weight/bias/scale/softcap.

    temperature: logits / T, the distribution a sampler drew from (online RL). For a softcapped
    head T acts before the cap here, after it in samplers: an approximation there only.
    """
    lm = _unwrap_peft(model)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    model_type = getattr(config, "model_type", "")
    if model_type in _UNSUPPORTED or getattr(lm.config, "model_type", "") in _UNSUPPORTED:
        raise NotImplementedError(f"the output head of model type {model_type!r} is not a plain linear head")
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (is it a causal LM?)")
    head = _as_linear(head)
    if not isinstance(head, nn.Linear):
        raise NotImplementedError(f"unsupported output head module {type(head).__name__}")

    scale = 1.0
    if model_type in _LOGIT_SCALES:
        attr, op = _LOGIT_SCALES[model_type]
        value = getattr(config, attr, None)
        value = getattr(lm.config, attr, None) if value is None else value
        if value is not None:
            scale = float(value) if op == "mul" else 1.0 / float(value)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(head.weight, head.bias, scale / temperature, float(softcap) if softcap is not None else None)


# ---------------------------------------------------------------------------
# Hidden states


def hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    **kw,
) -> Tensor:
    """Final (post-norm) hidden states [B, T, H] of the transformer body; no logits.

    `attention_mask` may be the usual [B, T] padding mask or a 4D [B, 1, T, T] mask
    (packing); both are passed through to the model unchanged, as is `position_ids`.
    """
    lm = _unwrap_peft(model)
    body = lm.base_model  # LlamaModel, Qwen2Model, GPT2Model, ... (via base_model_prefix)
    if body is lm:
        raise ValueError(f"{type(lm).__name__} has no separate base model to take hidden states from")
    kw.setdefault("use_cache", False)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# ---------------------------------------------------------------------------
# Chunked log-probs


def default_chunk_size(vocab_size: int, max_elements: int = 1 << 24) -> int:
    """Tokens per chunk so one fp32 chunk of logits is <= 64 MB (the backward holds ~3 such)."""
    return max(16, max_elements // vocab_size)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    # Under autocast the head matmul runs in the autocast dtype (as it would in the
    # model); otherwise in the promoted dtype of the inputs.
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkLogits:
    """Computes fp32 logits [c, V] of one chunk at a time into buffers reused across chunks.

    Why buffers: a fresh 64 MB tensor per chunk is a fresh mmap on CPU, and the kernel
    zero-fills its pages every time (it doubled the wall time in bench/logprob_memory.py).
    The matmul runs in `dt` (bf16 under autocast); scale, softcap and reductions in fp32.
    """

    def __init__(self, w: Tensor, b: Tensor | None, scale: float, softcap: float | None):
        self.w, self.b, self.scale, self.softcap = w, b, scale, softcap
        self.z = None  # [chunk, V] fp32, allocated on first use (chunk may exceed N)
        self.a = None  # [chunk, V] in dt, only when dt is not fp32

    def buffer(self, n: int, name: str, dtype: torch.dtype) -> Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < n:
            buf = torch.empty(n, self.w.shape[0], dtype=dtype, device=self.w.device)
            setattr(self, name, buf)
        return buf[:n]

    def __call__(self, h: Tensor) -> Tensor:
        n = h.shape[0]
        z = self.buffer(n, "z", torch.float32)
        if self.w.dtype == torch.float32:
            torch.mm(h, self.w.t(), out=z)
        else:
            a = self.buffer(n, "a", self.w.dtype)
            torch.mm(h, self.w.t(), out=a)
            z.copy_(a)
        if self.b is not None:
            z.add_(self.b)
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(head(hidden))[target], chunked over tokens, with a recomputing backward.

    For one token with logits c (after scale and softcap) and p = softmax(c):
        out = c[t] - logsumexp(c)
        d out / d c = onehot(t) - p
    and back through the head, with a = h @ W.T + b, s = scale * a, c = cap * tanh(s / cap):
        d c / d s = 1 - (c / cap)^2,   d s / d a = scale
        grad_h = g_a @ W,   grad_W = g_a.T @ h,   grad_b = sum g_a
    Only lse [N] is kept from the forward; each chunk's logits are recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, chunk_size):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N] long
        dt = _compute_dtype(hidden, weight)
        w = weight.to(dt)
        b = bias.float() if bias is not None else None  # added to the fp32 logits
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logits = _ChunkLogits(w, b, scale, softcap)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, n, chunk_size):
                j = min(i + chunk_size, n)
                z = logits(hidden[i:j].to(dt))  # [c, V] fp32
                out[i:j] = z.gather(1, targets[i:j, None]).squeeze(1)
                # logsumexp in place (torch.logsumexp would allocate another [c, V])
                m = z.amax(dim=1)  # [c]
                lse[i:j] = z.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m)
        out.sub_(lse)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dt, ctx.scale, ctx.softcap, ctx.chunk_size = dt, scale, softcap, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dt, scale, softcap, chunk = ctx.dt, ctx.scale, ctx.softcap, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        w = weight.to(dt)
        logits = _ChunkLogits(w, bias.float() if bias is not None else None, scale, softcap)
        grad_out = grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        # Weight/bias grads sum over every chunk: accumulate in fp32 even for bf16 weights.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g_buf = g_low = None
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], chunk):
                j = min(i + chunk, hidden.shape[0])
                h = hidden[i:j].to(dt)  # [c, H]
                go = grad_out[i:j, None]  # [c, 1]
                c = logits(h)  # [c, V] fp32
                if g_buf is None:
                    g_buf = torch.empty_like(logits.z)
                g = torch.sub(c, lse[i:j, None], out=g_buf[: j - i]).exp_()  # p = softmax(c)
                g.mul_(-go).scatter_add_(1, targets[i:j, None], go)  # g_c = go * (onehot - p)
                if softcap is not None:
                    g.mul_(c.div_(softcap).square_().neg_().add_(1.0))  # * (1 - tanh^2), in c's buffer
                if scale != 1.0:
                    g.mul_(scale)
                # g = d loss / d a for this chunk, [c, V] fp32
                if dt != torch.float32:
                    g_low = torch.empty(g_buf.shape, dtype=dt, device=g.device) if g_low is None else g_low
                    g_mm = g_low[: j - i].copy_(g)  # the matmuls run in dt, as autograd's would
                else:
                    g_mm = g
                if need_h:
                    grad_h[i:j] = g_mm @ w  # [c, H]
                if need_w:
                    if dt == torch.float32:
                        grad_w.addmm_(g_mm.t(), h)  # [V, H]
                    else:
                        grad_w.add_(g_mm.t() @ h)
                if need_b:
                    grad_b.add_(g.sum(0))
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def token_logps(hidden: Tensor, head: Head, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """log p(target | hidden) for each token: [N, H], [N] -> [N] fp32.

    Memory O(chunk_size x V) forward and backward; the logsumexp is reduced in fp32
    whatever the dtype of hidden/weight. Gradients flow to hidden, head.weight, head.bias.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    chunk_size = chunk_size or default_chunk_size(head.vocab_size)
    return _ChunkedTokenLogps.apply(
        hidden, head.weight, head.bias, targets.long(), float(head.scale), head.softcap, int(chunk_size)
    )


# ---------------------------------------------------------------------------
# Per-sequence log-probs


class SeqLogps(NamedTuple):
    sum: Tensor  # [B] fp32, summed log-probs of the scored tokens
    count: Tensor  # [B] long, number of scored tokens

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count.clamp(min=1)


def shifted_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """labels [B, T] (token at t, -100 = not scored) -> (mask [B, T-1], targets [B, T-1]).

    Position t-1's hidden state predicts the token at t, so targets are labels[:, 1:];
    labels[:, 0] has no predictor and is never scored.
    """
    targets = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    chunk_size: int | None = None,
    **kw,
) -> SeqLogps:
    """Summed log-probs and counts of the labelled tokens of each row: [B, T] x 3 -> SeqLogps([B], [B])."""
    lp, mask = labelled_logps(model, input_ids, attention_mask, labels, chunk_size, **kw)  # [N], [B, T-1]
    rows = mask.nonzero(as_tuple=True)[0]  # [N] row of each scored token
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=lp.device).index_add(0, rows, lp)
    return SeqLogps(total, mask.sum(1))


def labelled_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   chunk_size: int | None = None, temperature: float = 1.0, **kw) -> tuple[Tensor, Tensor]:
    """log p of every labelled token of a padded batch, in row-major order: ([N] fp32, mask [B, T-1])."""
    mask, targets = shifted_targets(labels)  # [B, T-1]
    # Gather the scored positions first: prompt and padding never reach the head.
    rows, cols = mask.nonzero(as_tuple=True)  # [N] row and column of each scored token's predictor
    src = rows * input_ids.shape[1] + cols  # [N] flat index into the [B * T] hidden states
    return scored_logps(model, input_ids, attention_mask, None, src, targets[mask], chunk_size, temperature,
                        **kw), mask


# ---------------------------------------------------------------------------
# The whole computation as one module forward (for sharding engines)


def _scored(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
            src: Tensor, targets: Tensor, chunk_size: int | None, temperature: float = 1.0, **kw) -> Tensor:
    hidden = hidden_states(lm, input_ids, attention_mask, position_ids, **kw)  # [R, L, H]
    flat = hidden.reshape(-1, hidden.shape[-1])  # [R * L, H]
    return token_logps(flat[src], output_head(lm, temperature), targets, chunk_size)  # [N] fp32


class Scorer(nn.Module):
    """A causal LM whose forward returns the log-probs of scored tokens, never logits.

    Why a module: FSDP gathers a sharded module's weights only inside its own forward (and
    again for its backward). Our log-probs call the transformer body and read the head's
    weight directly, which bypasses the LM's forward; wrapping that whole computation as the
    forward of one module lets the engine shard it (data/packing and sequence_logps route
    through `scored_logps`, which calls this forward when handed a Scorer).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask, position_ids, src, targets, chunk_size=None, temperature=1.0,
                **kw) -> Tensor:
        return _scored(self.lm, input_ids, attention_mask, position_ids, src, targets, chunk_size, temperature, **kw)


def language_model(model: nn.Module) -> nn.Module:
    """The LM inside a Scorer (or the model itself): where config and adapters live."""
    return model.lm if isinstance(model, Scorer) else model


def scored_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                 src: Tensor, targets: Tensor, chunk_size: int | None = None, temperature: float = 1.0,
                 **kw) -> Tensor:
    """log p(targets[i]) predicted at flat position src[i] of the [R, L] batch: [N] fp32.

    A Scorer (possibly FSDP-sharded) computes it in its forward; a plain LM directly."""
    if isinstance(model, Scorer):
        return model(input_ids, attention_mask, position_ids, src, targets, chunk_size, temperature, **kw)
    return _scored(model, input_ids, attention_mask, position_ids, src, targets, chunk_size, temperature, **kw)
