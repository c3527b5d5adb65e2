"""Prototype of the embedded demo: SFT -> on-policy pairs -> DPO -> held-out evaluation.

Not the product (``prefalign demo`` runs the project's trainer); this script exists to find
settings under which the story holds on a 2-core CPU, with plain torch loops, HF ``generate``
for sampling and an inline DPO loss, so that nothing in it depends on code still being written.

    python bench/demo_prototype.py --seed 0
    python bench/demo_prototype.py --seed 1 --beta 0.3 --sft-cache /tmp/sft_s1.pt  # reuse SFT for DPO sweeps

It prints the settings, the time of each stage and the held-out before/after table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from prefalign.demo import task
from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import build_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    # 1 thread by default: with the CPU shared, 2 intra-op threads made SFT ~10x slower (the
    # threads spin-wait on each other at every op), and a model this small gains little from them.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward passes")
    # task
    p.add_argument("--carry-slip", type=float, default=task.DEFAULT_CARRY_SLIP)
    p.add_argument("--random-noise", type=float, default=task.DEFAULT_RANDOM_NOISE)
    p.add_argument("--n-heldout", type=int, default=500)
    # model
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    # SFT
    p.add_argument("--sft-steps", type=int, default=2500)
    p.add_argument("--sft-batch", type=int, default=128)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-warmup", type=int, default=50)
    # sampling
    p.add_argument("--dpo-prompts", type=int, default=2048)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--pairs-per-prompt", type=int, default=1)
    # DPO
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--dpo-steps", type=int, default=150)
    p.add_argument("--dpo-batch", type=int, default=32)
    # evaluation
    p.add_argument("--sft-cache", default=None, help="save the SFT model here, or load it when present (for DPO sweeps)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt (KL, sampled score)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- tensors


def encode_pairs(tok, prompts, completions):
    """Right-padded [prompt | completion | eos] rows and a mask over the completion tokens."""
    rows, masks = [], []
    for p, c in zip(prompts, completions):
        p_ids = tok(p).input_ids  # BOS + prompt
        c_ids = tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(p_ids + c_ids)
        masks.append([0] * len(p_ids) + [1] * len(c_ids))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, loss_mask


def autocast(enabled):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def sequence_logps(model, ids, attn, loss_mask, bf16=False):
    """Summed log-prob of the completion tokens of each row: [B]."""
    with autocast(bf16):
        logits = model(input_ids=ids, attention_mask=attn).logits
    logits = logits[:, :-1].float()
    targets = ids[:, 1:]
    mask = loss_mask[:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


@torch.no_grad()
def generate(model, tok, prompts, n=1, temperature=1.0, batch=1024, bf16=False):
    """Completions (text, eos stripped) and their token lengths, n per prompt, prompt-major."""
    model.eval()
    texts, lengths = [], []
    expanded = [p for p in prompts for _ in range(n)]
    for i in range(0, len(expanded), batch):
        chunk = expanded[i : i + batch]
        enc = tok(chunk, return_tensors="pt", padding=True)
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        with autocast(bf16):
            out = model.generate(**enc, max_new_tokens=5, **kw)
        new = out[:, enc.input_ids.shape[1] :]
        for row in new.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            lengths.append(len(row))
            texts.append(tok.decode(row, skip_special_tokens=True))
    return texts, lengths


# --------------------------------------------------------------------------- stages


def sft(model, tok, demos, args, rng):
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / args.sft_warmup) * max(0.05, 1 - s / args.sft_steps),
    )
    model.train()
    order = []
    for step in range(args.sft_steps):
        if len(order) < args.sft_batch:
            order = list(range(len(demos)))
            rng.shuffle(order)
        idx, order = order[: args.sft_batch], order[args.sft_batch :]
        ids, attn, mask = encode_pairs(tok, [demos[i].prompt for i in idx], [demos[i].completion for i in idx])
        logp = sequence_logps(model, ids, attn, mask, args.bf16)
        loss = -logp.sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.sft_steps - 1:
            print(f"  sft step {step:5d} loss {loss.item():.4f}", flush=True)


def build_pairs(prompts, answers, samples, n, pairs_per_prompt, rng):
    """Verifier-labelled pairs: for each prompt with >=1 correct and >=1 wrong sample,
    up to ``pairs_per_prompt`` (correct, wrong) pairs, distinct completions preferred."""
    pairs = []
    for j, (p, a) in enumerate(zip(prompts, answers)):
        group = samples[j * n : (j + 1) * n]
        good = sorted({c for c in group if task.verify(c, a) == 1.0})
        bad = sorted({c for c in group if task.verify(c, a) == 0.0})
        if not good or not bad:
            continue
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        for g, b in combos[:pairs_per_prompt]:
            pairs.append((p, g, b))
    return pairs


def dpo(policy, ref, tok, pairs, args, rng):
    opt = torch.optim.AdamW(policy.parameters(), lr=args.dpo_lr, weight_decay=0.0)
    policy.train()
    # The reference is frozen: its log-probs are computed once per pair up front.
    p, c, r = zip(*pairs)
    with torch.no_grad():
        ref_c = torch.cat([sequence_logps(ref, *encode_pairs(tok, p[i : i + 512], c[i : i + 512]), args.bf16) for i in range(0, len(p), 512)])
        ref_r = torch.cat([sequence_logps(ref, *encode_pairs(tok, p[i : i + 512], r[i : i + 512]), args.bf16) for i in range(0, len(p), 512)])
    order = []
    for step in range(args.dpo_steps):
        if len(order) < args.dpo_batch:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        idx, order = order[: args.dpo_batch], order[args.dpo_batch :]
        # chosen and rejected in one forward pass
        ids, attn, mask = encode_pairs(tok, [p[i] for i in idx] * 2, [c[i] for i in idx] + [r[i] for i in idx])
        logps = sequence_logps(policy, ids, attn, mask, args.bf16)
        pc, pr = logps[: len(idx)], logps[len(idx) :]
        h = (pc - ref_c[idx]) - (pr - ref_r[idx])
        loss = -F.logsigmoid(args.beta * h).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.dpo_steps - 1:
            acc = (h > 0).float().mean().item()
            print(
                f"  dpo step {step:4d} loss {loss.item():.4f} acc {acc:.2f} margin {args.beta * h.mean().item():+.3f}"
                f" logp_c {pc.mean().item():.3f} logp_r {pr.mean().item():.3f}",
                flush=True,
            )


@torch.no_grad()
def evaluate(model, ref, tok, heldout, heldout_pairs, args):
    """Held-out greedy verifier score, sampled score, implicit-reward accuracy, KL, mean length."""
    prompts = [q.prompt for q in heldout]
    answers = [q.answer for q in heldout]
    greedy, g_len = generate(model, tok, prompts, n=1, temperature=0.0, bf16=args.bf16)
    g_score = sum(task.verify_batch(greedy, answers)) / len(answers)
    carry = [task.verify(c, a) for c, q, a in zip(greedy, heldout, answers) if q.carries]
    plain = [task.verify(c, a) for c, q, a in zip(greedy, heldout, answers) if not q.carries]
    fmt = sum(task.format_ok(c) for c in greedy) / len(greedy)
    torch.manual_seed(12345)
    n = args.eval_samples
    sampled, s_len = generate(model, tok, prompts, n=n, temperature=1.0, bf16=args.bf16)
    s_score = sum(task.verify_batch(sampled, [a for a in answers for _ in range(n)])) / len(sampled)
    # KL(pi || ref) estimated on the policy's own samples: E[log pi(y) - log ref(y)].
    sp = [p for p in prompts for _ in range(n)]
    lp = sequence_logps(model, *encode_pairs(tok, sp, sampled), args.bf16)
    lr = sequence_logps(ref, *encode_pairs(tok, sp, sampled), args.bf16)
    kl = (lp - lr).mean().item()
    # Implicit-reward accuracy on held-out verifier-labelled pairs (sampled from the SFT model).
    acc = float("nan")
    if heldout_pairs:
        p, c, r = zip(*heldout_pairs)
        h = (sequence_logps(model, *encode_pairs(tok, p, c), args.bf16) - sequence_logps(ref, *encode_pairs(tok, p, c), args.bf16)) - (
            sequence_logps(model, *encode_pairs(tok, p, r), args.bf16) - sequence_logps(ref, *encode_pairs(tok, p, r), args.bf16)
        )
        acc = (h > 0).float().mean().item()  # ties (h == 0, e.g. policy == ref) count as wrong
    return dict(
        greedy=g_score,
        greedy_carry=sum(carry) / max(1, len(carry)),
        greedy_nocarry=sum(plain) / max(1, len(plain)),
        format=fmt,
        sampled=s_score,
        reward_acc=acc,
        kl=kl,
        length=sum(s_len) / len(s_len),
    )


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("settings:", json.dumps(vars(args)), flush=True)
    times = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    tok = build_tokenizer()
    splits = task.make_splits(args.seed, n_heldout=args.n_heldout)
    demos = task.noisy_demonstrations(splits.train, seed=args.seed, carry_slip=args.carry_slip, random_noise=args.random_noise)
    model = build_model(tok, seed=args.seed, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads)
    n_params = sum(p.numel() for p in model.parameters())
    wrong = sum(not d.correct for d in demos) / len(demos)
    print(f"task: {len(splits.train)} train / {len(splits.heldout)} held-out problems; demos {wrong:.1%} wrong; "
          f"model {n_params / 1e3:.0f}k params; SFT ceiling (greedy) {task.best_possible_imitation(splits.heldout, args.carry_slip):.1%}")
    times["setup"] = time.perf_counter() - t

    t = time.perf_counter()
    if args.sft_cache and os.path.exists(args.sft_cache):
        model.load_state_dict(torch.load(args.sft_cache))
        print(f"  loaded SFT weights from {args.sft_cache}")
    else:
        sft(model, tok, demos, args, random.Random(args.seed))
        if args.sft_cache:
            torch.save(model.state_dict(), args.sft_cache)
    times["sft"] = time.perf_counter() - t
    ref = copy.deepcopy(model).eval()
    for prm in ref.parameters():
        prm.requires_grad_(False)

    t = time.perf_counter()
    torch.manual_seed(args.seed + 1000)
    dpo_problems = task.sample_problems(splits.train, args.dpo_prompts, seed=args.seed + 1)
    samples, _ = generate(model, tok, [q.prompt for q in dpo_problems], n=args.samples, temperature=args.temperature, bf16=args.bf16)
    pairs = build_pairs([q.prompt for q in dpo_problems], [q.answer for q in dpo_problems], samples, args.samples, args.pairs_per_prompt, random.Random(args.seed + 1))
    # held-out pairs for the implicit-reward accuracy, sampled the same way from held-out prompts
    h_samples, _ = generate(model, tok, [q.prompt for q in splits.heldout], n=args.samples, temperature=args.temperature, bf16=args.bf16)
    heldout_pairs = build_pairs([q.prompt for q in splits.heldout], [q.answer for q in splits.heldout], h_samples, args.samples, 1, random.Random(args.seed + 2))
    times["sample"] = time.perf_counter() - t
    sample_acc = sum(task.verify_batch(samples, [q.answer for q in dpo_problems for _ in range(args.samples)])) / len(samples)
    print(f"sampled {len(samples)} completions (T={args.temperature}), {sample_acc:.1%} correct -> {len(pairs)} train pairs "
          f"from {len({p for p, _, _ in pairs})} prompts; {len(heldout_pairs)} held-out pairs", flush=True)

    t = time.perf_counter()
    before = evaluate(model, ref, tok, splits.heldout, heldout_pairs, args)
    times["eval_sft"] = time.perf_counter() - t

    t = time.perf_counter()
    policy = copy.deepcopy(model)
    dpo(policy, ref, tok, pairs, args, random.Random(args.seed + 3))
    times["dpo"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate(policy, ref, tok, splits.heldout, heldout_pairs, args)
    times["eval_dpo"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all

    print("\nheld-out (%d problems)        SFT       DPO" % len(splits.heldout))
    for key, label, fmt in [
        ("greedy", "verifier score (greedy)", "{:.1%}"),
        ("greedy_carry", "  on carry problems", "{:.1%}"),
        ("greedy_nocarry", "  on no-carry problems", "{:.1%}"),
        ("sampled", "verifier score (T=1)", "{:.1%}"),
        ("format", "format ok (greedy)", "{:.1%}"),
        ("reward_acc", "implicit-reward accuracy", "{:.1%}"),
        ("kl", "KL to reference (nats)", "{:.3f}"),
        ("length", "mean length (tokens)", "{:.2f}"),
    ]:
        print(f"{label:28s} {fmt.format(before[key]):>8s}  {fmt.format(after[key]):>8s}")
    print("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print("RESULT " + json.dumps(dict(seed=args.seed, before=before, after=after, times=times, pairs=len(pairs))))


if __name__ == "__main__":
    main()
