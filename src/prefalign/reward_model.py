"""Reward models: a causal LM's body with a one-output score head, read at the last token.

The model is transformers' own `AutoModelForSequenceClassification` (num_labels=1), so what
`prefalign reward` saves loads anywhere with `from_pretrained` and scores the same: the score
of a sequence is the head's output at its rightmost token that is not config.pad_token_id
(transformers' pooling rule; batches are right-padded with that id, so padding never moves it).

A sequence is tokenized exactly as training tokenized it (prefalign.data.tokenize: prompt +
completion + EOS, truncation rules, chat template for conversational data). The settings that
decides are stored in the model's config.json under `prefalign_reward`, which also marks the
folder as a prefalign reward model for the `rm:PATH` reward spec.

RewardModelScorer (the `rm:PATH` reward) is the one scorer of text by a sequence classifier: a
prefalign reward model, tokenized as above, or any other transformers classifier (see its docstring).
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


def apply_lora(model, cfg):
    """LoRA on the body; the score head is new, so peft's SEQ_CLS task trains it in full (modules_to_save)."""
    torch.manual_seed(cfg.seed)
    return models.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                             task_type="SEQ_CLS")


def pad_id_of(model) -> int:
    return model.config.get_text_config().pad_token_id


def sequence_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """[N, labels] fp32 head outputs of token sequences, one right-padded forward (gradients flow
    when enabled). Right padding keeps every token at its natural position, and the pooled token
    (the rightmost that is not pad_token_id) where it is when the sequence is alone."""
    pad = pad_id_of(model)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        attn[r, :len(s)] = 1
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()


def sequence_scores(model, seqs: list[list[int]]) -> torch.Tensor:
    """[N] fp32 scores of a one-output reward model (the one `prefalign reward` trains)."""
    return sequence_logits(model, seqs)[:, 0]


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
# Scoring text: the `rm:PATH` reward, for any sequence classifier


def score_of(logits: torch.Tensor, label_index: int | None) -> torch.Tensor:
    """[N] scores from [N, labels] head outputs: the named label when one is given, else the one
    output, else with 2 labels the log-odds of "good" (label 1 over label 0)."""
    if label_index is not None:
        return logits[:, label_index]
    if logits.shape[-1] == 1:
        return logits[:, 0]
    return logits[:, 1] - logits[:, 0]


def check_label(num_labels: int, label_index: int | None, where: str) -> None:
    if label_index is None and num_labels > 2:
        raise UserError(f"{where} has {num_labels} labels: say which one is the score "
                        f"(rm:PATH#label=K as a reward spec, label_index=K in Python, K from 0 to {num_labels - 1})")
    if label_index is not None and not 0 <= label_index < num_labels:
        raise UserError(f"{where}: label {label_index} out of range; it has {num_labels} labels "
                        f"(0 to {num_labels - 1})")


class RewardModelScorer:
    """reward(prompts, completions) -> scores of a sequence classifier, batched by length, under no_grad.

    `settings` are those `prefalign reward` records (config.json, `prefalign_reward`): the text is
    then tokenized exactly as the training pairs were (prompt + completion + EOS, through the chat
    template when it trained on conversations). Without them (any other classifier), the text is
    the tokenizer's chat template over (user: prompt, assistant: completion) when it has one, else
    prompt + completion with the tokenizer's own special tokens, cut at `max_length` if given.
    The score: see score_of; a head of more than 2 labels needs `label_index`.
    """

    def __init__(self, model, tokenizer, settings: dict | None = None, batch_size: int = 16,
                 name: str = "reward_model", label_index: int | None = None, max_length: int | None = None):
        check_label(model.config.num_labels, label_index, "reward model")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.settings, self.label_index, self.max_length = settings, label_index, max_length
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = bool(settings.get("chat")) if settings is not None else has_template
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:  # the head pools the last token that is not pad: it must be set
            fallback = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            text_config.pad_token_id = model.config.pad_token_id = fallback or 0
        self.__name__ = name

    def tokenize(self, prompts: list[str], completions: list[str]) -> list[list[int]]:
        if self.settings is not None:
            return trained_tokens(self.tokenizer, self.settings, prompts, completions)
        return plain_tokens(self.tokenizer, self.chat, self.max_length, prompts, completions)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        if not len(completions):  # tokenizers fail on an empty batch
            return []
        seqs = self.tokenize(list(prompts), list(completions))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        scores = [0.0] * len(seqs)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            logits = sequence_logits(self.model, [seqs[i] for i in idx])
            for i, v in zip(idx, score_of(logits, self.label_index).tolist()):
                scores[i] = v
        return scores


