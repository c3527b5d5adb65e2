"""Turn normalized examples into token ids with an exact prompt/completion boundary.

The boundary. The model is trained on the tokens of the whole text, so the completion's tokens
must be the ones that follow the prompt *in the tokenization of prompt + completion*, not the
tokens of the completion alone (BPE merges across the join). We tokenize the prompt alone and
prompt + completion; the completion is what comes after the prompt's tokens. When the prompt's
tokens are not a prefix of the whole (a prompt ending in a space, say, whose space the tokenizer
wants to merge into the next word), that is a bad row naming the field; with
allow_boundary_mismatch=True the completion is tokenized on its own instead and the row counted
in stats["boundary_mismatch"].

  - text: tokenizer(text, add_special_tokens=False), plus the tokens the tokenizer puts in front
    of a text (usually BOS), added once, in front of the prompt. Tokens it adds at the end (an EOS
    post-processor) are never used: we add EOS to completions ourselves.
  - chat: the prompt is rendered with apply_chat_template(add_generation_prompt=True), the whole
    conversation without it; both are encoded with add_special_tokens=False, as transformers
    does, since chat templates write their own BOS.
  - BOS is never doubled: a text that already starts with the BOS token (a prompt pre-rendered
    with a template) keeps one (stats["bos_deduplicated"]).
  - EOS: appended to a text completion whose last token is not EOS; a chat completion already
    ends its turn by the template, so EOS is appended only when the rendered reply lacks it
    entirely (the template may end the turn with EOS plus a newline).

Truncation (counted in stats["truncated"], flagged per item):
  1. a prompt longer than max_prompt_length keeps its end (the most recent context) and its
     leading BOS: it is truncated from the left;
  2. completions are truncated from the right to fit max_length - len(prompt); a truncated
     completion loses its EOS, as it should (the text did not end there);
  3. a prompt that leaves no room for a single completion token (len(prompt) >= max_length,
     after step 1) is a bad row: raise it, or skip it under on_bad_row="skip".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from prefalign.data.formats import (
    ON_BAD_ROW, BadRow, PairExample, PromptExample, RejectsWriter, UnpairedExample, check_choice, place,
)
from prefalign.errors import UserError


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    row: int = 0
    truncated: bool = False


@dataclass
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str = ""
    row: int = 0
    truncated: bool = False


@dataclass
class TokenizedPrompt:
    prompt_ids: list[int]
    source: str = ""
    row: int = 0
    extra: dict = field(default_factory=dict)
    truncated: bool = False


class TokenizeResult(NamedTuple):
    items: list
    # rows (in), kept, skipped; truncated, boundary_mismatch, bos_deduplicated: rows;
    # eos_appended: completions
    stats: dict


class _Encoder:
    """The tokenizer plus what we learned about it once: its leading special tokens, BOS, EOS."""

    def __init__(self, tokenizer, allow_boundary_mismatch: bool, prepend_bos: bool = False):
        self.tok, self.allow_mismatch, self.prepend_bos = tokenizer, allow_boundary_mismatch, prepend_bos
        self.deduplicated = False  # set by encode when it drops a doubled BOS
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # Which tokens does the tokenizer add in front of a text? Compare with and without specials.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        self.lead = full[:start]

    def encode(self, text: str, lead: bool) -> list[int]:
        ids = (self.lead if lead else []) + self.tok(text, add_special_tokens=False)["input_ids"]
        if self.bos is not None and ids[:2] == [self.bos, self.bos]:
            ids, self.deduplicated = ids[1:], True
        if self.prepend_bos and self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos] + ids  # TRL's CPO/ORPO: every sequence starts with BOS
        return ids

    def render(self, messages: list[dict], generation_prompt: bool, name: str) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise UserError("the data is conversational (lists of {role, content} messages) but the tokenizer has "
                            "no chat template; use a tokenizer with one, or give the data as text")
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja TemplateError and templates' own raise_exception(...) alike
            raise BadRow(name, f"the chat template failed on this conversation: {e}") from None

    def split(self, prompt, completions: dict) -> tuple[list[int], dict, dict]:
        """prompt_ids, {name: completion_ids}, counts for stats: the boundary rule of the module docstring."""
        chat = isinstance(prompt, list)
        self.deduplicated = False
        prompt_text = self.render(prompt, True, "prompt") if chat else prompt
        prompt_ids = self.encode(prompt_text, lead=not chat)
        out, counts = {}, dict(boundary_mismatch=0, eos_appended=0)
        for name, completion in completions.items():
            full_text = self.render(prompt + completion, False, name) if chat else prompt + completion
            full_ids = self.encode(full_text, lead=not chat)
            if full_ids[:len(prompt_ids)] == prompt_ids:
                ids = full_ids[len(prompt_ids):]
            else:
                if not self.allow_mismatch:
                    raise BadRow(name, self._mismatch_reason(prompt_ids, full_ids, name))
                if not full_text.startswith(prompt_text):
                    raise BadRow(name, "the chat template renders the prompt differently alone than inside the "
                                       "whole conversation, so the completion cannot be cut out of it")
                ids = self.tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
                counts["boundary_mismatch"] = 1  # rows, not completions
            if not ids:
                raise BadRow(name, "no tokens after the prompt")
            ends_turn = self.eos in ids if chat else ids[-1] == self.eos
            if not ends_turn:
                ids = ids + [self.eos]
                counts["eos_appended"] += 1
            out[name] = ids
        counts["bos_deduplicated"] = int(self.deduplicated)
        return prompt_ids, out, counts

    def _mismatch_reason(self, prompt_ids, full_ids, name) -> str:
        k = next(i for i in range(len(prompt_ids)) if i >= len(full_ids) or full_ids[i] != prompt_ids[i])
        alone = self.tok.decode(prompt_ids[k:k + 1])
        joined = self.tok.decode(full_ids[k:k + 1])
        return (f"the tokenized prompt is not a prefix of the tokenized prompt+{name}: at token {k} the prompt alone "
                f"has {alone!r} but prompt+{name} has {joined!r} (the tokenizer merges across the join, e.g. a "
                "prompt ending in a space). Move the space into the completion, or pass allow_boundary_mismatch "
                "to tokenize the pieces separately")


def _truncate(prompt: list[int], completions: dict, max_length: int, max_prompt_length: int | None, bos):
    """The truncation policy of the module docstring; returns prompt, completions, truncated."""
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        keep_bos = bos is not None and prompt[0] == bos
        prompt = ([bos] if keep_bos else []) + prompt[len(prompt) - max_prompt_length + keep_bos:]
        truncated = True
    room = max_length - len(prompt)
    if room < 1:
        after = " (after truncating it to max_prompt_length)" if truncated else ""
        raise BadRow("prompt", f"the prompt is {len(prompt)} tokens{after}, leaving no room for the completion "
                               f"within max_length={max_length}; raise max_length or set max_prompt_length")
    out = {}
    for name, ids in completions.items():
        if len(ids) > room:
            ids, truncated = ids[:room], True
        out[name] = ids
    return prompt, out, truncated


def tokenize_examples(examples, tokenizer, max_length: int, max_prompt_length: int | None = None,
                      on_bad_row: str = "error", rejects_path=None,
                      allow_boundary_mismatch: bool = False, prepend_bos: bool = False) -> TokenizeResult:
    """Tokenize PairExample / UnpairedExample / PromptExample into TokenizedPair / TokenizedUnpaired /
    TokenizedPrompt, in order, by the boundary and truncation rules of the module docstring.

    A bad row raises UserError naming file, row and field, or under on_bad_row="skip" is counted in
    stats["skipped"] and appended with its reason to rejects_path.
    """
    check_choice("on_bad_row", on_bad_row, ON_BAD_ROW)
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"max_length={max_length!r}: must be an integer of at least 2")
    bad_prompt_length = not (isinstance(max_prompt_length, int) and 1 <= max_prompt_length < max_length)
    if max_prompt_length is not None and bad_prompt_length:
        raise UserError(f"max_prompt_length={max_prompt_length!r}: must be an integer from 1 to max_length-1 "
                        f"({max_length - 1})")
    if tokenizer.eos_token_id is None and any(not isinstance(ex, PromptExample) for ex in examples):
        raise UserError("the tokenizer has no EOS token, which completions need; set tokenizer.eos_token")

    stats = dict(rows=len(examples), kept=0, skipped=0, truncated=0, boundary_mismatch=0,
                 eos_appended=0, bos_deduplicated=0)
    enc = _Encoder(tokenizer, allow_boundary_mismatch, prepend_bos)
    rejects = RejectsWriter(rejects_path)
    items = []
    for ex in examples:
        try:
            if isinstance(ex, PairExample):
                completions = {"chosen": ex.chosen, "rejected": ex.rejected}
            elif isinstance(ex, UnpairedExample):
                completions = {"completion": ex.completion}
            elif isinstance(ex, PromptExample):
                completions = {}
            else:
                raise TypeError(f"cannot tokenize {type(ex).__name__}")
            prompt, ids, counts = enc.split(ex.prompt, completions)
            prompt, ids, truncated = _truncate(prompt, ids, max_length, max_prompt_length, enc.bos)
        except BadRow as bad:
            message = f"{place(ex.source, ex.row, bad.field)}: {bad.reason}"
            if on_bad_row == "error":
                raise UserError(message) from None
            rejects.write(ex.source, ex.row, message, vars(ex))
            continue
        for key, n in counts.items():
            stats[key] += n
        stats["truncated"] += truncated
        if isinstance(ex, PairExample):
            items.append(TokenizedPair(prompt, ids["chosen"], ids["rejected"], ex.source, ex.row, truncated))
        elif isinstance(ex, UnpairedExample):
            items.append(TokenizedUnpaired(prompt, ids["completion"], ex.label, ex.source, ex.row, truncated))
        else:
            items.append(TokenizedPrompt(prompt, ex.source, ex.row, ex.extra, truncated))
    stats["kept"], stats["skipped"] = len(items), rejects.count
    return TokenizeResult(items, stats)
