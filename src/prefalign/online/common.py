"""The pieces shared by the online loops (grpo, iterative, compare): prompts, rewards, per-token
log-probs of completions, the policy, the run directory and its plots.

Models load as `prefalign train` loads them (prefalign.prepare: tokenizer, attention, trust
settings, vocabulary check); the output directory is held and checked as train's is
(prefalign.rundir: OUTPUT/.lock, no other tool's files or other run overwritten without
--overwrite); the run's settings go to OUTPUT/config.yaml, which rundir recognises as a run.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from prefalign import fields, logprobs, prepare, rundir
from prefalign.data.batching import pad_sequences
from prefalign.errors import UserError
from prefalign.online.rewards import CombinedReward, combine, load_reward


@dataclass
class PromptSet:
    """Tokenized prompts with what reward functions see: the text and the extra columns."""

    ids: list[list[int]]            # [N] prompt token ids (from data.tokenize, BOS included)
    texts: list[str]                # [N] the prompt as reward functions get it (a chat prompt: its last message)
    extra: dict                     # column -> [N] values (e.g. "answer")
    raw: list                       # [N] the prompt as given (text or chat messages), for pairs files

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, idx: list[int], repeat: int = 1) -> tuple[list, list, dict]:
        """(ids [n], texts [n * repeat], extra columns [n * repeat]) of the rows idx, each text and
        column value repeated `repeat` times (one per sample of a group)."""
        rep = [i for i in idx for _ in range(repeat)]
        return ([self.ids[i] for i in idx], [self.texts[i] for i in rep],
                {k: [v[i] for i in rep] for k, v in self.extra.items()})


def load_prompts(source, tokenizer, max_prompt_length: int = 512) -> PromptSet:
    """A PromptSet from a file path, a list of strings, or a list of dicts with a `prompt` key."""
    from prefalign.data.formats import PromptExample, load_examples
    from prefalign.data.tokenize import tokenize_examples

    if isinstance(source, str):
        if not source:
            raise UserError("no prompts given (--prompts)")
        examples = load_examples(source, kind="prompt").examples
    else:
        examples = []
        for i, row in enumerate(source):
            row = {"prompt": row} if isinstance(row, str) else dict(row)
            if "prompt" not in row:
                raise UserError(f"prompt row {i + 1}: no 'prompt' field")
            examples.append(PromptExample(row.pop("prompt"), "prompts", i + 1, row))
    if not examples:
        raise UserError("no prompts")
    # One place tokenizes data: prompts get exactly the tokens DPO training will see.
    items = tokenize_examples(examples, tokenizer, max_length=max_prompt_length + 1,
                              max_prompt_length=max_prompt_length).items
    texts = [ex.prompt if isinstance(ex.prompt, str) else ex.prompt[-1]["content"] for ex in examples]
    keys = sorted({k for it in items for k in it.extra})
    extra = {k: [it.extra.get(k) for it in items] for k in keys}
    return PromptSet([it.prompt_ids for it in items], texts, extra, [ex.prompt for ex in examples])


def prompt_set(prompts, default: str, tokenizer, max_prompt_length: int) -> PromptSet:
    """`prompts` as a PromptSet: one already built, rows or a path; None: the config's path `default`."""
    if isinstance(prompts, PromptSet):
        return prompts
    return load_prompts(prompts if prompts is not None else default, tokenizer, max_prompt_length)


def make_reward(reward, weights=None) -> CombinedReward:
    """A checked reward from specs, functions, Reward objects or a CombinedReward."""
    if isinstance(reward, CombinedReward):
        return reward
    if isinstance(reward, str) or callable(reward):
        reward = [reward]
    if not reward:
        raise UserError("no reward function given (--reward)")
    return combine([load_reward(r) if isinstance(r, str) else r for r in reward], weights or None)


