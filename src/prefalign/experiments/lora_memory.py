"""lora-memory: full fine-tuning vs LoRA DPO, reference by adapters-off or precomputed.

The demo model (~0.4M parameters) is too small for memory figures to mean anything, so this
experiment builds a larger randomly initialised Llama with the demo tokenizer (SIZE below: ~27M
parameters, fp32) and trains DPO on the demo's on-policy pairs for a few steps. Each variant runs in
a fresh Python process (multiprocessing "spawn"), so its peak resident set size (getrusage
ru_maxrss, the same figure the trainer logs as peak_memory_mb on CPU; the CUDA allocator peak on a
GPU) is its own. Variants:
  - full fine-tuning, reference = a frozen copy;
  - full fine-tuning, reference log-probs precomputed once (the copy is freed before training);
  - LoRA (r 8, all linear layers), reference = the same model with the adapters switched off;
  - LoRA + precomputed reference log-probs.
Reported: trainable parameters; AdamW state bytes (two fp32 tensors per trainable parameter:
exp_avg and exp_avg_sq); RSS after building the model, peak RSS, and their difference; median step
time; the reference setup time (precomputation); and which weights changed (SHA-1 of every
parameter before and after training): for LoRA only the adapters may change.
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from prefalign.experiments import common
from prefalign.metrics import write_jsonl

SIZE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=8)
QUICK_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)
LORA_R = 8
VARIANTS = [("full fine-tuning, copy reference", 0, "copy"),
            ("full fine-tuning, precomputed reference", 0, "precomputed"),
            ("LoRA r=8, adapters-off reference", LORA_R, "adapters-off"),
            ("LoRA r=8, precomputed reference", LORA_R, "precomputed")]


def _digest(t) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _base_name(name: str) -> str:
    """A PEFT parameter name as it was in the plain model."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def measure(spec: dict) -> dict:
    """One variant, in its own process: train a few DPO steps and report memory, time, changes."""
    import torch

    torch.set_num_threads(spec["threads"])
    from prefalign import config, train
    from prefalign.demo.model import build_model
    from prefalign.demo.tokenizer import build_tokenizer
    from prefalign.metrics import peak_memory_mb

    tok = build_tokenizer()
    model = build_model(tok, seed=spec["seed"], **spec["size"])
    n_params = sum(p.numel() for p in model.parameters())
    before = {n: _digest(p) for n, p in model.named_parameters()}
    base_rss = peak_memory_mb()
    ref = copy.deepcopy(model) if spec["lora_r"] == 0 else None
    cfg = config.build(dict(data=spec["data"], output=spec["output"], loss="dpo", beta=0.1, lr=1e-3,
                            max_steps=spec["steps"], batch_size=spec["batch"], lora_r=spec["lora_r"],
                            reference=spec["reference"], max_length=16, progress=False, overwrite=True,
                            save_model=False, lr_schedule="constant", packing=True, seed=spec["seed"]),
                       where="lora-memory")
    t0 = time.time()
    res = train.train(cfg, model=model, tokenizer=tok, ref_model=ref)
    wall = time.time() - t0
    del ref
    per_step = [spec["batch"] / r["pairs_per_s"] for r in res.history]
    trainable = sum(p.numel() for p in res.policy.parameters() if p.requires_grad)
    changed_adapter = changed_base = adapters = 0
    for name, p in res.policy.named_parameters():
        if "lora_" in name:
            adapters += 1
            changed_adapter += True  # adapters start at B = 0; compared below by their grad flag
            continue
        changed_base += _digest(p) != before[_base_name(name)]
    lora_b_nonzero = sum(bool(p.detach().abs().sum() > 0) for n, p in res.policy.named_parameters() if "lora_B" in n)
    return {"params": n_params, "trainable": trainable, "adam_bytes": 2 * 4 * trainable,
            "base_rss": base_rss, "peak_rss": peak_memory_mb(), "step_s": statistics.median(per_step[1:] or per_step),
            "setup_s": wall - sum(per_step), "changed_base": changed_base, "base_tensors": len(before),
            "adapter_tensors": adapters, "lora_B_trained": lora_b_nonzero,
            "last_loss": res.history[-1]["loss"] if res.history else float("nan")}


