"""Peak memory of chunked token_logps vs plain full logits, forward + backward, on a big-vocab head.

    python bench/logprob_memory.py                       # 4 x 1024 tokens, hidden 896, vocab 151,936 (Qwen2-0.5B's head)
    python bench/logprob_memory.py --tokens 1024 --skip-full

How it is measured (CPU): each variant runs once in its own fresh Python process.
Inside it we allocate the inputs (hidden [N, H], weight [V, H], targets), read the
resident set size (RSS, /proc via psutil), run forward + backward once, and read the
kernel's high-water mark of RSS (getrusage ru_maxrss). "peak above inputs" is the
difference: every byte the computation had resident at its worst moment, including
the gradients it must produce (grad_weight is V x H fp32 = 545 MB here, in both
variants). No warm-up runs before the measurement, because the high-water mark would
keep theirs. tracemalloc cannot see torch's allocations, and torch has no CPU
max_memory_allocated, so the OS's own peak is the honest number.

Writes bench/results/logprob_memory.json.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 2**20


def worker(args):
    import psutil
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from prefalign.logprobs import Head, default_chunk_size, token_logps

    torch.manual_seed(0)
    N, H, V = args.batch * args.seq, args.hidden, args.vocab
    hidden = torch.randn(N, H, requires_grad=True)  # [N, H]
    weight = (torch.randn(V, H) * 0.02).requires_grad_()  # [V, H]
    targets = torch.randint(0, V, (N,))
    rss_before = psutil.Process().memory_info().rss

    t0 = time.perf_counter()
    if args.variant == "full":
        # The plain way: [N, V] logits, log_softmax, gather; autograd keeps the full tensors.
        logps = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
        chunk = N
    else:
        chunk = args.chunk or default_chunk_size(V)
        logps = token_logps(hidden, Head(weight, None), targets, chunk_size=chunk)
    logps.sum().backward()
    seconds = time.perf_counter() - t0

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(dict(
        variant=args.variant, chunk_size=chunk, tokens=N, hidden=H, vocab=V,
        peak_above_inputs_mb=round((peak - rss_before) / MB, 1),
        inputs_rss_mb=round(rss_before / MB, 1), seconds=round(seconds, 2),
        logps_sum=float(logps.detach().sum()), grad_weight_norm=float(weight.grad.norm()),
    )))


def run_variant(args, variant, chunk=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant,
           "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunks", type=int, nargs="*", default=[0, 1024], help="chunk sizes to try; 0 = the default")
    p.add_argument("--skip-full", action="store_true", help="skip the full-logits baseline (it needs ~10 GB here)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "logprob_memory.json"))
    p.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.variant = args.worker
        return worker(args)

    rows = [] if args.skip_full else [run_variant(args, "full")]
    rows += [run_variant(args, "chunked", c) for c in args.chunks]

    N, V = args.batch * args.seq, args.vocab
    print(f"token_logps forward+backward, {args.batch} x {args.seq} tokens, hidden {args.hidden}, vocab {V:,} (fp32, CPU)")
    print(f"full logits [N, V] fp32 alone: {N * V * 4 / MB:,.0f} MB; grad_weight [V, H] fp32: {V * args.hidden * 4 / MB:,.0f} MB")
    print(f"{'variant':<10}{'chunk':>8}{'peak above inputs (MB)':>25}{'seconds':>10}")
    for r in rows:
        print(f"{r['variant']:<10}{r['chunk_size']:>8}{r['peak_above_inputs_mb']:>25,.1f}{r['seconds']:>10.2f}")
    if not args.skip_full:
        full = rows[0]["peak_above_inputs_mb"]
        for r in rows[1:]:
            print(f"chunk {r['chunk_size']}: {r['peak_above_inputs_mb'] / full:.3f} x the full-logits peak; "
                  f"sum of log-probs differs by {abs(r['logps_sum'] - rows[0]['logps_sum']):.3g}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(config=dict(batch=args.batch, seq=args.seq, hidden=args.hidden, vocab=V,
                                   device="cpu", cpus=os.cpu_count(),
                                   method="ru_maxrss - rss before, fresh process per variant"),
                       rows=rows), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