def completion_token_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                           pad_id: int, chunk_size: int = 0, temperature: float = 1.0,
                           packing: bool = False, token_budget: int = 0):
    """Per-token log-probs of each completion token: (logps [B, Tc] fp32, mask [B, Tc]).

    logps[i, j] = log pi(completion_i[j] | prompt_i, completion_i[:j]) with logits / temperature.
    packing: completions sharing a prompt are branches of one packed segment (data.packing);
    otherwise rows are [prompt | completion | pad] (right padding: natural positions). Either
    way only completion positions reach the head, through the chunked log-prob function.
    """
    if packing:
        from prefalign.data.packing import pack_groups, packed_token_logps

        try:
            packed = pack_groups(prompt_ids, completion_ids, token_budget)
        except ValueError as e:  # a group longer than token_budget
            raise UserError(f"grpo: {e}") from None
        return packed_token_logps(model, packed, chunk_size or None, temperature)
    batch = pad_sequences(prompt_ids, completion_ids, pad_id)
    device = next(model.parameters()).device
    lp, _ = logprobs.labelled_logps(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                    batch.labels.to(device), chunk_size or None, temperature)  # [N]
    lengths = torch.tensor([len(c) for c in completion_ids], device=device)
    mask = torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]           # [B, Tc]
    # labelled_logps returns row-major order, that of `mask`: each row's completion in order.
    return lp.new_zeros(mask.shape).masked_scatter(mask, lp), mask


def load_policy(cfg, model=None, tokenizer=None, qlora: bool = False):
    """(model, tokenizer) from objects or from cfg.model / cfg.tokenizer, loaded as `prefalign train`
    loads them (prepare.load_tokenizer / load_model: attention, trust_remote_code, vocabulary check)."""
    tokenizer = prepare.load_tokenizer(cfg, model, tokenizer)
    return prepare.load_model(cfg, tokenizer, model, qlora=qlora), tokenizer


def initial_reference(cfg, policy, tok, ref_model, device):
    """The KL term's reference: ref_model (object or cfg.ref_model path, loaded as the policy is) if
    given; else the initial policy: a LoRA policy itself, run with its adapters off (no second copy;
    see reference_mode), or a frozen copy."""
    from prefalign.models import freeze, is_peft

    if ref_model is not None or cfg.ref_model:
        return freeze(prepare.load_model(cfg, tok, ref_model, cfg.ref_model)).to(device)
    if is_peft(policy):
        return policy
    return freeze(copy.deepcopy(policy)).to(device)


@contextlib.contextmanager
def reference_mode(ref, policy):
    """The reference forward: no autograd, no dropout; a LoRA policy that is its own reference runs
    with its adapters off (the base model: the initial policy)."""
    was_training = ref.training
    ref.eval()
    try:
        with torch.no_grad(), (ref.disable_adapter() if ref is policy else contextlib.nullcontext()):
            yield
    finally:
        ref.train(was_training)


@contextlib.contextmanager
def claimed(cfg):
    """Hold cfg.output for the run as `prefalign train` does (rundir.claim: OUTPUT/.lock, a directory
    with another tool's files or another run refused without cfg.overwrite). Online runs never resume."""
    with rundir.claim(SimpleNamespace(output=cfg.output, overwrite=cfg.overwrite, resume="")):
        yield


def begin(output: str, cfg) -> None:
    """The run's inputs loaded: it takes over the directory (the replaced run's outputs go) and
    records its settings in OUTPUT/config.yaml."""
    rundir.begin(output, replace=True)
    write_config(output, cfg)


def write_config(output: str, cfg) -> None:
    """OUTPUT/config.yaml: every setting of the run (rundir reads it as "a prefalign run is here")."""
    from prefalign.yamlio import dumps

    with open(os.path.join(output, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dumps(_plain(fields.as_dict(cfg))))


def _plain(value):
    """YAML-safe values (a tuple or another object as its list or text)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def plot_run(output: str, history: list[dict], panels: list[tuple[str, list[str]]]) -> list[str]:
    """PNG plots of an online run under OUTPUT/plots (one per panel that has data)."""
    from prefalign.report import plot_series

    if not history:
        return []
    os.makedirs(os.path.join(output, "plots"), exist_ok=True)
    written = []
    for name, keys in panels:
        path = os.path.join(output, "plots", f"{name}.png")
        if plot_series(path, history, keys, name):
            written.append(path)
    return written
