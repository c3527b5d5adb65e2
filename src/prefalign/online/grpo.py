"""The GRPO loop: sample a group per prompt from the current policy, score, update, repeat.

    result = grpo(GRPOConfig(output="runs/grpo", steps=50, group_size=8, beta=0.04),
                  model=policy, tokenizer=tok, prompts=[{"prompt": "12+7=", "answer": 19}, ...],
                  reward="exact_answer")

One step (one generation batch):
  1. P prompts (a seeded permutation, a fresh one each epoch) -> G samples each from the
     current policy (online.generate, KV cache): B = P * G completions, grouped by prompt.
  2. Rewards r [B] from the reward function(s); advantages A [B] group-normalized
     (losses.grpo.group_advantages: scale "group" | "batch" | "none").
  3. mu optimizer steps on that batch. The log-probs of the sampling policy ("old") are
     the detached log-probs of the first pass (the policy has not moved yet), so they cost
     no extra forward; the reference log-probs (beta > 0) are computed once per batch.
     Each optimizer step runs the batch in micro-batches whose losses are re-weighted so
     the gradient equals the full-batch gradient of the chosen aggregation.

Per-token log-probs come from hidden states through the chunked head (logprobs.token_logps):
the [B, T, V] logits are never built. With packing (the default) the completions of a
micro-batch that share a prompt are one segment [prompt | completion 1 | ... | completion G]
(data.packing.pack_groups): the prompt is computed once per group, and no padding is run.
A micro-batch that splits a group packs each part with its own copy of the prompt. Policy,
reference and old-policy log-probs all take the same path (packed or padded). Sampling temperature T is applied to the head
(scale / T), so the trained distribution is the one that was sampled (TRL does the same).

Metrics (OUTPUT/metrics.jsonl, one line per step): reward/mean, reward/std, rewards/<name>,
kl (k3, mean per completion token, only when beta > 0), completion_length, clip_fraction,
entropy, time/generation, time/scoring, time/training, peak_memory_mb, grad_norm.
`entropy` is a Monte-Carlo estimate: minus the mean log-prob of the sampled tokens under the
sampling policy (exact in expectation for top_p = 1, top_k = 0; a lower-variance full-softmax
entropy would need the [N, V] logits this module avoids).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from prefalign import hardware, logprobs
from prefalign.data.batching import pad_sequences
from prefalign.errors import UserError
from prefalign.lean import lean_mlps
from prefalign.losses.grpo import group_advantages, grpo_loss
from prefalign.metrics import Console, MetricsLog, peak_memory_mb
from prefalign.online.generate import SamplingConfig, generate
from prefalign.online.rewards import CombinedReward, combine, load_reward
from prefalign.online.settings import GRPOConfig  # noqa: F401 (the settings live apart: the CLI imports them without torch)
from prefalign.schedule import lr_lambda, step_indices


@dataclass
class GRPOResult:
    output: str
    steps: int
    history: list
    policy: object
    tokenizer: object


# ----------------------------------------------------------------------------------------------
# Helpers shared by the online loops (grpo, iterative, compare)


@dataclass
class PromptSet:
    """Tokenized prompts with what reward functions see: the text and the extra columns."""

    ids: list[list[int]]            # [N] prompt token ids (from data.tokenize, BOS included)
    texts: list[str]                # [N] the prompt as reward functions get it (a chat prompt: its last message)
    extra: dict                     # column -> [N] values (e.g. "answer")
    raw: list                       # [N] the prompt as given (text or chat messages), for pairs files

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, idx: list[int], repeat: int = 1) -> tuple[list, list, dict]:
        """(ids [n], texts [n * repeat], extra columns [n * repeat]) of the rows idx, each text and
        column value repeated `repeat` times (one per sample of a group)."""
        rep = [i for i in idx for _ in range(repeat)]
        return ([self.ids[i] for i in idx], [self.texts[i] for i in rep],
                {k: [v[i] for i in rep] for k, v in self.extra.items()})


def load_prompts(source, tokenizer, max_prompt_length: int = 512) -> PromptSet:
    """A PromptSet from a file path, a list of strings, or a list of dicts with a `prompt` key."""
    from prefalign.data.formats import PromptExample, load_examples
    from prefalign.data.tokenize import tokenize_examples

    if isinstance(source, str):
        if not source:
            raise UserError("no prompts given (--prompts)")
        examples = load_examples(source, kind="prompt").examples
    else:
        examples = []
        for i, row in enumerate(source):
            row = {"prompt": row} if isinstance(row, str) else dict(row)
            if "prompt" not in row:
                raise UserError(f"prompt row {i + 1}: no 'prompt' field")
            examples.append(PromptExample(row.pop("prompt"), "prompts", i + 1, row))
    if not examples:
        raise UserError("no prompts")
    # One place tokenizes data: prompts get exactly the tokens DPO training will see.
    items = tokenize_examples(examples, tokenizer, max_length=max_prompt_length + 1,
                              max_prompt_length=max_prompt_length).items
    texts = [ex.prompt if isinstance(ex.prompt, str) else ex.prompt[-1]["content"] for ex in examples]
    keys = sorted({k for it in items for k in it.extra})
    extra = {k: [it.extra.get(k) for it in items] for k in keys}
    return PromptSet([it.prompt_ids for it in items], texts, extra, [ex.prompt for ex in examples])


def make_reward(reward, weights=None) -> CombinedReward:
    """A checked reward from specs, functions, Reward objects or a CombinedReward."""
    if isinstance(reward, CombinedReward):
        return reward
    if isinstance(reward, str) or callable(reward):
        reward = [reward]
    if not reward:
        raise UserError("no reward function given (--reward)")
    return combine([load_reward(r) if isinstance(r, str) else r for r in reward], weights or None)


def completion_token_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                           pad_id: int, chunk_size: int = 0, temperature: float = 1.0,
                           packing: bool = False, token_budget: int = 0):
    """Per-token log-probs of each completion token: (logps [B, Tc] fp32, mask [B, Tc]).

    logps[i, j] = log pi(completion_i[j] | prompt_i, completion_i[:j]) with logits / temperature.
    packing: completions sharing a prompt are branches of one packed segment (data.packing);
    otherwise rows are [prompt | completion | pad] (right padding: natural positions). Either
    way only completion positions reach the head, through the chunked log-prob function.
    """
    if packing:
        from prefalign.data.packing import pack_groups, packed_token_logps

        try:
            packed = pack_groups(prompt_ids, completion_ids, token_budget)
        except ValueError as e:  # a group longer than token_budget
            raise UserError(f"grpo: {e}") from None
        return packed_token_logps(model, packed, chunk_size or None, temperature)
    batch = pad_sequences(prompt_ids, completion_ids, pad_id)
    device = next(model.parameters()).device
    lp, _ = logprobs.labelled_logps(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                    batch.labels.to(device), chunk_size or None, temperature)  # [N]
    lengths = torch.tensor([len(c) for c in completion_ids], device=device)
    mask = torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]           # [B, Tc]
    # labelled_logps returns row-major order, that of `mask`: each row's completion in order.
    return lp.new_zeros(mask.shape).masked_scatter(mask, lp), mask


def autocast_for(precision: str, device: torch.device):
    if hardware.concrete(precision) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext


def load_policy(cfg, model=None, tokenizer=None):
    """(model, tokenizer) from objects or from cfg.model / cfg.tokenizer."""
    from prefalign import models

    if tokenizer is None:
        if model is None and not cfg.tokenizer:
            models._check_source(cfg.model, "model")
        tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.model)
    if model is None:
        model = models.load_model(cfg.model)
    models.check_vocab(tokenizer, model, cfg.model)
    return model, tokenizer


def prepare_output(output: str, overwrite: bool, marker: str = "config.json") -> None:
    """Never clobber another run: an output dir that holds one needs overwrite."""
    if not output:
        raise UserError("no output directory given (--output)")
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output {output} exists and is not a directory")
    if os.path.isfile(os.path.join(output, marker)) and not overwrite:
        raise UserError(f"{output} already holds a run; use --overwrite to replace it")
    os.makedirs(output, exist_ok=True)


def write_config(output: str, cfg) -> None:
    with open(os.path.join(output, "config.json"), "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=2, default=str)


# ----------------------------------------------------------------------------------------------
# The loop


def grpo(cfg: GRPOConfig, *, model=None, tokenizer=None, prompts=None, reward=None, ref_model=None) -> GRPOResult:
    """Run GRPO. prompts / reward / model objects override the config's paths and specs."""
    from prefalign.models import freeze, save_model

    cfg.validate()
    cfg.precision = hardware.announce(cfg.precision)  # config.json records what ran
    prepare_output(cfg.output, cfg.overwrite)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg, model, tokenizer)
    lean_mlps(policy)  # bitwise the same gradients, half the MLP activations (prefalign.lean)
    policy.to(device).train()
    pset = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts if prompts is not None else cfg.prompts,
                                                                       tok, cfg.max_prompt_length)
    if len(pset) < cfg.prompts_per_step:
        raise UserError(f"{len(pset)} prompts, fewer than prompts_per_step ({cfg.prompts_per_step})")
    score_fn = make_reward(reward if reward is not None else cfg.reward, cfg.reward_weights)
    ref = None
    if cfg.beta > 0:  # beta 0: no reference is loaded at all
        if ref_model is None and cfg.ref_model:
            from prefalign.models import check_vocab, load_model

            ref_model = load_model(cfg.ref_model)
            check_vocab(tok, ref_model, cfg.ref_model)
        ref = freeze(ref_model if ref_model is not None else copy.deepcopy(policy)).to(device)
    write_config(cfg.output, cfg)

    ac = autocast_for(cfg.precision, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.steps * cfg.mu))
    log = MetricsLog(cfg.output, True)
    console = Console(cfg.steps, cfg.progress, label="grpo", messages=True)
    console.KEYS = ("reward/mean", "kl", "completion_length", "clip_fraction")
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    n=cfg.group_size)
    history = []
    for step in range(cfg.steps):
        # 1. sample
        t0 = time.perf_counter()
        idx = step_indices(len(pset), step, cfg.prompts_per_step, cfg.seed)
        p_ids, p_texts, extra = pset.select(idx, repeat=cfg.group_size)
        with ac():
            gens = generate(policy, tok, p_ids, SamplingConfig(**sampling, seed=cfg.seed * 1_000_003 + step),
                            batch_size=cfg.generation_batch_size)
        t1 = time.perf_counter()
        # 2. score
        scores = score_fn.score(p_texts, gens.texts, extra,
                                rows=[f"prompt {i + 1}, sample {k + 1}" for i in idx for k in range(cfg.group_size)])
        rewards = torch.tensor(scores.total, dtype=torch.float32)                       # [B]
        if not torch.isfinite(rewards).all():  # the reward checks above should make this unreachable
            raise UserError(f"step {step + 1}: non-finite rewards {rewards.tolist()[:8]}; no update made")
        adv = group_advantages(rewards, cfg.group_size, cfg.scale).to(device)            # [B]
        t2 = time.perf_counter()
        # 3. update
        record = update(policy, ref, opt, sched, params, cfg, ac, tok.pad_token_id,
                        [list(p) for p in p_ids for _ in range(cfg.group_size)], gens.token_ids, adv)
        t3 = time.perf_counter()

        lengths = torch.tensor([len(t) for t in gens.token_ids], dtype=torch.float32)
        groups = rewards.view(-1, cfg.group_size)
        record.update({
            "step": step + 1,
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item(),
            **{f"rewards/{k}": sum(v) / len(v) for k, v in scores.components.items() if len(scores.components) > 1},
            "frac_groups_zero_std": (groups.std(dim=1) == 0).float().mean().item(),
            "completion_length": lengths.mean().item(),
            "completion_length/max": lengths.max().item(),
            "truncated_fraction": sum(r == "length" for r in gens.finish_reasons) / len(gens),
            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/training": t3 - t2,
            "lr": sched.get_last_lr()[0], "peak_memory_mb": peak_memory_mb(),
        })
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(record)
            history.append(record)
            console.update(step + 1, record)
    console.close()
    log.close()
    plot_run(cfg.output, history, [("reward", ["reward/mean", "reward/std"]), ("kl", ["kl"]),
                                   ("loss", ["loss"]), ("length", ["completion_length"]),
                                   ("clip", ["clip_fraction", "entropy"])])
    if cfg.save_model:
        save_model(policy, tok, os.path.join(cfg.output, "model"))
    return GRPOResult(cfg.output, cfg.steps, history, policy, tok)


