"""token_budget -1's layout (`packing.auto_budget`: several segments per row when that costs less)
against the old rule (one segment per row, padded to the longest), policy forward + backward of
real micro-batches, alternating, in one process; the best of the repeats per micro-batch.

    python bench/packing_layout.py MODEL_DIR DATA.jsonl MAX_LENGTH [--batch 4] [--repeats 3] [--order-from J]

(bench/real_shapes.py builds the models and data under /tmp/prefalign-bench-real-shapes.)
Writes bench/results/packing_layout_<model>_<data>.json.
"""

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign import objective
    from prefalign.data.formats import load_examples
    from prefalign.data.packing import budget_for, first_fit
    from prefalign.data.tokenize import tokenize_examples
    from prefalign.lean import lean_mlps

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model"), ap.add_argument("data"), ap.add_argument("max_length", type=int)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--order-from", default="", help="a real_shapes JSON: its first row's pair order (its steps)")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    items = tokenize_examples(load_examples(args.data, kind="paired").examples, tok, args.max_length,
                              args.max_length - 1).items
    if args.order_from:
        with open(args.order_from) as fh:
            items = [items[i] for i in json.load(fh)["runs"][0]["order"]]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    lean_mlps(model)
    batches = [items[i:i + args.batch] for i in range(0, len(items) - args.batch + 1, args.batch)]
    rows = []
    for b in batches:
        seg = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in b]
        auto = budget_for(-1, model, seg)
        layout = first_fit(seg, auto)
        rows.append({"segments": seg, "longest": max(seg), "auto_budget": auto, "auto_rows": len(layout),
                     "auto_width": max(sum(seg[i] for i in r) for r in layout), "s": {"longest": [], "auto": []}})
    for _ in range(args.repeats):
        for name in ("longest", "auto"):
            for b, row in zip(batches, rows):
                t = time.perf_counter()
                out = objective.pair_logps(model, b, pad_id=0, packing=True, chunk_size=0,
                                           token_budget=row["longest"] if name == "longest" else 0)
                (out.chosen.sum() - out.rejected.sum()).backward()
                row["s"][name].append(time.perf_counter() - t)
                model.zero_grad(set_to_none=True)
    for row in rows:
        best = {k: min(v) for k, v in row["s"].items()}
        row["auto_over_longest"] = best["auto"] / best["longest"]
        print(f"segments {row['segments']}: one per row {len(row['segments'])} x {row['longest']} "
              f"{best['longest']:.2f} s; auto {row['auto_rows']} x {row['auto_width']} {best['auto']:.2f} s "
              f"({row['auto_over_longest']:.2f}x the time)", flush=True)
    name = f"{os.path.basename(args.model.rstrip('/'))}_{os.path.basename(args.data).split('.')[0]}"
    name += "_ordered" if args.order_from else ""
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"packing_layout_{name}.json"), "w") as fh:
        json.dump({"command": " ".join(["python bench/packing_layout.py"] + sys.argv[1:]),
                   "uptime": os.popen("uptime").read().strip(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