def trained_tokens(tokenizer, settings: dict, prompts, completions) -> list[list[int]]:
    """The tokens `prefalign reward` trained on: prefalign.data.tokenize with the recorded settings."""
    from prefalign.data.formats import UnpairedExample
    from prefalign.data.tokenize import tokenize_examples

    chat = bool(settings.get("chat"))
    max_length = int(settings.get("max_length") or 1024)
    max_prompt_length = int(settings.get("max_prompt_length") or max_length // 2)

    def msg(role, text):
        return [{"role": role, "content": text}] if chat else text

    # A policy that stops at once generated "" (then EOS): score prompt + EOS, as it was generated,
    # instead of refusing the row (the data layer refuses an empty completion in a data file). A
    # placeholder keeps the row through tokenization; only its prompt ids are used.
    empty = [not c and not chat for c in completions]
    examples = [UnpairedExample(msg("user", p), msg("assistant", "." if e else c), True, "completion", i + 1)
                for i, (p, c, e) in enumerate(zip(prompts, completions, empty))]
    # Generated text may not split at the prompt boundary as the data did: score it anyway.
    items = tokenize_examples(examples, tokenizer, max_length, max_prompt_length,
                              allow_boundary_mismatch=True).items
    eos = tokenizer.eos_token_id
    return [it.prompt_ids + ([eos] if e else it.completion_ids) for it, e in zip(items, empty)]


def plain_tokens(tokenizer, chat: bool, max_length: int | None, prompts, completions) -> list[list[int]]:
    """Any other classifier's tokens: its chat template (which places its own special tokens), else
    prompt + completion with the tokenizer's special tokens, as such models are usually trained."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                               tokenize=False) for p, c in zip(prompts, completions)]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    return tokenizer(texts, add_special_tokens=not chat, truncation=max_length is not None,
                     max_length=max_length)["input_ids"]


def parse_spec(spec: str) -> tuple[str, int | None]:
    """`PATH` or `PATH#label=K` -> (PATH, K or None). A '#' not followed by an option stays in the path."""
    path, sep, option = spec.rpartition("#")
    if not sep or "=" not in option:
        return spec, None
    key, _, value = option.partition("=")
    if key.strip() != "label":
        raise UserError(f"reward model rm:{spec}: unknown option {key.strip()!r} (the one option is #label=K)")
    try:
        return path, int(value)
    except ValueError:
        raise UserError(f"reward model rm:{spec}: #label= takes a label number, got {value!r}") from None


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def load_scorer(spec: str, batch_size: int = 16) -> RewardModelScorer:
    """The `rm:PATH[#label=K]` reward: a folder written by `prefalign reward` (OUTPUT/model), or any
    transformers sequence-classification model folder (config.json, weights, tokenizer)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path, label_index = parse_spec(spec)
    where = f"reward model rm:{path}"
    folder = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        found = "no such directory" if not os.path.isdir(folder) else "no config.json in it"
        raise UserError(f"{where}: {found}; give the model folder `prefalign reward` wrote (OUTPUT/model) "
                        f"or a sequence-classification model's folder")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: unreadable config.json ({str(e).splitlines()[0][:120]})") from None
    settings = getattr(config, CONFIG_KEY, None)
    settings = settings if isinstance(settings, dict) and config.num_labels == 1 else None
    if settings is None and not is_classifier(config):
        kind = ", ".join(config.architectures or []) or config.model_type
        raise UserError(f"{where}: not a reward model ({kind}); train one with `prefalign reward` and give "
                        f"its OUTPUT/model, or give an AutoModelForSequenceClassification folder")
    check_label(config.num_labels, label_index, where)
    tokenizer = models.load_tokenizer(folder) if settings is not None else plain_tokenizer(folder, where)
    try:
        with models.quiet_third_party():
            model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: could not load it ({str(e).splitlines()[0][:120]})") from None
    if torch.cuda.is_available():  # beside the policy being trained, not on the host
        model.to("cuda")
    # Positions beyond the model's reach would fail (or mean nothing): cut there.
    reach = getattr(config.get_text_config(), "max_position_embeddings", None)
    return RewardModelScorer(model, tokenizer, settings, batch_size, name=f"rm:{spec}",
                             label_index=label_index, max_length=reach)


def plain_tokenizer(folder: str, where: str):
    """Any classifier's tokenizer as it is: no EOS needed (prompt + completion gets none appended)."""
    from transformers import AutoTokenizer

    try:
        with models.quiet_third_party():
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: could not load its tokenizer ({str(e).splitlines()[0][:120]})") from None
