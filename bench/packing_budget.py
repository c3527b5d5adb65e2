"""Packed-row budget vs speed: one pass over 8 random pairs (32k-vocab Llama, 4 layers, hidden 256)
with rows of the longest pair (the default), 2x and 4x that budget, and padded batches.

    python bench/packing_budget.py                                   # SDPA, fwd+bwd (training)
    python bench/packing_budget.py --attention sdpa --fwd-only --threads 1
    python bench/packing_budget.py --attention flex_attention --fwd-only --threads 1 --out bench/results/packing_budget.json

FlexAttention has no backward on CPU (torch 2.13), so on CPU it can only be timed forward-only
(the reference model's pass). Compilation is excluded: one untimed call per row shape first.
"""
import argparse, json, os, platform, random, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from prefalign.data.packing import pack_pairs
from prefalign import objective

ap = argparse.ArgumentParser()
ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager", "flex_attention"])
ap.add_argument("--fwd-only", action="store_true", help="time a no-grad forward (the reference's pass)")
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--out", default="", help="append this run's numbers to a JSON file")
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048), ).float()
m.set_attn_implementation(args.attention)
if args.fwd_only:
    m.requires_grad_(False)
rng = random.Random(0)
class P:
    def __init__(s,a,b,c): s.prompt_ids,s.chosen_ids,s.rejected_ids=a,b,c
def seq(n): return [rng.randrange(5, 4000) for _ in range(n)]
items = [P(seq(rng.randint(30,180)), seq(rng.randint(30,300)), seq(rng.randint(30,300))) for _ in range(8)]
longest = max(len(p.prompt_ids)+len(p.chosen_ids)+len(p.rejected_ids) for p in items)
print("tokens", sum(len(p.prompt_ids)+len(p.chosen_ids)+len(p.rejected_ids) for p in items), "longest", longest)
def once(packing, budget):
    with torch.set_grad_enabled(not args.fwd_only):
        out = objective.pair_logps(m, items, pad_id=0, packing=packing, token_budget=budget, chunk_size=0)
        if not args.fwd_only:
            (out.chosen.sum()-out.rejected.sum()).backward()
def run(packing, budget):
    t = time.time(); once(packing, budget); first = time.time() - t  # compiles (flex) / warms up
    t = time.time()
    for _ in range(args.repeats):
        once(packing, budget)
    return first, (time.time()-t)/args.repeats
rows = []
settings = [(True, 0), (True, 2*longest), (True, 4*longest)] + ([(False, 0)] if args.attention != "flex_attention" else [])
for packing, budget in settings:
    shape = list(pack_pairs(items, budget or longest).input_ids.shape) if packing else None
    first, s = run(packing, budget)
    rows.append(dict(packing=packing, budget=budget or (longest if packing else 0), rows=shape, seconds=round(s, 3), first_call_s=round(first, 2)))
    print(rows[-1], flush=True)
if args.out:
    res = json.load(open(args.out)) if os.path.exists(args.out) else []
    res.append(dict(attention=args.attention, pass_="fwd" if args.fwd_only else "fwd+bwd", threads=torch.get_num_threads(),
                    torch=torch.__version__, machine=platform.machine(), load_avg=os.getloadavg()[0], results=rows))
    json.dump(res, open(args.out, "w"), indent=1)
