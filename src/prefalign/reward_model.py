"""Reward models: a causal LM's body with a one-output score head, read at the last token.

The model is transformers' own `AutoModelForSequenceClassification` (num_labels=1), so what
`prefalign reward` saves loads anywhere with `from_pretrained` and scores the same: the score
of a sequence is the head's output at its rightmost token that is not config.pad_token_id
(transformers' pooling rule; batches are right-padded with that id, so padding never moves it).

A sequence is tokenized exactly as training tokenized it (prefalign.data.tokenize: prompt +
completion + EOS, truncation rules, chat template for conversational data). The settings that
decides are stored in the model's config.json under `prefalign_reward`, which also marks the
folder as a prefalign reward model for the `rm:PATH` reward spec.
"""

from __future__ import annotations

import copy
import math
import os

import torch

from prefalign import models
from prefalign.errors import UserError

CONFIG_KEY = "prefalign_reward"  # config.json: {"chat", "max_length", "max_prompt_length"}


def from_causal_lm(lm, pad_id: int, seed: int):
    """A sequence-classification model sharing `lm`'s body (the same modules, not a copy), with a
    new score head. The head starts small, N(0, 1/(hidden+1)) (lm-human-preferences, TRL), so the
    first scores are near 0 and the first loss near ln 2, whatever the body's scale."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = 1, pad_id
    config.architectures = None
    config.use_cache = False
    try:
        with torch.device("meta"):  # nothing allocated: the body is lm's, the head is made below
            rm = AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:
        raise UserError(f"{type(lm).__name__}: no sequence-classification (reward) variant of this "
                        f"architecture in transformers ({str(e).splitlines()[0][:120]})") from None
    prefix = lm.base_model_prefix
    if rm.base_model_prefix != prefix or not hasattr(lm, prefix):
        raise UserError(f"{type(lm).__name__}: cannot find its body ({prefix!r}) to put a score head on")
    setattr(rm, prefix, getattr(lm, prefix))
    heads = [n for n, _ in rm.named_children() if n != prefix]
    for name in heads:
        old = getattr(rm, name)
        if not isinstance(old, torch.nn.Linear):
            raise UserError(f"{type(rm).__name__}: its head {name!r} is not a linear layer; not supported")
        setattr(rm, name, _score_head(old.in_features, old.bias is not None, seed))
    device = next(getattr(lm, prefix).parameters()).device
    return rm.to(device)


def _score_head(hidden: int, bias: bool, seed: int) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, 1, bias=bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a private generator: building the model does not move the caller's RNG
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden + 1))
        if bias:
            head.bias.zero_()
    return head


def build(model_source, tokenizer, seed: int, trust_remote_code: bool = False):
    """The reward model to train: from a causal LM path / hub id, or an in-process causal LM."""
    lm = model_source
    if isinstance(model_source, str):
        lm = models.load_model(model_source, trust_remote_code=trust_remote_code)
    models.check_vocab(tokenizer, lm, model_source if isinstance(model_source, str) else "")
    return from_causal_lm(lm, tokenizer.pad_token_id, seed)


def apply_lora(model, cfg):
    """LoRA on the body; the score head is new, so peft's SEQ_CLS task trains it in full (modules_to_save)."""
    torch.manual_seed(cfg.seed)
    return models.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                             task_type="SEQ_CLS")


def pad_id_of(model) -> int:
    return model.config.get_text_config().pad_token_id


def sequence_scores(model, seqs: list[list[int]]) -> torch.Tensor:
    """[N] fp32 scores of token sequences, one right-padded forward (gradients flow when enabled)."""
    pad = pad_id_of(model)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        attn[r, :len(s)] = 1
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, 0].float()


