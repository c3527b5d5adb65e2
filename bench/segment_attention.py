"""Attention core alone: one masked SDPA call per packed row vs segment by segment (issue 16).

    python bench/segment_attention.py [--pairs 4] [--repeats 5] [--kind ultrafeedback]

SmolLM2-135M's attention (9 heads, 3 KV heads, head dim 64), fp32, forward + backward of SDPA only,
on packed rows of UltraFeedback-like pairs (bench/real_shapes.py's lengths), token budget = the
longest pair (what prefalign packs with by default). Alternating, median of --repeats each.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention  # noqa: E402

from real_shapes import LENGTHS, _length  # noqa: E402

from prefalign import segment_attention  # noqa: E402
from prefalign.data.packing import pack_pairs  # noqa: E402


class Pair:
    def __init__(self, p, c, r):
        self.prompt_ids, self.chosen_ids, self.rejected_ids = [5] * p, [6] * c, [7] * r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kind", default="ultrafeedback", choices=sorted(LENGTHS))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng, spec = random.Random(args.seed), LENGTHS[args.kind]
    pairs = [Pair(_length(rng, *spec["prompt"]), _length(rng, *spec["response"]), _length(rng, *spec["response"]))
             for _ in range(args.pairs)]
    packed = pack_pairs(pairs, max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs))
    R, L = packed.input_ids.shape
    module = LlamaAttention(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3), 0)
    mask = packed.attention_mask(torch.float32)
    layout = segment_attention.plan(packed.segment_ids, packed.branch_ids)
    q = torch.randn(R, 9, L, 64, requires_grad=True)
    k = torch.randn(R, 3, L, 64, requires_grad=True)
    v = torch.randn(R, 3, L, 64, requires_grad=True)
    real = packed.segment_ids >= 0

    def masked():
        return sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)[0]

    def split():
        return segment_attention._split_attention(sdpa_attention_forward, layout, module, q, k, v, 0.125, {})

    a, b = masked(), split()
    err = (a - b)[real].abs().max().item()
    times = {"masked": [], "segments": []}
    for _ in range(args.repeats):
        for name, fn in (("masked", masked), ("segments", split)):
            t = time.perf_counter()
            fn()[real].sum().backward()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    seg_lens = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    work_masked = R * L * L
    work_split = sum(len(p.prompt_ids + p.chosen_ids) ** 2 / 2 + len(p.rejected_ids) * (len(p.prompt_ids) + len(
        p.rejected_ids) / 2) for p in pairs)
    print(f"{args.pairs} pairs ({args.kind}), segments {seg_lens} -> rows {R} x {L}; threads {torch.get_num_threads()}")
    print(f"SDPA fwd+bwd per layer: masked rows {1e3 * med['masked']:.1f} ms, "
          f"by segment {1e3 * med['segments']:.1f} ms "
          f"({med['masked'] / med['segments']:.2f}x); score entries {work_masked} vs ~{math.ceil(work_split)} "
          f"({work_masked / work_split:.1f}x fewer); max |diff| {err:.1e}")


if __name__ == "__main__":
    main()
