"""Batched sampling from any Hugging Face causal LM, with a KV cache.

    gens = generate(model, tokenizer, ["2+2=", "Capital of France:"],
                    SamplingConfig(max_new_tokens=32, temperature=0.8, top_p=0.95, n=4, seed=0))
    gens.texts[i * 4 + j]      # sample j of prompt i

The decode loop is ours, not `model.generate`, for three reasons:
  - each prompt's prefix is computed once, then its KV cache is copied n times
    (GRPO samples a group of n completions per prompt);
  - finished rows are dropped from the batch (and from the cache), so they stop
    costing compute;
  - sampling noise is drawn per original row, so a row's tokens depend only on the
    seed and its position, not on when its neighbours finished.

Shapes: P prompts, n samples each, B = P * n rows, L = longest prompt, V = vocab.
Prompts are left-padded so every row's next token sits in the last column.

Sampling (temperature T > 0): logits / T, keep the top_k largest, keep the smallest
set of tokens whose probability sums to >= top_p, renormalize, sample. Sampling uses
the exponential race (argmax p_i / E_i with E_i ~ Exp(1)), which draws exactly from p.
Greedy (T == 0): argmax of the raw logits.

`vllm` is an optional engine (`engine="vllm"`), imported only when asked for.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from prefalign.errors import UserError


@dataclass
class SamplingConfig:
    """How to sample. temperature 0 means greedy; top_k 0 and top_p 1 mean no filtering."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1                                     # samples per prompt
    stop: list[str] = field(default_factory=list)  # stop strings (checked on the completion text)
    stop_token_ids: list[int] = field(default_factory=list)  # besides the EOS token(s)
    ignore_eos: bool = False
    include_stop_str: bool = True                  # keep the stop string at the end of the text
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (self.n >= 1, "n (samples per prompt) must be >= 1"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"sampling config: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generations:
    """Completions, grouped by prompt: row k = i * n + j is sample j of prompt i."""

    prompts: list                      # [P] as given (str or token ids)
    prompt_token_ids: list[list[int]]  # [P]
    n: int
    token_ids: list[list[int]]         # [P*n] completion tokens; ends with EOS when finish_reason == "eos"
    texts: list[str]                   # [P*n] decoded (special tokens skipped), cut after/at a stop string
    logprobs: list[list[float]]        # [P*n] per token, aligned with token_ids (see `generate`)
    finish_reasons: list[str]          # [P*n] "eos" | "stop" | "length"
    seconds: float = 0.0               # wall-clock of the whole call

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_index(self) -> list[int]:
        """[P*n] index of the prompt each row answers."""
        return [k // self.n for k in range(len(self.token_ids))]

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")


def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    config: SamplingConfig | None = None,
    *,
    batch_size: int = 64,
    engine: str = "hf",
    add_special_tokens: bool = True,
) -> Generations:
    """Sample `config.n` completions for each prompt.

    prompts: strings (tokenized here with `tokenizer(text, add_special_tokens=...)`) or token-id
        lists (the online loops pass ids from `data.tokenize`, the one place that tokenizes data).
    batch_size: rows (prompts x n) decoded together; prompts are processed in chunks of
        max(1, batch_size // n).
    engine: "hf" (our KV-cache loop, any causal LM) or "vllm" (`model` is a `vllm.LLM` or a path).

    logprobs: log-probability of each sampled token under the distribution it was drawn from
    (after temperature, top-k and top-p); for greedy decoding, under the unmodified model
    distribution. They are a by-product of sampling; a trainer should recompute its own.
    """
    config = config or SamplingConfig()
    if engine == "vllm":
        return generate_vllm(model, prompts, config, tokenizer=tokenizer)
    if engine != "hf":
        raise UserError(f"unknown generation engine {engine!r}: use 'hf' or 'vllm'")

    start = time.perf_counter()
    prompt_ids = [_as_ids(p, tokenizer, add_special_tokens, i) for i, p in enumerate(prompts)]
    eos_ids = [] if config.ignore_eos else _eos_ids(model, tokenizer)
    stop_ids = sorted(set(eos_ids) | set(config.stop_token_ids))
    pad_id = _pad_id(tokenizer, eos_ids)
    device = next(model.parameters()).device
    # One generator for the whole call: the same seed, prompts and batch_size give the same samples.
    gen = None
    if config.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(config.seed)

    token_ids, logprobs, reasons = [], [], []
    per_chunk = max(1, batch_size // config.n)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for c in range(0, len(prompt_ids), per_chunk):
                chunk = prompt_ids[c:c + per_chunk]
                t, lp, r = _decode_chunk(model, tokenizer, chunk, config, gen, stop_ids, pad_id, device)
                token_ids += t
                logprobs += lp
                reasons += r
    finally:
        model.train(was_training)

    texts = [_finish_text(tokenizer.decode(ids, skip_special_tokens=True), config) for ids in token_ids]
    return Generations(
        prompts=list(prompts), prompt_token_ids=prompt_ids, n=config.n, token_ids=token_ids,
        texts=texts, logprobs=logprobs, finish_reasons=reasons, seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------
# The decode loop


def _decode_chunk(model, tokenizer, prompt_ids, cfg, gen, stop_ids, pad_id, device):
    """Prefill P prompts once, copy each cache n times, then decode token by token."""
    n, max_new = cfg.n, cfg.max_new_tokens
    P, L = len(prompt_ids), max(len(p) for p in prompt_ids)
    B = P * n
    fwd = forward_kwargs(model)

    # Left-pad: [P, L]
    input_ids = torch.full((P, L), pad_id, dtype=torch.long)
    attn = torch.zeros((P, L), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, L - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attn[i, L - len(ids):] = 1
    input_ids, attn = input_ids.to(device), attn.to(device)
    # Positions count real tokens only, so a padded row sees the same positions as an unpadded one.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                                    # [P, L]

    cache = DynamicCache(config=model.config)
    logits = _forward(model, fwd, input_ids, attn, pos, cache)    # [P, V]
    if n > 1:  # the prefix is computed once per prompt, then shared by its n samples
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)                             # [B, V]
        attn = attn.repeat_interleave(n, dim=0)                                 # [B, L]
    next_pos = pos[:, -1].repeat_interleave(n) + 1                              # [B]

    out_tok = torch.full((B, max_new), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((B, max_new), dtype=torch.float32, device=device)
    length = torch.full((B,), max_new, dtype=torch.long, device=device)        # final lengths
    reason = ["length"] * B
    stop_t = torch.tensor(stop_ids, dtype=torch.long, device=device)
    stop_window = 4 * max((len(s) for s in cfg.stop), default=0) + 2            # tokens to decode per check

    rows = torch.arange(B, device=device)   # [b] original row of each row still in the batch
    alive = torch.ones(B, dtype=torch.bool, device=device)  # [b] rows of `rows` not yet finished
    for t in range(max_new):
        tok, lp = _sample(logits, cfg, gen, rows, B)                           # [b], [b]
        out_tok[rows, t] = tok
        out_lp[rows, t] = lp

        # Which live rows finish at this token?
        hit_eos = torch.isin(tok, stop_t) & alive if len(stop_ids) else torch.zeros_like(alive)
        hit_str = torch.zeros_like(alive)
        if cfg.stop:
            lo = max(0, t + 1 - stop_window)
            check = (alive & ~hit_eos).nonzero().flatten().tolist()
            if check:
                tails = tokenizer.batch_decode(out_tok[rows[check], lo:t + 1].tolist(), skip_special_tokens=True)
                for i, text in zip(check, tails):
                    if any(s in text for s in cfg.stop):
                        hit_str[i] = True
        done_now = hit_eos | hit_str
        for i in done_now.nonzero().flatten().tolist():
            r = int(rows[i])
            length[r] = t + 1
            reason[r] = "eos" if hit_eos[i] else "stop"
        alive &= ~done_now
        if t == max_new - 1 or not alive.any():
            break

        # Drop finished rows once they are a fifth of the batch: compacting copies the cache,
        # so doing it for every single finished row would cost more than it saves.
        dead = int((~alive).sum())
        if dead and dead * 5 >= len(alive):
            keep = alive.nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, tok, attn, next_pos = rows[keep], tok[keep], attn[keep], next_pos[keep]
            alive = alive[keep]

        # One token per row; finished-but-kept rows run along and their outputs are ignored.
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)          # [b, L + t + 1]
        logits = _forward(model, fwd, tok[:, None], attn, next_pos[:, None], cache)
        next_pos = next_pos + 1

    out_tok, out_lp, length = out_tok.tolist(), out_lp.tolist(), length.tolist()
    token_ids = [out_tok[r][:length[r]] for r in range(B)]
    logprobs = [out_lp[r][:length[r]] for r in range(B)]
    return token_ids, logprobs, reason


def _sample(logits, cfg, gen, rows, B):
    """Next token for each row. logits [b, V] fp32; rows [b] original row ids. -> tokens [b], logps [b]."""
    if cfg.greedy:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    V = logits.shape[-1]
    # Work in the space of candidate tokens: the top k (sorted), the most likely tokens (top-p), or
    # the whole vocabulary. probs [b, K] are candidate probabilities; ids [b, K] map a candidate back
    # to its token id (None: the identity).
    if 0 < cfg.top_k < V:
        vals, ids = torch.topk(logits, cfg.top_k, dim=-1)                      # [b, K], descending
        probs = torch.softmax(vals, dim=-1)                                     # top-p (if any) acts on these
    elif cfg.top_p < 1.0:
        full = torch.softmax(logits, dim=-1)                                    # [b, V]
        # A trained LM's nucleus is usually a few dozen tokens: try the top 64 (cheap) and sort
        # the whole vocabulary only when they do not cover top_p for every row.
        probs, ids = torch.topk(full, min(64, V), dim=-1)
        if not bool((probs.sum(-1) > cfg.top_p).all()):
            probs, ids = torch.sort(full, dim=-1, descending=True)             # [b, V]
    else:
        probs, ids = torch.softmax(logits, dim=-1), None
    if cfg.top_p < 1.0:
        # Drop a candidate when the more likely ones already cover top_p; the top one always stays.
        drop = (probs.cumsum(-1) - probs) > cfg.top_p
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    # Exponential race: argmax p / E with E ~ Exp(1) is an exact draw from p. Noise is drawn for all
    # B original rows and indexed, so a row's draw does not depend on which other rows are alive.
    noise = torch.empty((B, probs.shape[-1]), device=probs.device).exponential_(generator=gen)[rows]
    choice = (probs / noise).argmax(-1)                                         # [b]
    logp = probs.gather(-1, choice[:, None]).squeeze(-1).log()
    tok = choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)
    return tok, logp


def forward_kwargs(model) -> dict:
    """Which keyword names this model's forward takes (transformers 5 says `cache`, 4.x `past_key_values`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes **kwargs on
    params = inspect.signature(base.forward).parameters
    return {
        "cache": "cache" if "cache" in params else "past_key_values",
        "position_ids": "position_ids" in params,
        "logits_to_keep": "logits_to_keep" in params,
    }


def _forward(model, fwd, input_ids, attn, pos, cache):
    """One forward pass -> logits of the last position [b, V] in fp32."""
    kwargs = {"input_ids": input_ids, "attention_mask": attn, fwd["cache"]: cache, "use_cache": True}
    if fwd["position_ids"]:
        kwargs["position_ids"] = pos
    if fwd["logits_to_keep"]:
        kwargs["logits_to_keep"] = 1  # never build [b, L, V] logits for the prompt
    return model(**kwargs).logits[:, -1].float()


# ----------------------------------------------------------------------------------------------
# Helpers


def _as_ids(prompt, tokenizer, add_special_tokens, i) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise UserError(f"prompt {i + 1}: expected a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise UserError(f"prompt {i + 1}: empty prompt (no tokens); a causal LM needs at least one")
    return ids


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config (may be several, e.g. chat models) and the tokenizer."""
    ids = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src is not None:
            ids.update(int(x) for x in src)
    return sorted(ids)


def _pad_id(tokenizer, eos_ids) -> int:
    # The pad id is never attended to (mask 0), so any valid id does.
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return int(pad)


def _finish_text(text: str, cfg: SamplingConfig) -> str:
    """Cut the text at the first stop string (after it with include_stop_str, before it otherwise)."""
    cut = None
    for s in cfg.stop:
        i = text.find(s)
        if i >= 0:
            end = i + len(s) if cfg.include_stop_str else i
            cut = end if cut is None else min(cut, end)
    return text if cut is None else text[:cut]


# ----------------------------------------------------------------------------------------------
# vLLM engine (optional)


def generate_vllm(llm, prompts, config: SamplingConfig, tokenizer=None) -> Generations:
    """The same call served by vLLM. `llm`: a `vllm.LLM`, or a model path/name to load one.

    vLLM reports logprobs under the raw model distribution (before temperature/top-k/top-p),
    unlike the hf engine; a trainer recomputes its own anyway.
    """
    try:
        import vllm
    except ImportError:
        raise UserError(
            "generation engine 'vllm' needs the vllm package, which is not installed "
            "(pip install vllm; it needs a GPU). Use engine 'hf' instead."
        ) from None
    start = time.perf_counter()
    if isinstance(llm, str):
        llm = vllm.LLM(model=llm, seed=config.seed or 0)
    tokenizer = tokenizer or llm.get_tokenizer()
    params = vllm.SamplingParams(
        n=config.n,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k if config.top_k > 0 else -1,
        max_tokens=config.max_new_tokens,
        stop=list(config.stop) or None,
        stop_token_ids=list(config.stop_token_ids) or None,
        ignore_eos=config.ignore_eos,
        include_stop_str_in_output=config.include_stop_str,
        seed=config.seed,
        logprobs=0,  # the sampled token's logprob only
    )
    prompt_ids = [
        list(p) if not isinstance(p, str) else tokenizer(p)["input_ids"] for p in prompts
    ]
    inputs = [{"prompt_token_ids": ids} for ids in prompt_ids]
    outputs = llm.generate(inputs, params)

    token_ids, texts, logprobs, reasons = [], [], [], []
    for out in outputs:                      # one per prompt, in order
        for c in out.outputs:                # n per prompt
            ids = list(c.token_ids)
            token_ids.append(ids)
            texts.append(c.text)
            lps = c.logprobs or []
            logprobs.append([float(d[t].logprob) for d, t in zip(lps, ids)])
            if c.finish_reason == "length":
                reasons.append("length")
            else:  # stop_reason: None = EOS, int = a stop token, str = a stop string
                reasons.append("stop" if isinstance(c.stop_reason, str) else "eos")
    return Generations(
        prompts=list(prompts), prompt_token_ids=prompt_ids, n=config.n, token_ids=token_ids,
        texts=texts, logprobs=logprobs, finish_reasons=reasons, seconds=time.perf_counter() - start,
    )
