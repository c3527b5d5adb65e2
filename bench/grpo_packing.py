"""Seconds per GRPO update (online.grpo.update), packed vs padded, on the CPU with 1 thread.

    python bench/grpo_packing.py [--repeats 7]

One update = reference log-probs (kl_coef 0.04) + one forward/backward of the policy + AdamW,
P = 8 prompts x G = 4 samples, micro_batch 0, fp32. Two settings:
  demo: the demo's model (tiny Llama, hidden 128, 2 layers) and tokenizer, 8 addition prompts
        (~7 tokens), completions sampled from the untrained model (max_new_tokens 5, as the demo).
  long: a random Llama (hidden 256, 4 layers, vocab 4000), random prompts of 32..128 tokens and
        completions of 8..128 tokens (lengths vary, as sampling with early stops gives).
Packed and padded runs alternate (padded, packed, padded, ...) on the same inputs so load from
other processes hits both alike; the table reports the median of `repeats`. Results go to
bench/results/grpo_packing.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import time

import torch
import transformers as tf

from prefalign.demo import task
from prefalign.demo.model import build_model
from prefalign.demo.pipeline import MAX_NEW_TOKENS
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.sampling import SamplingConfig, generate
from prefalign.online.grpo import GRPOConfig, update

P, G = 8, 4


def demo_setting():
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    rng = random.Random(0)
    prompts = [task.Problem(rng.randrange(100), rng.randrange(100)).prompt for _ in range(P)]
    gens = generate(model, tok, prompts, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, n=G, seed=0))
    p_ids = [list(p) for p in gens.prompt_token_ids for _ in range(G)]
    return model, tok.pad_token_id, p_ids, gens.token_ids


def long_setting():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=4000, hidden_size=256, intermediate_size=1024,
                                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                               max_position_embeddings=1024, pad_token_id=0))
    model.config._attn_implementation = "sdpa"
    rng = random.Random(0)
    seq = lambda n: [rng.randrange(5, 4000) for _ in range(n)]  # noqa: E731
    prompts = [seq(rng.randint(32, 128)) for _ in range(P)]
    return model, 0, [p for p in prompts for _ in range(G)], [seq(rng.randint(8, 128)) for _ in range(P * G)]


def build_ref(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def time_update(model, ref, pad_id, p_ids, c_ids, packing: bool) -> float:
    cfg = GRPOConfig(output="unused", prompts_per_step=P, group_size=G, kl_coef=0.04, packing=packing,
                     max_new_tokens=max(map(len, c_ids)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    adv = torch.linspace(-1, 1, len(c_ids))
    t = time.perf_counter()
    update(model, ref, opt, sched, params, cfg, contextlib.nullcontext, pad_id, p_ids, c_ids, adv)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, setting in (("demo", demo_setting), ("long", long_setting)):
        model, pad_id, p_ids, c_ids = setting()
        model.train()
        ref = build_ref(model)
        times = {False: [], True: []}
        time_update(model, ref, pad_id, p_ids, c_ids, True)  # warm-up (allocator, first-call costs)
        for _ in range(args.repeats):
            for packing in (False, True):
                times[packing].append(time_update(model, ref, pad_id, p_ids, c_ids, packing))
        prompt_tok = sum(map(len, p_ids))
        comp_tok = sum(map(len, c_ids))
        padded_tok = len(c_ids) * max(len(p) + len(c) for p, c in zip(p_ids, c_ids))
        packed_tok = prompt_tok // G + comp_tok
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = dict(padded_s=round(med[False], 4), packed_s=round(med[True], 4),
                             speedup=round(med[False] / med[True], 2), completion_tokens=comp_tok,
                             padded_row_tokens=padded_tok, packed_tokens=packed_tok)
        print(name, results[name], flush=True)
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/grpo_packing.json", "w") as fh:
        json.dump(dict(threads=1, P=P, G=G, repeats=args.repeats, torch=torch.__version__, results=results), fh,
                  indent=2)


if __name__ == "__main__":
    main()
