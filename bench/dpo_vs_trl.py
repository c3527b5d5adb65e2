"""prefalign vs TRL's DPOTrainer: the same DPO run, side by side (issue 4, item 4).

    python bench/dpo_vs_trl.py            # the full benchmark (both workloads, fp32 + bf16, precomputed)
    python bench/dpo_vs_trl.py --quick    # a reduced check: workload 1, fp32, 64 pairs, 1 warm-up + 2 timed steps

The workload is built deterministically here (no downloads):
  * a byte-level BPE tokenizer (vocab 4000) trained on sentences of 3000 random lowercase words;
  * 512 pairs: prompt 20-120 random words, chosen / rejected 20-200 words each;
  * a random-init LlamaForCausalLM (vocab 32000, hidden 256, intermediate 1024, 4 layers,
    4 heads, untied head, seed 0), saved to a directory that both tools load;
  * workload 2: the same with a Qwen-sized vocabulary (151,936) and batch 4 pairs.

Both tools: batch 8 pairs (4 on workload 2), max_length 512, beta 0.1, lr 1e-5 constant, no
warm-up, clip 1.0, weight decay 0, no gradient checkpointing, a frozen reference copy, fp32 and
bf16 (autocast). Each run is its own Python process (`--worker`). The data order is the same:
prefalign's permutation for the seed is computed here and TRL reads the file in that order with
`train_sampling_strategy="sequential"`, so step 1 sees the same pairs in both tools.

Timing: a step is the interval between two consecutive step ends (TRL: the on_step_end
callback; prefalign: the metrics line it writes after each step), so everything the loop
does counts. The first `--warmup` steps are excluded. pairs/s = pairs / timed seconds;
tokens/s counts each pair's non-padding tokens once (prompt + chosen + rejected), the same
definition for both tools. Peak RSS is the worker's getrusage high-water mark.

MFU = useful FLOP/s / the measured fp32 matmul peak of this CPU; useful FLOPs =
6 N per trained token + 2 N per reference-forward token, N = non-embedding parameters
(everything but the input embedding; the untied output head is a matmul per token and counts),
tokens = prompt + chosen + rejected per pair (each prompt token once).

Writes bench/results/dpo_vs_trl.json (or dpo_vs_trl_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
SPECIALS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2

# ---------------------------------------------------------------------------
# The workload (shared with bench/trl_agreement.py)


def random_words(n: int, seed: int, lo: int = 2, hi: int = 10) -> list[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer(words: list[str], vocab_size: int, seed: int = 0):
    """A byte-level BPE (GPT-2/Llama-3 kind) trained on sentences of `words`, with <pad>, <bos>, <eos>.

    No post-processor: the tokenizer adds no BOS/EOS by itself, so `tokenizer(text)` is the
    same with and without special tokens (TRL tokenizes with them, prefalign without)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(max(200, len(words) // 3))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_pairs(words, n, seed, prompt_words, completion_words) -> list[dict]:
    """Plain-text pairs. The prompt ends on a word, completions start with a space: byte-level
    pre-tokenization splits there, so prompt tokens are a prefix of prompt+completion tokens."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    rows = []
    for _ in range(n):
        row = {"prompt": text(*prompt_words), "chosen": " " + text(*completion_words),
               "rejected": " " + text(*completion_words)}
        if row["chosen"] == row["rejected"]:
            row["rejected"] += " " + rng.choice(words)
        rows.append(row)
    return rows


def build_model(vocab_size, hidden, intermediate, layers, heads, kv_heads=None, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def prefalign_order(n_items: int, steps: int, per_step: int, seed: int) -> list[int]:
    """The pairs prefalign consumes in steps 1..steps, in order (its permutation for `seed`)."""
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from prefalign.schedule import step_indices

    if per_step != n_items and steps > n_items // per_step:
        raise ValueError("the TRL order file covers one epoch; use batch = whole dataset or fewer steps")
    if per_step == n_items:  # each step sees every pair: any order gives the same mean
        return list(range(n_items))
    return [i for s in range(steps) for i in step_indices(n_items, s, per_step, seed)]


def build_workload(workdir: str, *, vocab: int, n_pairs: int, seed: int = 0) -> dict:
    """Tokenizer + model dir + data files under workdir (cached: rebuilt only when missing)."""
    model_dir = os.path.join(workdir, f"llama-v{vocab}")
    data = os.path.join(workdir, f"pairs-{n_pairs}.jsonl")
    os.makedirs(workdir, exist_ok=True)
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        words = random_words(3000, seed)
        tok = build_tokenizer(words, 4000, seed)
        model = build_model(vocab, 256, 1024, 4, 4, seed=seed)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    if not os.path.isfile(data):
        words = random_words(3000, seed)
        write_jsonl(data, make_pairs(words, n_pairs, seed + 1, (20, 120), (20, 200)))
    return {"model": model_dir, "data": data}


# ---------------------------------------------------------------------------
# Workers: one tool, one run, one process. Spec and result are JSON files.


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cuda_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _n_params(model_dir: str) -> dict:
    from safetensors import safe_open

    total = emb = head = 0
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
            if "embed_tokens" in k:
                emb += n
            elif k.startswith("lm_head"):
                head += n
    return {"total": total, "embedding": emb, "head": head, "non_embedding": total - emb}


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(spec["seed"])
    rows = [json.loads(line) for line in open(spec["data"])]
    rows = [rows[i] for i in spec["order"]]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    bf16 = spec["precision"] == "bf16"
    args = DPOConfig(
        output_dir=spec["output"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"], max_steps=spec["steps"],
        bf16=bf16, fp16=False, use_cpu=not spec.get("cuda", False), gradient_checkpointing=False, logging_steps=1,
        report_to="none",
        save_strategy="no", seed=spec["seed"], data_seed=spec["seed"], train_sampling_strategy="sequential",
        precompute_ref_log_probs=spec.get("reference") == "precomputed", dataloader_num_workers=0,
        disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Stamp()])
    setup_s = time.perf_counter() - t0
    ds = trainer.train_dataset
    tokens = [len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    t_start = time.perf_counter()
    trainer.train()
    out = {"setup_s": setup_s, "stamps": [t_start] + stamps, "tokens_per_pair": tokens,
           "steps": [{k: v for k, v in h.items()} for h in trainer.state.log_history if "loss" in h],
           "peak_rss_mb": _peak_rss_mb(), "cuda_peak_mb": _cuda_peak_mb(), "torch_threads": torch.get_num_threads()}
    if spec.get("dump_ids"):
        out["ids"] = [[list(p), list(c), list(r)] for p, c, r in
                      zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return out


def worker_prefalign(spec: dict) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "src"))
    from prefalign import metrics
    from prefalign.cli import main

    stamps = []
    write = metrics.MetricsLog.write

    def stamped(self, record):  # called once per step, right after the step (log_every 1)
        if "loss" in record:
            stamps.append(time.perf_counter())
        return write(self, record)

    metrics.MetricsLog.write = stamped
    argv = prefalign_argv(spec)
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"prefalign train exited {rc}")
    steps = metrics.read_jsonl(os.path.join(spec["output"], "metrics.jsonl"))
    steps = [s for s in steps if "loss" in s]
    # the interval before step 1 includes loading/precompute: take step 1's own duration as its start
    first = stamps[0] - spec["batch_size"] / steps[0]["pairs_per_s"]
    return {"setup_s": first - t0, "stamps": [first] + stamps, "steps": steps, "peak_rss_mb": _peak_rss_mb(),
            "cuda_peak_mb": _cuda_peak_mb(),
            "torch_threads": torch.get_num_threads(), "argv": argv}


def prefalign_argv(spec: dict) -> list[str]:
    argv = ["train", "--model", spec["model"], "--data", spec["data"], "--output", spec["output"],
            "--loss", "dpo", "--beta", str(spec["beta"]), "--lr", str(spec["lr"]), "--lr-schedule", "constant",
            "--warmup-steps", "0", "--max-grad-norm", "1.0", "--weight-decay", "0",
            "--batch-size", str(spec["batch_size"]), "--grad-accum", "1", "--max-steps", str(spec["steps"]),
            "--max-length", str(spec["max_length"]), "--precision", spec["precision"],
            "--reference", spec.get("reference", "copy"), "--seed", str(spec["seed"]),
            "--packing" if spec.get("packing", True) else "--no-packing",
            "--no-progress", "--no-save-model", "--overwrite"]
    if spec.get("max_prompt_length"):
        argv += ["--max-prompt-length", str(spec["max_prompt_length"])]
    if spec.get("token_budget") is not None:
        argv += ["--token-budget", str(spec["token_budget"])]
    return argv


def run_worker(tool: str, spec: dict, timeout: float = 3600, script: str | None = None) -> dict:
    """Run one tool in a fresh Python process; returns its result dict (raises on failure).

    TRL runs under $TRL_PYTHON when set (an environment that has TRL, e.g. a separate venv), else this
    interpreter. `script`: another bench file whose --worker mode to run (same arguments)."""
    os.makedirs(spec["output"], exist_ok=True)
    spec_path = os.path.join(spec["output"], "spec.json")
    result_path = os.path.join(spec["output"], "result.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    if os.path.exists(result_path):
        os.remove(result_path)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    python = os.environ.get("TRL_PYTHON") or sys.executable if tool == "trl" else sys.executable
    cmd = [python, script or os.path.abspath(__file__), "--worker", tool, "--spec", spec_path, "--result", result_path]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not os.path.isfile(result_path):
        raise RuntimeError(f"{tool} worker failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    with open(result_path) as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------
# The benchmark


def measure_matmul_peak(n: int = 1024, seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of torch.mm [n,n]x[n,n] on this CPU (all of torch's threads)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=c)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def summarize(res: dict, warmup: int, batch: int, order: list[int], n_params: int, ref_forward: bool,
              tokens_per_pair: list[int]) -> dict:
    stamps = res["stamps"]  # stamps[0] = start of step 1, stamps[k] = end of step k
    steps = len(stamps) - 1
    timed = range(warmup + 1, steps + 1)
    secs = stamps[steps] - stamps[warmup]
    pairs = batch * len(timed)
    toks = sum(tokens_per_pair[order[i]] for s in timed for i in range((s - 1) * batch, s * batch))
    flops = (6 + (2 if ref_forward else 0)) * n_params * toks
    s1 = res["steps"][0]
    return {"timed_steps": len(timed), "timed_s": secs, "pairs_per_s": pairs / secs, "tokens_per_s": toks / secs,
            "step_s": [b - a for a, b in zip(stamps, stamps[1:])], "useful_gflops_per_s": flops / secs / 1e9,
            "peak_rss_mb": res["peak_rss_mb"], "setup_s": res["setup_s"],
            "step1": {k: s1.get(k) for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins")},
            "losses": [s.get("loss") for s in res["steps"]]}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def main_bench(args):
    import torch

    quick = args.quick
    workdir = args.workdir
    warmup, timed = (1, 2) if quick else (args.warmup, args.steps)
    steps = warmup + timed
    n_pairs = 64 if quick else 512
    workloads = [("llama-32k", 32000, 8)] + ([] if quick else [("qwen-vocab-152k", 151936, 4)])
    precisions = ["fp32"] if quick else ["fp32", "bf16"]
    print(f"load at start: {uptime()}")
    peak = measure_matmul_peak()
    print(f"measured fp32 matmul peak of this CPU: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    out = {"command": "python bench/dpo_vs_trl.py" + (" --quick" if quick else ""), "quick": quick,
           "uptime_start": uptime(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "fp32_matmul_peak_gflops": peak, "warmup_steps": warmup, "timed_steps": timed, "n_pairs": n_pairs,
           "settings": {"max_length": 512, "beta": 0.1, "lr": 1e-5, "lr_schedule": "constant", "max_grad_norm": 1.0,
                        "weight_decay": 0.0, "gradient_checkpointing": False, "reference": "frozen copy"},
           "runs": []}
    rows = []
    for name, vocab, batch in workloads:
        wl = build_workload(workdir, vocab=vocab, n_pairs=n_pairs)
        npar = _n_params(wl["model"])
        order = prefalign_order(n_pairs, steps, batch, 0)
        trl_data = os.path.join(workdir, f"pairs-{n_pairs}-trl-order-b{batch}.jsonl")
        src_rows = [json.loads(line) for line in open(wl["data"])]
        write_jsonl(trl_data, src_rows)  # the worker applies `order`
        variants = [(p, "copy") for p in precisions]
        if not quick and name == workloads[0][0]:
            variants.append(("fp32", "precomputed"))
        tokens_per_pair = _prefalign_tokens(wl)  # after truncation, as both tools see them
        for precision, reference in variants:
            # max_prompt_length 511: prefalign then truncates exactly as TRL's keep_start does (the
            # completion is cut to fit max_length after the whole prompt), so both see the same tokens.
            base = dict(model=wl["model"], batch_size=batch, lr=1e-5, beta=0.1, max_length=512, steps=steps,
                        precision=precision, seed=0, max_prompt_length=511)
            res = {}
            tools = ["trl", "prefalign"] if reference == "copy" else ["prefalign"]
            for tool in tools:
                data = trl_data if tool == "trl" else wl["data"]
                if reference == "precomputed":
                    # precompute runs over the whole data file before step 1: give it only the pairs the
                    # timed run consumes (the setup time is reported separately as setup_s)
                    data = os.path.join(workdir, f"pairs-{n_pairs}-first{len(order)}.jsonl")
                    write_jsonl(data, [src_rows[i] for i in order])
                spec = dict(base, output=os.path.join(workdir, f"run-{name}-{precision}-{reference}-{tool}"),
                            reference=reference, data=data, order=order)
                print(f"[{name} {precision} ref={reference}] {tool} ...", flush=True)
                t = time.perf_counter()
                r = run_worker(tool, spec)
                res[tool] = r
                print(f"    done in {time.perf_counter() - t:.0f}s", flush=True)
            summary = {}
            for tool, r in res.items():
                ref_forward = reference == "copy"
                tool_order = order
                if reference == "precomputed":  # its data file is `order`; prefalign permutes that file
                    tool_order = [order[i] for i in prefalign_order(len(order), steps, batch, 0)]
                summary[tool] = summarize(r, warmup, batch, tool_order, npar["non_embedding"], ref_forward,
                                          tokens_per_pair)
                summary[tool]["mfu"] = summary[tool]["useful_gflops_per_s"] / peak
            # Bounds no implementation can beat on this machine: the speed-up at 100% MFU (the measured
            # fp32 matmul peak) over TRL's measured MFU, and the RSS of the training state alone
            # (fp32 weights, gradients, two AdamW moments, the reference copy: 5 x 4 bytes per
            # parameter) plus the interpreter with torch/transformers imported.
            bounds = {"state_floor_mb": (5 if reference == "copy" else 4) * 4 * npar["total"] / 2**20}
            if "trl" in summary and precision == "fp32":
                bounds["speedup_at_full_mfu"] = 1 / summary["trl"]["mfu"]
            run = {"workload": name, "vocab": vocab, "batch": batch, "precision": precision, "reference": reference,
                   "n_params": npar, "bounds": bounds, **summary}
            if "trl" in summary:
                p, t = summary["prefalign"], summary["trl"]
                run["ratios"] = {"pairs_per_s": p["pairs_per_s"] / t["pairs_per_s"],
                                 "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"],
                                 "step1_logps_chosen_rel_diff": rel(p["step1"]["logps/chosen"], t["step1"]["logps/chosen"]),
                                 "step1_logps_rejected_rel_diff": rel(p["step1"]["logps/rejected"],
                                                                      t["step1"]["logps/rejected"])}
            out["runs"].append(run)
            rows.append(run)
            print_table(rows)
            _save(out, quick)
    out["uptime_end"] = uptime()
    _save(out, quick)
    print_table(rows)
    print(f"fp32 matmul peak measured: {peak:.1f} GFLOP/s; load: {out['uptime_start']} -> {out['uptime_end']}")


def _prefalign_tokens(wl):
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from transformers import AutoTokenizer

    from prefalign.data.formats import load_examples
    from prefalign.data.tokenize import tokenize_examples

    tok = AutoTokenizer.from_pretrained(wl["model"])
    res = tokenize_examples(load_examples(wl["data"], kind="paired").examples, tok, 512, 511)
    items = res.items
    print(f"    tokenized: {res.stats}; tokens per pair (P+C+R, after truncation) mean "
          f"{sum(i.num_tokens for i in items) / len(items):.0f}")
    return [i.num_tokens for i in items]


def _save(out, quick):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "dpo_vs_trl_quick.json" if quick else "dpo_vs_trl.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(path + ".tmp", path)


def print_table(rows):
    hdr = (f"{'workload':16s} {'prec':5s} {'ref':11s} {'tool':9s} {'pairs/s':>8s} {'tok/s':>8s} {'RSS MB':>8s} "
           f"{'MFU':>6s} {'step1 logps/ch':>15s} {'step1 logps/rej':>15s}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        for tool in ("trl", "prefalign"):
            if tool not in r:
                continue
            s = r[tool]
            print(f"{r['workload']:16s} {r['precision']:5s} {r['reference']:11s} {tool:9s} {s['pairs_per_s']:8.2f} "
                  f"{s['tokens_per_s']:8.0f} {s['peak_rss_mb']:8.0f} {100 * s['mfu']:5.1f}% "
                  f"{s['step1']['logps/chosen']:15.4f} {s['step1']['logps/rejected']:15.4f}")
        if "ratios" in r:
            q = r["ratios"]
            print(f"{'':16s} {'':5s} {'':11s} {'ratio':9s} {q['pairs_per_s']:7.2f}x {'':8s} {q['peak_rss']:7.2f}x "
                  f"{'':6s} {q['step1_logps_chosen_rel_diff']:15.1e} {q['step1_logps_rejected_rel_diff']:15.1e}")
        b = r.get("bounds", {})
        if b:
            line = f"{'':16s} bounds: training state alone {b['state_floor_mb']:.0f} MB"
            if "speedup_at_full_mfu" in b:
                line += f"; speed-up over TRL at 100% MFU {b['speedup_at_full_mfu']:.1f}x"
            print(line)
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced: workload 1, fp32 only, 64 pairs, 1+2 steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_dpo_vs_trl"))
    ap.add_argument("--worker", choices=["trl", "prefalign"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.spec) as fh:
            spec = json.load(fh)
        res = (worker_trl if args.worker == "trl" else worker_prefalign)(spec)
        with open(args.result, "w") as fh:
            json.dump(res, fh)
        return
    main_bench(args)


if __name__ == "__main__":
    main()