def run(ctx: common.Context) -> common.Result:
    import torch

    start = common.demo_start(ctx)
    size = QUICK_SIZE if ctx.quick else SIZE
    steps, batch = (2, 4) if ctx.quick else (6, 8)
    n = min(len(start.pairs), steps * batch)
    data = write_jsonl(ctx.path("data", "pairs_subset.jsonl"), start.pairs[:n])
    rows, raw = [], {}
    mp = multiprocessing.get_context("spawn")
    for i, (name, r, ref) in enumerate(VARIANTS):
        ctx.say(f"{name}: {steps} steps of {batch} pairs in a fresh process")
        spec = dict(size=size, lora_r=r, reference=ref, data=data, output=ctx.path(f"run-{i}"), steps=steps,
                    batch=batch, seed=ctx.seed, threads=max(1, torch.get_num_threads()))
        with ctx.timer("training (child processes)"):
            if ctx.quick:  # a smoke run: in this process (memory figures then mean little)
                m = measure(spec)
            else:
                with ProcessPoolExecutor(max_workers=1, mp_context=mp) as pool:
                    m = pool.submit(measure, spec).result()
        raw[name] = m
        changed = (f"{m['changed_base']}/{m['base_tensors']} base" +
                   (f"; {m['lora_B_trained']}/{m['adapter_tensors'] // 2} adapters (B != 0)" if r else ""))
        rows.append({"run": name, "trainable params": m["trainable"], "trainable %": 100 * m["trainable"] / m["params"],
                     "AdamW state (MB)": m["adam_bytes"] / 2**20, "RSS after model (MB)": m["base_rss"],
                     "peak RSS (MB)": m["peak_rss"], "peak - model (MB)": m["peak_rss"] - m["base_rss"],
                     "step (s)": m["step_s"], "setup incl. precompute (s)": m["setup_s"],
                     "weights changed": changed})
    xs = list(range(len(rows)))
    fig = common.plot(ctx.path("plots", "lora_memory.png"), [
        {"series": {"peak RSS - RSS after model": (xs, [r["peak - model (MB)"] for r in rows]),
                    "AdamW state": (xs, [r["AdamW state (MB)"] for r in rows])},
         "xlabel": "0 full+copy, 1 full+precomputed, 2 LoRA+adapters-off, 3 LoRA+precomputed", "ylabel": "MB",
         "title": "memory added by training", "style": "o-"},
        {"series": {"median step time": (xs, [r["step (s)"] for r in rows])},
         "xlabel": "0 full+copy, 1 full+precomputed, 2 LoRA+adapters-off, 3 LoRA+precomputed", "ylabel": "s",
         "title": "time per optimizer step", "style": "o-", "legend": False},
    ])
    full, full_pre, lora, lora_pre = rows
    only_adapters = all(raw[r["run"]]["changed_base"] == 0 for r in (lora, lora_pre))
    all_full = raw[full["run"]]["changed_base"] == raw[full["run"]]["base_tensors"]
    saved = full["peak - model (MB)"] - lora["peak - model (MB)"]
    verdict = (f"{'Matches' if only_adapters and saved > 0 else 'Does NOT match'} the claim: LoRA trains "
               f"{lora['trainable %']:.2f}% of the parameters; its AdamW state is {lora['AdamW state (MB)']:.2f} MB vs "
               f"{full['AdamW state (MB)']:.0f} MB; training added {lora['peak - model (MB)']:.0f} MB (adapters-off "
               f"reference) vs {full['peak - model (MB)']:.0f} MB for full fine-tuning with a reference copy. "
               f"{'Only adapter weights changed under LoRA (every base tensor bit-identical)' if only_adapters else 'Some base weights changed under LoRA!'}"
               f"{'; full fine-tuning changed every tensor' if all_full else ''}. Median step time without -> with "
               f"a precomputed reference: {lora['step (s)']:.3f}s -> {lora_pre['step (s)']:.3f}s (LoRA), "
               f"{full['step (s)']:.3f}s -> {full_pre['step (s)']:.3f}s (full); a few steps on a shared CPU are noisy.")
    return common.Result(
        title="lora-memory: full fine-tuning vs LoRA DPO", rows=rows, figures=[fig], verdict=verdict,
        claim="DPO + LoRA: the policy is base + adapters, the reference is the frozen base; only the adapters "
              "train, which saves most of the optimizer and gradient memory.",
        notes=[f"Model: a randomly initialised Llama ({', '.join(f'{k}={v}' for k, v in size.items())}; "
               f"{raw[full['run']]['params'] / 1e6:.1f}M parameters, fp32, tied embeddings) with the demo tokenizer, "
               f"{steps} DPO steps of {batch} demo pairs (packed), CPU, torch threads as the command's --threads. "
               f"RSS includes the Python/torch runtime; 'peak - model' is what training added (gradients, "
               f"optimizer state, activations, a reference copy). Step time: median over the steps after the first.",
               "Weights changed: SHA-1 of each parameter tensor before vs after training (base tensors, by name). "
               "LoRA's A matrices start random and its B matrices at zero, so 'B != 0' counts adapters that trained."],
        extra={"raw": raw, "size": size},
    )
