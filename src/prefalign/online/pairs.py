"""Preference pairs from scored samples: the bridge from an online round to DPO.

    rows = build_pairs(prompts, completions, rewards, group_size=8, min_gap=0.5)
    write_jsonl("round-1/pairs.jsonl", rows)      # (prefalign.metrics) what `prefalign train --data` reads

Samples come grouped by prompt (row i * G + g is sample g of prompt i, as `prefalign.sampling`
returns them). Within a group, completions are ranked by reward; pair k is the k-th best
against the k-th worst, kept only when their reward gap is at least `min_gap` and the two
texts differ. With pairs_per_prompt=1 this is the usual "best vs worst" of iterative DPO
(Xiong et al. 2024, Dong et al. 2024); with more, the next pairs reuse no completion.

Why a minimum gap: two samples whose rewards are nearly equal carry almost no preference
signal, and for a noisy reward (a reward model, a judge) their order is mostly noise; DPO
would learn that noise with the same weight as a clear preference.

Ties in reward are broken by the first occurrence (a stable sort), and exact duplicate texts
count once, so the result is a pure function of its inputs. Blank completions (a sample that
is EOS at once) are left out: the preference-data reader refuses blank texts, so a pair with
one could not be trained on.
"""

from __future__ import annotations

import json


def build_pairs(
    prompts: list,
    completions: list[str],
    rewards: list[float],
    group_size: int,
    min_gap: float = 0.0,
    pairs_per_prompt: int = 1,
    extra: dict[str, list] | None = None,
) -> list[dict]:
    """Pairs {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", **extra} per group.

    prompts      [P] one per group (or [P*G], one per sample: the first of each group is used)
    completions  [P*G] texts, grouped by prompt
    rewards      [P*G] their scores
    min_gap      keep a pair only when chosen_reward - rejected_reward >= min_gap (and > 0)
    extra        per-prompt columns ([P]) copied into each of that prompt's pairs (e.g. answer)
    """
    n = len(completions)
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} completions are not groups of {group_size}")
    if len(rewards) != n:
        raise ValueError(f"{len(rewards)} rewards for {n} completions")
    P = n // group_size
    if len(prompts) == n and group_size > 1:
        prompts = prompts[::group_size]
    if len(prompts) != P:
        raise ValueError(f"{len(prompts)} prompts for {P} groups")
    extra = extra or {}
    rows = []
    for i in range(P):
        lo = i * group_size
        # Unique texts, each with the reward of its first occurrence, best first (stable).
        seen: dict[str, float] = {}
        for c, r in zip(completions[lo:lo + group_size], rewards[lo:lo + group_size]):
            if c.strip():
                seen.setdefault(c, float(r))
        ranked = sorted(seen.items(), key=lambda kv: -kv[1])   # [(text, reward)] best first
        for k in range(min(pairs_per_prompt, len(ranked) // 2)):
            (good, rg), (bad, rb) = ranked[k], ranked[len(ranked) - 1 - k]
            gap = rg - rb
            if gap <= 0 or gap < min_gap:
                break  # the next pairs are closer still
            row = {"prompt": prompts[i], "chosen": good, "rejected": bad,
                   "chosen_reward": rg, "rejected_reward": rb}
            row.update({k_: v[i] for k_, v in extra.items()})
            rows.append(row)
    return rows


def read_pairs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
