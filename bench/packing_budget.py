"""Packed-row budget vs speed: one fwd+bwd of 8 random pairs (32k-vocab Llama, 4 layers, hidden 256)
with rows of the longest pair (the default), 2x and 4x that budget, and padded batches.

    python bench/packing_budget.py
"""
import random, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from prefalign.data.packing import pack_pairs, packed_pair_logps
from prefalign import objective
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048), ).float()
m.config._attn_implementation = "sdpa"
rng = random.Random(0)
class P:
    def __init__(s,a,b,c): s.prompt_ids,s.chosen_ids,s.rejected_ids=a,b,c
def seq(n): return [rng.randrange(5, 4000) for _ in range(n)]
items = [P(seq(rng.randint(30,180)), seq(rng.randint(30,300)), seq(rng.randint(30,300))) for _ in range(8)]
longest = max(len(p.prompt_ids)+len(p.chosen_ids)+len(p.rejected_ids) for p in items)
print("tokens", sum(len(p.prompt_ids)+len(p.chosen_ids)+len(p.rejected_ids) for p in items), "longest", longest)
def run(packing, budget):
    t=time.time()
    for _ in range(2):
        out = objective.pair_logps(m, items, pad_id=0, packing=packing, token_budget=budget, chunk_size=0)
        (out.chosen.sum()-out.rejected.sum()).backward()
    return (time.time()-t)/2
for packing, budget in [(True, 0), (True, 2*longest), (True, 4*longest), (False, 0)]:
    if packing:
        pk = pack_pairs(items, budget or longest); print("rows", pk.input_ids.shape, end=" ")
    print("packing", packing, "budget", budget, "s/fwd+bwd", round(run(packing, budget),3))
