"""Padded batches: the plain layout every model accepts (packing lives in data.packing).

Right padding; labels hold the token id where a completion token is scored and -100 on the
prompt and on padding, so logprobs.sequence_logps scores exactly the completion.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE = -100  # the label of a position that is not scored (the PyTorch / HF convention)


class PaddedBatch(NamedTuple):
    input_ids: torch.Tensor       # [N, T] long
    attention_mask: torch.Tensor  # [N, T] long, 1 on real tokens
    labels: torch.Tensor          # [N, T] long, IGNORE on prompt and padding


def pad_sequences(prompt_ids_list, completion_ids_list, pad_id: int) -> PaddedBatch:
    """One row per (prompt, completion): [prompt | completion | pad...]. For SFT, KTO and GRPO."""
    if len(prompt_ids_list) != len(completion_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(completion_ids_list)} completions")
    if not prompt_ids_list:
        raise ValueError("empty batch")
    width = max(len(p) + len(c) for p, c in zip(prompt_ids_list, completion_ids_list))
    n = len(prompt_ids_list)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompt_ids_list, completion_ids_list)):
        length = len(prompt) + len(completion)
        input_ids[i, :length] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[i, :length] = 1
        labels[i, len(prompt):length] = input_ids[i, len(prompt):length]
    return PaddedBatch(input_ids, attention_mask, labels)


def pad_pairs(pairs, pad_id: int) -> PaddedBatch:
    """2B rows for B TokenizedPairs: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected,
    so the losses can split the log-probs with [:B] and [B:]."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return pad_sequences(prompts, completions, pad_id)
