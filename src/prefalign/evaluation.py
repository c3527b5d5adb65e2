"""Held-out evaluation, the one path `prefalign eval`, the trainer's eval, the demo, compare and the
experiments use: implicit-reward accuracy, margins and log-probs on pairs (pair_metrics,
pair_logratios), the KL to the reference measured on the policy's OWN samples (sampled_kl), and
the reward/verifier score, length and degenerate share of its generations (generation_metrics).

KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)]: we sample y from the policy and
average the summed log-ratio; the pairs' log-ratio (logged during training) is not a KL.
"""

from __future__ import annotations

import os

import torch

from prefalign import objective, prepare


@torch.no_grad()
def pair_metrics(s: prepare.Setup, cfg, ac, items=None, batch_size: int | None = None) -> dict:
    """Loss, reward accuracy/margins and log-probs of `items` (default: the eval items)."""
    from prefalign.train import _normalise, micro_step

    items = s.eval_items if items is None else items
    bs = batch_size or cfg.batch_size
    was_training = s.policy.training
    s.policy.eval()
    sums: dict = {}
    loss_total = 0.0
    for i in range(0, len(items), bs):
        loss, m = micro_step(s, cfg, items[i:i + bs], ac)
        loss_total += float(loss)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    s.policy.train(was_training)
    kto = s.spec is not None and s.spec.kind == "unpaired"
    out = _normalise(sums, len(items), kto)
    if s.spec is None:
        out["loss"] = loss_total / max(1, objective.scored_tokens(items))  # as training divides
    else:
        out["loss"] = loss_total / len(items)
    return out


@torch.no_grad()
def policy_pair_logps(s: prepare.Setup, cfg, ac, items, batch_size: int | None = None) -> objective.PairLogps:
    """Each pair's summed chosen/rejected log-probs and token counts under the policy (eval
    mode, no gradient), on the CPU: per-pair scores for statistics over a fixed set."""
    from prefalign.train import _logp_kw

    bs = batch_size or cfg.batch_size
    was_training = s.policy.training
    s.policy.eval()
    try:
        parts = []
        for i in range(0, len(items), bs):
            with ac():
                parts.append(objective.pair_logps(s.policy, items[i:i + bs], **_logp_kw(s, cfg)))
    finally:
        s.policy.train(was_training)
    return objective.PairLogps(*(torch.cat([getattr(p, f).float().cpu() for p in parts])
                                 for f in objective.PairLogps._fields))


