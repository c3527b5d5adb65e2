"""Model-based rewards: a reward model (sequence classifier) and a pairwise LM judge.

    rm = RewardModel(model, tokenizer)         # a reward function itself: the value at the last token
    judge = PairwiseJudge(model, tokenizer)    # P(A better than B) from both orders; judge.as_reward()

The function rewards, their checks and the loader are in online.rewards.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from prefalign.errors import UserError
from prefalign.online.rewards import RewardFn


# ----------------------------------------------------------------------------------------------
# Reward model


def _device(model):
    return next(model.parameters()).device


class RewardModel:
    """Scores from an `AutoModelForSequenceClassification` (the value at the last token).

    score = logits[:, 0] when the head has 1 label, logits[:, 1] - logits[:, 0] (the log-odds of
    "good") when it has 2, logits[:, label_index] otherwise. The text is the tokenizer's chat
    template over (user: prompt, assistant: completion) when it has one, else prompt + completion.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 label_index: int | None = None, use_chat_template: bool | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        n_labels = model.config.num_labels
        if label_index is None and n_labels > 2:
            raise UserError(f"reward model has {n_labels} labels: say which one is the score (label_index)")
        self.label_index = label_index
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        # HF's classification head pools the last token that is not pad_token_id: it must be set.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_id
        self.pad_id = model.config.pad_token_id
        self.__name__ = "reward_model"

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "RewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path)
        except OSError as e:
            raise UserError(f"reward model {path!r} could not be loaded: {e}") from e
        return cls(model, tok, **kwargs)

    def _text(self, prompt: str, completion: str) -> str:
        if self.use_chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return prompt + completion

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        enc = self.tokenizer(texts, add_special_tokens=not self.use_chat_template,
                             truncation=self.max_length is not None, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # similar lengths share a batch
        scores = [0.0] * len(enc)
        device = _device(self.model)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            L = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), L), self.pad_id, dtype=torch.long)  # right padding: natural positions
            attn = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(enc[i])] = torch.tensor(enc[i])
                attn[r, :len(enc[i])] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()  # [b, labels]
            if self.label_index is not None:
                s_ = logits[:, self.label_index]
            elif logits.shape[-1] == 1:
                s_ = logits[:, 0]
            else:
                s_ = logits[:, 1] - logits[:, 0]
            for r, i in enumerate(idx):
                scores[i] = float(s_[r])
        return scores


# ----------------------------------------------------------------------------------------------
# Pairwise LM judge (AI feedback)


DEFAULT_RUBRIC = """You are comparing two responses to the same prompt. \
The better response is correct, helpful and concise.

Prompt:
{prompt}

Response A:
{a}

Response B:
{b}

Which response is better? Answer with one letter, A or B.
Answer:"""


class JudgeVerdict(NamedTuple):
    prob: list[float]     # [N] P(first better), averaged over both presentation orders
    prob_ab: list[float]  # [N] P(first better) when shown as A
    prob_ba: list[float]  # [N] P(first better) when shown as B
    # position bias of the judge: mean(prob_ab) - mean(prob_ba) (0 for an unbiased judge)