def pair_scores(model, items) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) of tokenized pairs, in one forward."""
    seqs = [it.prompt_ids + it.chosen_ids for it in items] + [it.prompt_ids + it.rejected_ids for it in items]
    scores = sequence_scores(model, seqs)
    return scores[:len(items)], scores[len(items):]


def final_model(model):
    """The plain transformers model to save: LoRA merged into the body, so from_pretrained loads it."""
    if models.is_peft(model):
        return copy.deepcopy(model).merge_and_unload()
    return model


def save(model, tokenizer, path: str, settings: dict) -> None:
    """HF format (AutoModelForSequenceClassification), with the tokenization settings in config.json."""
    final = final_model(model)
    setattr(final.config, CONFIG_KEY, settings)
    final.config.architectures = [type(final).__name__]
    models.save_model(final, tokenizer, path)


# ----------------------------------------------------------------------------------------------
# Scoring text: the `rm:PATH` reward


class RewardModelScorer:
    """reward(prompts, completions) -> scores of a trained reward model, batched, under no_grad.

    The text is tokenized as the reward model's training data was: a plain prompt + completion,
    or, when it trained on conversations, (user: prompt, assistant: completion) through its
    tokenizer's chat template."""

    def __init__(self, model, tokenizer, settings: dict, batch_size: int = 16, name: str = "reward_model"):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.chat = bool(settings.get("chat"))
        self.max_length = int(settings.get("max_length") or 1024)
        self.max_prompt_length = int(settings.get("max_prompt_length") or self.max_length // 2)
        self.__name__ = name

    def tokenize(self, prompts: list[str], completions: list[str]) -> list[list[int]]:
        from prefalign.data.formats import UnpairedExample
        from prefalign.data.tokenize import tokenize_examples

        def msg(role, text):
            return [{"role": role, "content": text}] if self.chat else text

        # A policy that stops at once generated "" (then EOS): score prompt + EOS, as it was generated,
        # instead of refusing the row (the data layer refuses an empty completion in a data file). A
        # placeholder keeps the row through tokenization; only its prompt ids are used.
        empty = [not c and not self.chat for c in completions]
        examples = [UnpairedExample(msg("user", p), msg("assistant", "." if e else c), True, "completion", i + 1)
                    for i, (p, c, e) in enumerate(zip(prompts, completions, empty))]
        # Generated text may not split at the prompt boundary as the data did: score it anyway.
        items = tokenize_examples(examples, self.tokenizer, self.max_length, self.max_prompt_length,
                                  allow_boundary_mismatch=True).items
        eos = self.tokenizer.eos_token_id
        return [it.prompt_ids + ([eos] if e else it.completion_ids) for it, e in zip(items, empty)]

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        seqs = self.tokenize(list(prompts), list(completions))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        scores = [0.0] * len(seqs)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            for i, v in zip(idx, sequence_scores(self.model, [seqs[i] for i in idx]).tolist()):
                scores[i] = v
        return scores


def load_scorer(path: str, batch_size: int = 16) -> RewardModelScorer:
    """The `rm:PATH` reward: a folder written by `prefalign reward` (OUTPUT/model)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    where = f"reward model rm:{path}"
    folder = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        found = "no such directory" if not os.path.isdir(folder) else "no config.json in it"
        raise UserError(f"{where}: {found}; give the model folder `prefalign reward` wrote (OUTPUT/model)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: unreadable config.json ({str(e).splitlines()[0][:120]})") from None
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict) or getattr(config, "num_labels", None) != 1:
        kind = ", ".join(config.architectures or []) or config.model_type
        raise UserError(f"{where}: not a reward model ({kind}); train one with `prefalign reward` and give "
                        f"its OUTPUT/model")
    tokenizer = models.load_tokenizer(folder)
    try:
        with models.quiet_third_party():
            model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: could not load it ({str(e).splitlines()[0][:120]})") from None
    if torch.cuda.is_available():  # beside the policy being trained, not on the host
        model.to("cuda")
    return RewardModelScorer(model, tokenizer, settings, batch_size, name=f"rm:{path}")