@torch.no_grad()
def sampled_kl(policy, reference, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 64,
               temperature: float = 1.0, seed: int = 0, batch_size: int = 16) -> dict:
    """KL(pi || ref) on samples of the policy, with their mean length.

    `reference` is a prefalign.reference.Reference (copy or adapters-off)."""
    from prefalign.sampling import SamplingConfig, generate

    kls, lengths = [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        gen = generate(policy, tokenizer, batch, SamplingConfig(max_new_tokens=max_new_tokens,
                                                                 temperature=temperature, seed=seed + i))
        comps = [list(c) for c in gen.token_ids]
        pol = objective.completion_logps(policy, batch, comps, pad_id=tokenizer.pad_token_id, chunk_size=0)
        ref = reference.completion_logps(batch, comps)
        kls.append(pol.sum.float() - ref.sum.float().to(pol.sum.device))
        lengths.append(pol.count.float())
    kl = torch.cat(kls)
    return {"kl/sampled": kl.mean().item(), "kl/sampled_std": kl.std().item() if len(kl) > 1 else 0.0,
            "lengths/sampled": torch.cat(lengths).mean().item()}


@torch.no_grad()
def pair_logratios(model, ref_model, tokenizer, pairs_file: str, *, max_length: int, batch_size: int = 256):
    """Per pair of `pairs_file`: (chosen log-ratio, rejected log-ratio) of model vs ref_model, summed
    over tokens. Their difference is the implicit-reward margin up to beta, so (rw > rl).mean() is the
    preference accuracy at any beta (0 for the reference itself)."""
    from prefalign.data.formats import load_examples
    from prefalign.data.tokenize import tokenize_examples

    items = tokenize_examples(load_examples(pairs_file, kind="paired").examples, tokenizer, max_length=max_length).items
    was = model.training
    model.eval()
    rw, rl = [], []
    kw = dict(pad_id=tokenizer.pad_token_id, chunk_size=0)
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        prompts = [it.prompt_ids for it in batch]
        for comps, acc in (([it.chosen_ids for it in batch], rw), ([it.rejected_ids for it in batch], rl)):
            acc.append(objective.completion_logps(model, prompts, comps, **kw).sum
                       - objective.completion_logps(ref_model, prompts, comps, **kw).sum)
    model.train(was)
    return torch.cat(rw), torch.cat(rl)


@torch.no_grad()
def generation_metrics(policy, tokenizer, prompts: list[list[int]], score, *, max_new_tokens: int, seed: int = 0,
                       reference_model=None, well_formed=None, batch_size: int = 256) -> dict:
    """What the policy's completions of held-out `prompts` (token ids) are worth.

    score: completion texts (in prompt order) -> one reward each (a verifier, a reward model).
    Returns score (mean over greedy completions), score_sampled (one sample each at temperature 1,
    seed + 1), length (mean greedy completion tokens); with `reference_model`, kl = KL(policy ||
    reference) on the policy's samples (seed + 2); with `well_formed` (text -> bool), the degenerate
    shares of the greedy completions: malformed (not well formed) and run_on (stopped by the token
    limit, no end-of-sequence)."""
    from prefalign.sampling import SamplingConfig, generate
    from prefalign.reference import ModelReference

    was = policy.training
    policy.eval()
    try:
        greedy = generate(policy, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0))
        sampled = generate(policy, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, seed=seed + 1))
        n = len(prompts)
        out = {"score": sum(score(greedy.texts)) / n, "score_sampled": sum(score(sampled.texts)) / n,
               "length": greedy.num_tokens / n}
        if reference_model is not None:
            ref = ModelReference(reference_model, pad_id=tokenizer.pad_token_id, packing=False, token_budget=0,
                                 chunk_size=0)
            out["kl"] = sampled_kl(policy, ref, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed + 2,
                                   batch_size=batch_size)["kl/sampled"]
        if well_formed is not None:
            out["malformed"] = sum(not well_formed(t) for t in greedy.texts) / n
            out["run_on"] = sum(r == "length" for r in greedy.finish_reasons) / n
    finally:
        policy.train(was)
    return out


def run_eval(args, *, model=None, tokenizer=None, ref_model=None) -> dict:
    """`prefalign eval`: held-out metrics of a trained model against its reference. Pairs: the dpo
    loss, implicit-reward accuracy (chosen above rejected) and margins. KTO rows (prompt, completion,
    label): the kto loss, rewards/accuracies = share of rows whose implicit reward beta * (log pi -
    log ref) has the label's sign (> 0 desirable, < 0 undesirable), rewards/chosen and /rejected =
    mean reward of the desirable and undesirable rows, margins their difference, kl the KTO baseline.
    Model objects, when given, stand in for the paths (prefalign.evaluate, the Python API)."""
    import json

    from prefalign import config, report
    from prefalign.data.formats import load_examples
    from prefalign.errors import UserError

    if not args.ref_model and ref_model is None:
        raise UserError("eval needs --ref-model: the implicit reward and the KL are measured against it")
    # KTO data (prompt, completion, label) is scored with the kto loss; pairs with dpo.
    unpaired = load_examples(args.data, kind="auto").kind == "unpaired"
    cfg = config.build({"model": args.model, "ref_model": args.ref_model or "", "data": args.data,
                        "tokenizer": getattr(args, "tokenizer", None) or "", "loss": "kto" if unpaired else "dpo",
                        "beta": args.beta, "reference": "copy", "batch_size": args.batch_size,
                        "max_length": args.max_length, "progress": False}, where="eval")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = prepare.build(cfg, device=device, model=model, tokenizer=tokenizer, ref_model=ref_model)
    ac = prepare.autocast(cfg, device)
    out = pair_metrics(s, cfg, ac, items=s.items)
    results = {"examples" if unpaired else "pairs": len(s.items),
               **{k: v for k, v in out.items() if not k.startswith("nll")}}
    if unpaired:
        results["rewards/accuracies"] = results.pop("accuracy/reward_sign")
    if args.samples:
        prompts = [it.prompt_ids for it in s.items[:args.samples]]
        results.update(sampled_kl(s.policy, s.reference, s.tokenizer, prompts, max_new_tokens=args.max_new_tokens))
    if not getattr(args, "quiet", False):
        report.print_table([{"metric": k, "value": v} for k, v in results.items()], title=f"eval {args.model}")
    if getattr(args, "json", None):
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