def update(policy, ref, opt, sched, params, cfg: GRPOConfig, ac, pad_id: int, prompt_ids, completion_ids, adv) -> dict:
    """cfg.mu optimizer steps on one generation batch. Returns the step's training metrics.

    prompt_ids [B] (one per completion), completion_ids [B], adv [B]. Micro-batch losses are
    weighted so their sum is the full-batch loss of the aggregation:
      grpo, dr_grpo: mean over completions -> weight b / B
      dapo:          mean over all tokens  -> weight (tokens in the micro-batch) / (tokens in the batch)
    """
    B = len(completion_ids)
    mb = cfg.micro_batch or B
    micros = [list(range(s, min(s + mb, B))) for s in range(0, B, mb)]
    n_tok = sum(len(c) for c in completion_ids)
    weights = [(sum(len(completion_ids[i]) for i in m) / n_tok) if cfg.aggregation == "dapo" else len(m) / B
               for m in micros]
    kw = dict(pad_id=pad_id, chunk_size=cfg.chunk_size, temperature=cfg.temperature, packing=cfg.packing,
              token_budget=cfg.token_budget)

    def inputs(m):
        return [prompt_ids[i] for i in m], [completion_ids[i] for i in m]

    ref_lps = [None] * len(micros)
    if ref is not None:
        with torch.no_grad(), ac():
            ref_lps = [completion_token_logps(ref, *inputs(m), **kw)[0] for m in micros]
    old_lps = [None] * len(micros)  # None: the first pass, where old = current (ratio 1)
    sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "grad_norm": 0.0}
    entropy_sum = 0.0
    for it in range(cfg.mu):
        for j, m in enumerate(micros):
            with ac():
                lp, mask = completion_token_logps(policy, *inputs(m), **kw)                # [b, Tc]
            out = grpo_loss(lp, old_lps[j], ref_lps[j], adv[m], mask, clip_eps=cfg.clip_eps,
                            clip_eps_high=cfg.clip_eps_high or None, beta=cfg.beta,
                            aggregation=cfg.aggregation, max_completion_length=cfg.max_new_tokens)
            (out.loss * weights[j]).backward()
            tok_share = float(mask.sum()) / n_tok  # token-weighted means across micro-batches
            if it == 0:
                if cfg.mu > 1:
                    old_lps[j] = lp.detach()
                entropy_sum += -float((lp.detach() * mask).sum()) / n_tok
            sums["loss"] += out.loss.item() * weights[j] / cfg.mu
            for k in ("kl", "clip_fraction", "ratio_mean"):
                sums[k] += float(getattr(out, k)) * tok_share / cfg.mu
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        sums["grad_norm"] += float(grad_norm) / cfg.mu
        if math.isfinite(float(grad_norm)):
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    sums["entropy"] = entropy_sum
    if ref is None:
        del sums["kl"]  # no reference, no KL (beta 0 loads none)
    return sums


def plot_run(output: str, history: list[dict], panels: list[tuple[str, list[str]]]) -> list[str]:
    """PNG plots of an online run under OUTPUT/plots (one per panel that has data)."""
    from prefalign.report import plot_series

    if not history:
        return []
    os.makedirs(os.path.join(output, "plots"), exist_ok=True)
    written = []
    for name, keys in panels:
        path = os.path.join(output, "plots", f"{name}.png")
        if plot_series(path, history, keys, name):
            written.append(path)
    return written
