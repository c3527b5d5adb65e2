"""Do `prefalign train --loss dpo` and TRL 1.16's DPOTrainer log the same numbers? (issues 2 and 3)

    python bench/trl_agreement.py            # prints a table, writes bench/results/trl_agreement.json

The setup, identical for both tools:
  * a tiny random Llama (vocab 512, hidden 64, 2 layers, untied head, seed 0) saved to a directory
    that both tools load, and a plain-text preference JSONL (prompt / chosen / rejected);
  * a byte-level BPE tokenizer with no post-processor (it adds no BOS/EOS by itself); the
    prompt ends on a word and each completion starts with a space, so the tokenized prompt is
    a prefix of the tokenized prompt+completion and both tools cut the completion at the same
    token; both append EOS once (TRL appends the EOS *string*, prefalign the EOS id: the same
    token). The script checks this: TRL's prompt_ids/chosen_ids/rejected_ids must equal
    prefalign's token for token, or it stops;
  * max_length 128, no row truncated by either tool (checked);
  * lr 1e-4, constant schedule, no warm-up, clip 1.0, weight decay 0, AdamW (0.9, 0.999, 1e-8),
    beta 0.1, sigmoid loss, fp32, no gradient checkpointing, dropout off;
  * batch = the whole dataset (8 pairs) every step, so shuffling cannot differ (the mean over
    the same 8 pairs, in any order); TRL's sampler is also set to sequential;
  * a frozen reference copy loaded from the same directory.
prefalign runs twice: packed (the default) and `--no-packing` (padded batches).

Compared at steps 1-3: loss, rewards/margins, logps/chosen, logps/rejected. Step 1 is the forward
before the first update in both tools, so its margin is 0 up to rounding: near-zero values are
compared by absolute difference (|x| < 1e-6), everything else by relative difference.
Goals: step-1 logps within 1e-4 relative, steps 1-3 within 1e-3 relative.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import dpo_vs_trl as W  # noqa: E402  (the workload builders and the per-tool workers)

KEYS = ("loss", "rewards/margins", "logps/chosen", "logps/rejected")
STEPS = 3
N_PAIRS = 8
MAX_LENGTH = 128
TOL_STEP1_LOGPS = 1e-4
TOL = 1e-3
ZERO = 1e-6  # |value| below this (step-1 margins) is compared by absolute difference


def build(workdir: str) -> dict:
    words = W.random_words(200, seed=0, lo=2, hi=8)
    tok = W.build_tokenizer(words, 512, seed=0)
    model = W.build_model(512, 64, 128, 2, 4, kv_heads=2, seed=0)
    model_dir = os.path.join(workdir, "model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = os.path.join(workdir, "pairs.jsonl")
    W.write_jsonl(data, W.make_pairs(words, N_PAIRS, seed=1, prompt_words=(3, 12), completion_words=(2, 15)))
    return {"model": model_dir, "data": data}


def prefalign_ids(wl: dict) -> tuple[list, dict]:
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from transformers import AutoTokenizer

    from prefalign.data.formats import load_examples
    from prefalign.data.tokenize import tokenize_examples

    tok = AutoTokenizer.from_pretrained(wl["model"])
    res = tokenize_examples(load_examples(wl["data"], kind="paired").examples, tok, MAX_LENGTH, MAX_LENGTH // 2)
    return [[i.prompt_ids, i.chosen_ids, i.rejected_ids] for i in res.items], res.stats


def compare(trl_steps: list[dict], ours: list[dict]) -> list[dict]:
    rows = []
    for s in range(STEPS):
        for k in KEYS:
            a, b = ours[s][k], trl_steps[s][k]
            absdiff = abs(a - b)
            near_zero = max(abs(a), abs(b)) < ZERO
            reldiff = None if near_zero else absdiff / abs(b)
            tol = TOL_STEP1_LOGPS if (s == 0 and k.startswith("logps/")) else TOL
            ok = absdiff < ZERO if near_zero else reldiff <= tol
            rows.append({"step": s + 1, "metric": k, "prefalign": a, "trl": b, "abs_diff": absdiff,
                         "rel_diff": reldiff, "tolerance": tol, "ok": ok})
    return rows


def run(workdir: str | None = None, verbose: bool = True) -> dict:
    import trl

    workdir = workdir or tempfile.mkdtemp(prefix="trl_agreement_")
    wl = build(workdir)
    spec = dict(model=wl["model"], data=wl["data"], batch_size=N_PAIRS, lr=1e-4, beta=0.1, max_length=MAX_LENGTH,
                max_prompt_length=MAX_LENGTH // 2, steps=STEPS, precision="fp32", seed=0, reference="copy",
                order=list(range(N_PAIRS)), dump_ids=True)
    trl_res = W.run_worker("trl", dict(spec, output=os.path.join(workdir, "trl")))

    # Tokenization: the same ids, token for token, and nothing truncated by either tool.
    ours_ids, stats = prefalign_ids(wl)
    if stats.get("truncated") or any(len(p) + max(len(c), len(r)) > MAX_LENGTH for p, c, r in trl_res["ids"]):
        raise RuntimeError(f"a row is truncated (prefalign stats {stats}); lengthen MAX_LENGTH")
    if ours_ids != trl_res["ids"]:
        bad = next(i for i, (a, b) in enumerate(zip(ours_ids, trl_res["ids"])) if a != b)
        raise RuntimeError(f"tokenization differs at row {bad + 1}: prefalign {ours_ids[bad]} vs TRL {trl_res['ids'][bad]}")

    out = {"trl_version": trl.__version__, "settings": {k: v for k, v in spec.items() if k not in ("order", "dump_ids")},
           "tokenization": {"identical": True, "pairs": len(ours_ids), "prefalign_stats": stats,
                            "example": ours_ids[0]},
           "trl_steps": [{k: h[k] for k in KEYS} for h in trl_res["steps"][:STEPS]], "runs": {}}
    for packing in (True, False):
        name = "packed" if packing else "padded"
        res = W.run_worker("prefalign", dict(spec, packing=packing, output=os.path.join(workdir, f"prefalign-{name}")))
        rows = compare(trl_res["steps"], res["steps"])
        out["runs"][name] = {"command": "prefalign " + " ".join(res["argv"]), "rows": rows,
                             "ok": all(r["ok"] for r in rows),
                             "max_rel_diff": max(r["rel_diff"] or 0.0 for r in rows),
                             "step1_logps_max_rel_diff": max(r["rel_diff"] for r in rows
                                                             if r["step"] == 1 and r["metric"].startswith("logps/"))}
    out["ok"] = all(r["ok"] for r in out["runs"].values())
    if verbose:
        print_table(out)
    return out


def print_table(out: dict) -> None:
    for name, run_ in out["runs"].items():
        print(f"\nprefalign ({name}) vs TRL {out['trl_version']}   [{run_['command']}]")
        print(f"{'step':>4s} {'metric':16s} {'prefalign':>15s} {'TRL':>15s} {'rel diff':>10s} {'abs diff':>10s}  ok")
        for r in run_["rows"]:
            rd = "    (zero)" if r["rel_diff"] is None else f"{r['rel_diff']:10.2e}"
            print(f"{r['step']:4d} {r['metric']:16s} {r['prefalign']:15.8f} {r['trl']:15.8f} {rd} "
                  f"{r['abs_diff']:10.2e}  {'yes' if r['ok'] else 'NO'}")
        print(f"max rel diff {run_['max_rel_diff']:.2e}; step-1 logps max rel diff {run_['step1_logps_max_rel_diff']:.2e}")
    print(f"\ntokenization identical for all {out['tokenization']['pairs']} pairs; agreement: "
          f"{'PASS' if out['ok'] else 'FAIL'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where to build the model/data and run (default: a temp dir)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "trl_agreement.json"))
    args = ap.parse_args(argv)
    out = run(args.workdir)
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {args.json}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