class PairwiseJudge:
    """An LM asked which of two completions is better, read from its next-token log-probs.

    For order (x shown as A, y as B): p_ab = sigmoid(logit("A") - logit("B")) = P(A) / (P(A) + P(B)).
    The pair is also shown swapped: p_ba = sigmoid(logit("B") - logit("A")) with y as A.
    P(x better than y) = (p_ab + p_ba) / 2, so a judge that always prefers the first slot scores
    0.5, and P(x > y) + P(y > x) = 1 exactly.
    """

    def __init__(self, model, tokenizer, rubric: str = DEFAULT_RUBRIC, batch_size: int = 8,
                 use_chat_template: bool | None = None):
        for key in ("{prompt}", "{a}", "{b}"):
            if key not in rubric:
                raise UserError(f"judge rubric must contain {key} (it has the placeholders {{prompt}}, {{a}}, {{b}})")
        self.model, self.tokenizer, self.rubric, self.batch_size = model.eval(), tokenizer, rubric, batch_size
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
        # After "Answer:" the letter comes with a space; after a chat template's assistant header, without.
        variants = ("A", " A") if self.use_chat_template else (" A", "A")
        self.label_ids = None
        for v in variants:
            a = tokenizer.encode(v, add_special_tokens=False)
            b = tokenizer.encode(v.replace("A", "B"), add_special_tokens=False)
            if len(a) == 1 and len(b) == 1:
                self.label_ids = (a[0], b[0])
                break
        if self.label_ids is None:
            raise UserError("judge tokenizer has no single token for 'A' and 'B'; the judge reads their log-probs")

    def _prompt(self, prompt, a, b) -> list[int]:
        text = self.rubric.format(prompt=prompt, a=a, b=b)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      tokenize=True, add_generation_prompt=True, return_dict=False)
        return self.tokenizer(text)["input_ids"]

    @torch.inference_mode()
    def _margins(self, token_lists: list[list[int]]) -> list[float]:
        """logit(A) - logit(B) at the next position, for each prompt (left-padded batches)."""
        from prefalign.sampling import forward_kwargs  # the same model-call conventions

        fwd = forward_kwargs(self.model)
        device = _device(self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for s in range(0, len(token_lists), self.batch_size):
            chunk = token_lists[s:s + self.batch_size]
            L = max(map(len, chunk))
            ids = torch.tensor([[pad] * (L - len(t)) + t for t in chunk], device=device)
            attn = torch.tensor([[0] * (L - len(t)) + [1] * len(t) for t in chunk], device=device)
            kwargs = {"input_ids": ids, "attention_mask": attn}
            if fwd["position_ids"]:
                kwargs["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)
            if fwd["logits_to_keep"]:
                kwargs["logits_to_keep"] = 1
            logits = self.model(**kwargs).logits[:, -1].float()                 # [b, V]
            a, b = self.label_ids
            out += (logits[:, a] - logits[:, b]).tolist()
        return out

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> JudgeVerdict:
        """P(first[i] is better than second[i]) for each i, from both presentation orders."""
        n = len(prompts)
        toks = [self._prompt(p, x, y) for p, x, y in zip(prompts, first, second)]
        toks += [self._prompt(p, y, x) for p, x, y in zip(prompts, first, second)]
        m = self._margins(toks)
        sig = lambda z: 1.0 / (1.0 + math.exp(-z))
        p_ab = [sig(z) for z in m[:n]]        # first shown as A: P(A)
        p_ba = [sig(-z) for z in m[n:]]       # first shown as B: P(B)
        return JudgeVerdict([(x + y) / 2 for x, y in zip(p_ab, p_ba)], p_ab, p_ba)

    def win_rates(self, prompts: list[str], completions: list[str], group_size: int) -> list[float]:
        """[P*G] each completion's mean P(win) against the others of its group (round robin)."""
        if len(completions) % group_size or len(prompts) != len(completions):
            raise ValueError("win_rates needs P*G prompts and completions, grouped by prompt")
        pairs = [(g0 + i, g0 + j) for g0 in range(0, len(completions), group_size)
                 for i in range(group_size) for j in range(i + 1, group_size)]
        if not pairs:
            return [0.5] * len(completions)
        v = self.compare([prompts[i] for i, _ in pairs], [completions[i] for i, _ in pairs],
                         [completions[j] for _, j in pairs]).prob
        wins = [0.0] * len(completions)
        for (i, j), p in zip(pairs, v):
            wins[i] += p
            wins[j] += 1 - p
        return [w / (group_size - 1) for w in wins]

    def as_reward(self, column: str = "reference") -> RewardFn:
        """A reward function: P(completion better than the row's `column` text)."""

        def judge_vs_reference(prompts, completions, **extra):
            if column not in extra:
                raise UserError(f"the judge reward compares to the column {column!r}, which the rows lack")
            return self.compare(prompts, completions, [str(r) for r in extra[column]]).prob

        return judge_vs_reference
