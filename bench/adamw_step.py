"""One AdamW step over SmolLM2-135M's parameter tensors: torch's default on CPU (per tensor) vs fused.

    python bench/adamw_step.py [--layers 30] [--repeats 3]

Alternating, best of --repeats each; random gradients; fp32.
"""

import argparse
import time

import torch

from prefalign import optim


def shapes(layers):
    h, i, kv, v = 576, 1536, 192, 49152
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(v, h)] + per_layer * layers + [(h,)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    class Cfg:
        lr, adam_beta1, adam_beta2, weight_decay = 1e-5, 0.9, 0.999, 0.0

    sets = {}
    for name in ("per-tensor", "fused"):
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes(args.layers)]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = optim.adamw(params, Cfg) if name == "fused" else torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        opt.step()  # state allocated
        sets[name] = (opt, [])
    for _ in range(args.repeats):
        for name, (opt, times) in sets.items():
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    n = sum(p.numel() for p in sets["fused"][0].param_groups[0]["params"])
    best = {k: min(v[1]) for k, v in sets.items()}
    print(f"{len(shapes(args.layers))} tensors, {n / 1e6:.0f}M parameters, {torch.get_num_threads()} threads: "
          f"per-tensor {best['per-tensor']:.2f} s, fused {best['fused']:.2f} s "
          f"({best['per-tensor'] / best['fused']:.1f}x)")


if __name__ == "__main__":
    main()
