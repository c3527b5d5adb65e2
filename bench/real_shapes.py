"""prefalign vs TRL on real architectures' shapes and real length distributions (issue 16).

    TRL_PYTHON=/path/to/venv-with-trl/bin/python python bench/real_shapes.py compare
    python bench/real_shapes.py profile      # where a step's time goes, both tools, SmolLM2 shape
    python bench/real_shapes.py scaling      # pairs/s and peak RSS vs max length and vs batch size
    python bench/real_shapes.py report FILE.json ...   # reprint tables, goals and bounds of earlier runs

Models: random weights (seed 0, no download) in real architectures' configs:
  smollm2   SmolLM2-135M: Llama, 30 layers x 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied
  qwen2.5   Qwen2.5-0.5B: Qwen2, 24 layers x 896, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied
            (--qwen-layers, default 4: 24 layers would take the time of the whole bench on 2 cores)
Data (seeded; words of a random vocabulary, tokenized by a byte-level BPE of 4000 tokens):
  ultrafeedback  prompts 30-400 tokens (log-normal, median 120), responses 50-500 (median 220): long tail
  short          prompts 8-80 (median 25), answers 3-60 (median 20): small chat data, short answers
Both tools: DPO sigmoid, beta 0.1, lr 1e-5 constant, clip 1.0, frozen reference copy, the same pairs
in the same order, each run a fresh process (peak RSS = its getrusage high-water mark). Tools
alternate order between repeats (--repeats). Ratios are prefalign / TRL from the same run.

Writes bench/results/real_shapes_<suite>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("PREFALIGN_FUSED_ADAMW", "1")  # measured with the fused optimizer (prefalign/optim.py)
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

import dpo_vs_trl as shared  # noqa: E402
import shape_goals  # noqa: E402

ARCHS = {
    "smollm2": dict(cls="LlamaConfig", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                    rms_norm_eps=1e-5),
    "qwen2.5": dict(cls="Qwen2Config", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                    rms_norm_eps=1e-6),
}
OUT = ""  # --out
LENGTHS = {  # (median, sigma, lo, hi) of a clipped log-normal, in tokens
    "ultrafeedback": {"prompt": (120, 0.8, 30, 400), "response": (220, 0.6, 50, 500), "max_length": 1024},
    "short": {"prompt": (25, 0.5, 8, 80), "response": (20, 0.6, 3, 60), "max_length": 256},
}


def build_model_dir(workdir: str, arch: str, layers: int | None = None) -> str:
    import torch
    import transformers

    cfg = dict(ARCHS[arch])
    if layers:
        cfg["num_hidden_layers"] = layers
    path = os.path.join(workdir, f"{arch}-l{cfg['num_hidden_layers']}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    config = getattr(transformers, cfg.pop("cls"))(**cfg, tie_word_embeddings=True, max_position_embeddings=8192,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(path)
    _tokenizer(workdir).save_pretrained(path)
    return path


def _tokenizer(workdir):
    return shared.build_tokenizer(shared.random_words(3000, 0), 4000, 0)


def _length(rng, median, sigma, lo, hi) -> int:
    return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))


def build_data(workdir: str, kind: str, n: int, seed: int = 1) -> str:
    """n pairs whose token lengths follow LENGTHS[kind] (word counts scaled by tokens per word)."""
    path = os.path.join(workdir, f"pairs-{kind}-{n}.jsonl")
    if os.path.isfile(path):
        return path
    words = shared.random_words(3000, 0)
    tok = _tokenizer(workdir)
    sample = " ".join(random.Random(seed).choice(words) for _ in range(2000))
    per_word = len(tok(sample)["input_ids"]) / 2000
    rng = random.Random(seed)
    text = lambda tokens: " ".join(rng.choice(words) for _ in range(max(1, round(tokens / per_word))))  # noqa: E731
    spec = LENGTHS[kind]
    rows = []
    for _ in range(n):
        row = {"prompt": text(_length(rng, *spec["prompt"])), "chosen": " " + text(_length(rng, *spec["response"])),
               "rejected": " " + text(_length(rng, *spec["response"]))}
        rows.append(row)
    shared.write_jsonl(path, rows)
    return path


def _tokens_per_pair(model_dir, data, max_length):
    from transformers import AutoTokenizer

    from prefalign.data.formats import load_examples
    from prefalign.data.tokenize import tokenize_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    items = tokenize_examples(load_examples(data, kind="paired").examples, tok, max_length, max_length - 1).items
    return [len(i.prompt_ids) + len(i.chosen_ids) + len(i.rejected_ids) for i in items]


def run_pair(workdir, name, model_dir, data, *, batch, max_length, precision, warmup, steps, repeats,
             worker_script=None, tools=("trl", "prefalign"), cuda=False) -> dict:
    """Both tools on one configuration, alternating which goes first; the best of the repeats each."""
    n_pairs = sum(1 for _ in open(data))
    order = shared.prefalign_order(n_pairs, warmup + steps, batch, 0)
    tokens = _tokens_per_pair(model_dir, data, max_length)
    runs = {t: [] for t in tools}
    for rep in range(repeats):
        for tool in (tools if rep % 2 == 0 else tools[::-1]):
            worker = "trl" if tool == "trl" else "prefalign"
            spec = dict(model=model_dir, data=data, output=os.path.join(workdir, f"run-{name}-{tool}"),
                        batch_size=batch, lr=1e-5, beta=0.1, max_length=max_length, steps=warmup + steps,
                        precision=precision, seed=0, reference="copy", order=order, max_prompt_length=max_length - 1,
                        warmup=warmup, cuda=cuda, profile=worker_script is not None,
                        baseline=tool == "prefalign-base",
                        token_budget=-1)  # the layout of least padding + attention work (--token-budget -1)
            t = time.perf_counter()
            script = os.path.abspath(__file__) if (worker_script or tool == "prefalign-base") else None
            res = shared.run_worker(worker, spec, script=script)
            s = shared.summarize(res, warmup, batch, order, 1, True, tokens)
            s["cuda_peak_mb"] = res.get("cuda_peak_mb")
            if "profile" in res:
                s["profile"] = res["profile"]
            runs[tool].append(s)
            print(f"  [{name}] {tool:9s} {s['pairs_per_s']:6.3f} pairs/s {s['tokens_per_s']:7.0f} tok/s "
                  f"RSS {s['peak_rss_mb']:6.0f} MB step1 loss {s['losses'][0]:.6f} ({time.perf_counter() - t:.0f}s)",
                  flush=True)
    best = {t: max(r, key=lambda s: s["pairs_per_s"]) for t, r in runs.items()}
    out = {"name": name, "batch": batch, "max_length": max_length, "precision": precision, "model_dir": model_dir,
           "data": data, "order": order, "warmup": warmup,
           "mean_tokens_per_pair": sum(tokens) / len(tokens), **best,
           "repeats": {t: [s["pairs_per_s"] for s in r] for t, r in runs.items()}}
    if "prefalign-base" in best:
        out["fast_paths_speedup"] = best["prefalign"]["pairs_per_s"] / best["prefalign-base"]["pairs_per_s"]
        print(f"  [{name}] prefalign with / without the issue-16 fast paths: {out['fast_paths_speedup']:.2f}x",
              flush=True)
    if "trl" in best:
        p, t = best["prefalign"], best["trl"]
        out["ratios"] = {"pairs_per_s": p["pairs_per_s"] / t["pairs_per_s"],
                         "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"]}
        out["bounds"] = bounds(model_dir, t, PEAK_GFLOPS)
        b = out["bounds"]
        print(f"  [{name}] prefalign / TRL: {out['ratios']['pairs_per_s']:.2f}x pairs/s, "
              f"{out['ratios']['peak_rss']:.2f}x peak RSS; bounds: TRL's FLOPs at 100% MFU would run "
              f"{b['speedup_at_full_mfu']:.1f}x faster, RSS ratio floor {b['rss_ratio_floor']:.2f}x "
              f"(training state alone {b['state_floor_mb']:.0f} MB)", flush=True)
    return out


PEAK_GFLOPS = 0.0  # measured once per run (fp32 matmul)


def bounds(model_dir, trl, peak_gflops) -> dict:
    """The bounds of the goals. Speed: the measured fp32 matmul peak over TRL's useful FLOP/s (useful =
    8 N per token: policy forward + backward + reference forward, N = the matmul parameters, a tied
    head counted): what doing TRL's FLOPs at 100% MFU would give. prefalign does fewer FLOPs (each
    prompt once, the head only on completion tokens), so it can pass this figure; under a loaded
    machine the peak, measured once at the start, is itself approximate. Memory: fp32 weights,
    gradients, two AdamW moments and the reference copy (5 x 4 bytes per parameter), over TRL's peak
    RSS: no run that keeps that state in fp32 gets below it."""
    n = shared._n_params(model_dir)
    matmul = n["non_embedding"] + (n["embedding"] if n["head"] == 0 else 0)
    useful = 8 * matmul * trl["tokens_per_s"] / 1e9
    floor = 5 * 4 * n["total"] / 2**20
    return {"matmul_params": matmul, "trl_mfu": useful / peak_gflops if peak_gflops else None,
            "speedup_at_full_mfu": peak_gflops / useful if peak_gflops else float("nan"),
            "state_floor_mb": floor, "rss_ratio_floor": floor / trl["peak_rss_mb"]}


def _save(suite, out):
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = OUT or os.path.join(HERE, "results", f"real_shapes_{suite}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    return path


def _header(args):
    import torch

    from prefalign import hardware

    m = hardware.detect()
    best = hardware.resolve("auto", m)
    info = {"command": " ".join(["python bench/real_shapes.py"] + sys.argv[1:]), "cpu": hardware.cpu_name(),
            "bf16": hardware.describe(m), "fastest_exact_precision": best, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "uptime_start": shared.uptime()}
    global PEAK_GFLOPS
    if not args.cuda:
        PEAK_GFLOPS = info["fp32_matmul_peak_gflops"] = shared.measure_matmul_peak(seconds=2.0)
    print(f"CPU {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} threads); {info['bf16']}; "
          f"load: {info['uptime_start']}", flush=True)
    return info


def have_trl() -> bool:
    import subprocess

    python = os.environ.get("TRL_PYTHON") or sys.executable
    return subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0


def suite_compare(args):
    out = _header(args)
    tools = (("trl", "prefalign") if have_trl() else ("prefalign",)) + (("prefalign-base",) if args.ab else ())
    if "trl" not in tools:
        print("TRL is not importable (set TRL_PYTHON to a Python that has trl 1.16): prefalign alone", flush=True)
    precisions = ["fp32"] + ([out["fastest_exact_precision"]] if out["fastest_exact_precision"] != "fp32" else [])
    if args.precisions:
        precisions = args.precisions.split(",")
    rows = []
    plan = [("smollm2", args.smol_layers, "ultrafeedback", 4), ("smollm2", args.smol_layers, "short", 4),
            ("qwen2.5", args.qwen_layers, "ultrafeedback", 4)]
    for arch, layers, kind, batch in plan:
        if args.only and f"{arch}/{kind}" not in args.only.split(","):
            continue
        model_dir = build_model_dir(args.workdir, arch, layers)
        data = build_data(args.workdir, kind, batch * (args.warmup + args.steps))
        for precision in precisions:
            name = f"{arch}-l{layers or ARCHS[arch]['num_hidden_layers']}/{kind}/{precision}"
            rows.append(run_pair(args.workdir, name, model_dir, data, batch=batch,
                                 max_length=LENGTHS[kind]["max_length"], precision=precision, warmup=args.warmup,
                                 steps=args.steps, repeats=args.repeats, cuda=args.cuda, tools=tools))
            out["runs"] = rows
            _save("compare", out)
    print_table(rows)
    out["uptime_end"] = shared.uptime()
    print(f"wrote {_save('compare', out)}")


def suite_scaling(args):
    out = _header(args)
    model_dir = build_model_dir(args.workdir, "smollm2", args.scaling_layers)
    rows = []
    # Max length: every pair fills it (prompt 1/4, each response 3/8 of max_length, no truncation).
    for max_length in [int(x) for x in args.lengths.split(",")]:
        data = _fixed_data(args.workdir, max_length, args.batch * (args.warmup + args.steps))
        rows.append(run_pair(args.workdir, f"len{max_length}/b{args.batch}", model_dir, data, batch=args.batch,
                             max_length=max_length + 8, precision="fp32", warmup=args.warmup, steps=args.steps,
                             repeats=1))
        out["by_length"] = rows
        _save("scaling", out)
    rows_b = []
    for batch in [int(x) for x in args.batches.split(",")]:
        data = _fixed_data(args.workdir, 512, batch * (args.warmup + args.steps))
        rows_b.append(run_pair(args.workdir, f"len512/b{batch}", model_dir, data, batch=batch, max_length=520,
                               precision="fp32", warmup=args.warmup, steps=args.steps, repeats=1))
        out["by_batch"] = rows_b
        _save("scaling", out)
    print_table(rows + rows_b)
    print(f"wrote {_save('scaling', out)}")


def _fixed_data(workdir, total, n):
    """Pairs of exactly-sized texts: prompt ~total/4 tokens, chosen and rejected ~3 total/8 each
    (prompt + one response = 5/8 of total for TRL's padded rows; the packed pair is `total`)."""
    path = os.path.join(workdir, f"pairs-fixed{total}-{n}.jsonl")
    if os.path.isfile(path):
        return path
    words = shared.random_words(3000, 0)
    tok = _tokenizer(workdir)
    rng = random.Random(total)

    def text(n_tokens):
        out = []
        while True:
            out.append(rng.choice(words))
            if len(tok(" " + " ".join(out))["input_ids"]) >= n_tokens:
                return " ".join(out[:-1]) if len(out) > 1 else out[0]
    rows = [{"prompt": text(total // 4), "chosen": " " + text(3 * total // 8), "rejected": " " + text(3 * total // 8)}
            for _ in range(n)]
    shared.write_jsonl(path, rows)
    return path


def suite_profile(args):
    out = _header(args)
    model_dir = build_model_dir(args.workdir, "smollm2", args.smol_layers)
    data = build_data(args.workdir, args.kind, 4 * (args.warmup + args.steps))
    row = run_pair(args.workdir, f"profile-smollm2/{args.kind}/{args.precisions or 'fp32'}", model_dir, data,
                   batch=4, max_length=LENGTHS[args.kind]["max_length"], precision=args.precisions or "fp32", warmup=args.warmup, steps=args.steps, repeats=1,
                   worker_script=os.path.abspath(__file__))
    out["run"] = row
    print_profile(row)
    print(f"wrote {_save('profile', out)}")


def print_profile(row):
    import step_profile

    print(f"\nseconds per step by bucket ({row['name']}; hooks add some overhead to every bucket)")
    print(f"{'bucket':12s} {'TRL':>8s} {'prefalign':>10s} {'TRL %':>6s} {'pa %':>6s}")
    steps = {t: row[t]["timed_steps"] for t in ("trl", "prefalign")}
    for k in step_profile.ORDER + ("total",):
        t, p = row["trl"]["profile"][k] / steps["trl"], row["prefalign"]["profile"][k] / steps["prefalign"]
        tt = row["trl"]["profile"]["total"] / steps["trl"]
        pt = row["prefalign"]["profile"]["total"] / steps["prefalign"]
        print(f"{k:12s} {t:8.2f} {p:10.2f} {100 * t / tt:5.0f}% {100 * p / pt:5.0f}%")


def print_table(rows):
    print(f"\n{'config':34s} {'tok/pair':>8s} {'TRL p/s':>8s} {'pa p/s':>8s} {'ratio':>6s} {'TRL tok/s':>9s} "
          f"{'pa tok/s':>9s} {'TRL RSS':>8s} {'pa RSS':>8s} {'RSS r':>6s}")
    for r in rows:
        if "trl" not in r:
            p = r["prefalign"]
            print(f"{r['name']:34s} {r['mean_tokens_per_pair']:8.0f} {'-':>8s} {p['pairs_per_s']:8.3f} {'-':>6s} "
                  f"{'-':>9s} {p['tokens_per_s']:9.0f} {'-':>8s} {p['peak_rss_mb']:8.0f}")
            continue
        t, p = r["trl"], r["prefalign"]
        print(f"{r['name']:34s} {r['mean_tokens_per_pair']:8.0f} {t['pairs_per_s']:8.3f} {p['pairs_per_s']:8.3f} "
              f"{r['ratios']['pairs_per_s']:5.2f}x {t['tokens_per_s']:9.0f} {p['tokens_per_s']:9.0f} "
              f"{t['peak_rss_mb']:8.0f} {p['peak_rss_mb']:8.0f} {r['ratios']['peak_rss']:5.2f}x")
        for line in shape_goals.goal_lines(r):
            print(line)


def suite_report(args):
    """Reprint the tables (with the goals and their bounds) of earlier compare/scaling JSON files."""
    rows = []
    for path in args.files:
        with open(path) as fh:
            d = json.load(fh)
        print(f"{path}: {d.get('command', '')}; CPU {d.get('cpu')}; load {d.get('uptime_start')} .. "
              f"{d.get('uptime_end', '')}")
        rows += d.get("runs", []) + d.get("by_length", []) + d.get("by_batch", [])
    print_table(rows)


def profile_worker(tool, spec):
    """A worker of dpo_vs_trl, with the step profile's hooks (spec "profile") and/or prefalign's
    issue-16 fast paths off (spec "baseline": one masked SDPA call per row, per-tensor AdamW)."""
    import step_profile

    if spec.get("baseline"):
        from prefalign import optim, segment_attention

        segment_attention.ENABLED = False
        optim.fusable = lambda params: False
    if spec.get("profile"):
        step_profile.install(tool)
    res = (shared.worker_trl if tool == "trl" else shared.worker_prefalign)(spec)
    if spec.get("profile"):
        res["profile"] = step_profile.buckets(res["stamps"][spec["warmup"]], res["stamps"][-1])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", choices=["compare", "profile", "scaling", "report"], default="compare")
    ap.add_argument("files", nargs="*", help="report: the JSON files to reprint")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precisions", default="", help="comma list (default: fp32 and the fastest exact one)")
    ap.add_argument("--only", default="", help="comma list of arch/kind, e.g. smollm2/short")
    ap.add_argument("--kind", choices=sorted(LENGTHS), default="ultrafeedback", help="the profile suite's data")
    ap.add_argument("--qwen-layers", type=int, default=4)
    ap.add_argument("--smol-layers", type=int, default=None, help="SmolLM2 layers (default its 30)")
    ap.add_argument("--scaling-layers", type=int, default=None, help="SmolLM2 layers in the scaling suite")
    ap.add_argument("--lengths", default="256,512,1024,2048")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=2, help="batch of the max-length sweep")
    ap.add_argument("--workdir", default="/tmp/prefalign-bench-real-shapes")
    ap.add_argument("--ab", action="store_true", help="also prefalign without the issue-16 fast paths")
    ap.add_argument("--cuda", action="store_true", help="both tools on the GPU (bench/gpu_check.sh)")
    ap.add_argument("--out", default="", help="the JSON file to write (default bench/results/real_shapes_SUITE.json)")
    ap.add_argument("--worker", choices=["trl", "prefalign"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.spec) as fh:
            spec = json.load(fh)
        with open(args.result, "w") as fh:
            json.dump(profile_worker(args.worker, spec), fh)
        return
    os.makedirs(args.workdir, exist_ok=True)
    global OUT
    OUT = args.out
    {"compare": suite_compare, "profile": suite_profile, "scaling": suite_scaling,
     "report": suite_report}[args.suite](args)


if __name__ == "__main__":
    main()
