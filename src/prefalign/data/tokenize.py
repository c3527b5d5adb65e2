"""Turn normalized examples into token ids with an exact prompt/completion boundary.

The boundary. The model is trained on the tokens of the whole text, so the completion's tokens
must be the ones that follow the prompt *in the tokenization of prompt + completion*, not the
tokens of the completion alone (BPE merges across the join). We tokenize the prompt alone and
prompt + completion; the completion is what comes after the prompt's tokens. When the prompt's
tokens are not a prefix of the whole (a prompt ending in a space, say, whose space the tokenizer
wants to merge into the next word), that is a bad row naming the field; with
allow_boundary_mismatch=True the completion is tokenized on its own instead and the row counted
in stats["boundary_mismatch"].

  - text: tokenizer(text, add_special_tokens=False, split_special_tokens=True), plus the tokens the
    tokenizer puts in front of a text (usually BOS), added once, in front of the prompt. Tokens it
    adds at the end (an EOS post-processor) are never used: we add EOS to completions ourselves.
    Data text is text: a '</s>' or '<|im_end|>' typed in it is tokenized as those characters, never
    as the special token (rows holding such strings are counted in stats["special_text"]: a text
    pre-rendered with a chat template belongs in the data as a conversation).
  - chat: the prompt is rendered with apply_chat_template(add_generation_prompt=True), the whole
    conversation without it; both are encoded with add_special_tokens=False, as transformers
    does, since chat templates write their own BOS, and with special tokens parsed, since the
    template writes them as text. So a special-token string inside a message (its content or any
    other value) is a bad row naming the field: it would become a real special token and nothing
    in the rendered text tells it from the template's own. (Tokenizing the template's pieces and
    the contents apart instead would change the tokens at every join.)
  - BOS is never doubled (stats["bos_deduplicated"]; with the above only a tokenizer whose BOS
    is not marked special can still produce a text starting with it).
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
A long text is cut in characters before it is tokenized: no token covers more characters than its
spelling has, so (n + SLACK) * (longest token) characters hold at least n + SLACK tokens, of which
truncation keeps n (the prompt's last, the completion's first) and the rest keep those n away from
the cut. Memory stays near the text's size (a 50 MB row tokenized whole took 7.8 GB), and the ids,
the truncated flag and the counts equal those of tokenizing the whole text and then truncating.
When a normalizer drops characters so that a cut holds too few tokens, the cut doubles until it
does. The cut applies to the rendered text of a conversation too, never to message contents, so the
template sees the whole conversation.
"""

from __future__ import annotations

import re
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

    @property
    def num_tokens(self) -> int:
        """Tokens the pair feeds the policy: prompt + chosen + rejected."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str = ""
    row: int = 0
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens the example feeds the policy: prompt + completion."""
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class TokenizedPrompt:
    prompt_ids: list[int]
    source: str = ""
    row: int = 0
    extra: dict = field(default_factory=dict)
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)


class TokenizeResult(NamedTuple):
    items: list
    # rows (in), kept, skipped; truncated, boundary_mismatch, bos_deduplicated: rows;
    # eos_appended: completions
    stats: dict


# Tokens tokenized beyond what truncation keeps when a long text is cut first (see _Encoder.head), so
# that the kept ones lie far from the cut, where BPE merges and pre-tokenization could differ.
SLACK = 64


class _Encoder:
    """The tokenizer plus what we learned about it once: its leading special tokens, BOS, EOS, its
    special-token strings and its longest token; and the length limits."""

    def __init__(self, tokenizer, allow_boundary_mismatch: bool, max_length: int, max_prompt_length: int | None,
                 prepend_bos: bool = False):
        self.tok, self.allow_mismatch, self.prepend_bos = tokenizer, allow_boundary_mismatch, prepend_bos
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.deduplicated = False  # set by encode when it drops a doubled BOS
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # Which tokens does the tokenizer add in front of a text? Compare with and without specials.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        self.lead = full[:start]
        # The strings split_special_tokens=True leaves as text: the added tokens marked special.
        specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len,
                          reverse=True)
        self.specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        # No token stands for more characters than its own spelling has (a byte-level BPE token's
        # characters are bytes, at least one per character): the bound behind cutting text early.
        self.longest = max(map(len, tokenizer.get_vocab()), default=1)

    def encode(self, text: str, lead: bool, template: bool = False) -> list[int]:
        """Token ids of `text`. Data text is text: a '</s>' in it is tokenized as those characters,
        never as the special token; only a chat template's output (template=True) writes real ones."""
        ids = self.tok(text, add_special_tokens=False, split_special_tokens=not template)["input_ids"]
        ids = (self.lead if lead else []) + ids
        if self.bos is not None and ids[:2] == [self.bos, self.bos]:
            ids, self.deduplicated = ids[1:], True
        if self.prepend_bos and self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos] + ids  # TRL's CPO/ORPO: every sequence starts with BOS
        return ids

    def head(self, text: str, need: int, lead: bool, template: bool, start: int = 0,
             start_ids: int = 0) -> tuple[list[int], bool]:
        """(ids, cut): the ids of `text`, or (cut=True) of a prefix of it with at least need + SLACK ids,
        whose first `need` are the whole text's. Tokenizing only a prefix keeps memory near the text's
        size: a 50 MB row tokenized whole takes gigabytes. start, start_ids: a head of the text already
        known to hold that many ids (the prompt inside prompt + completion), so only the rest is bounded."""
        extra = (need - start_ids + SLACK) * self.longest
        while start + extra < len(text):
            ids = self.encode(text[:start + extra], lead, template)
            if len(ids) >= need + SLACK:
                return ids, True
            extra *= 2  # the normalizer dropped characters (whitespace runs, say): the bound did not hold
        return self.encode(text, lead, template), False

    def tail(self, text: str, keep: str, need: int, lead: bool, template: bool) -> tuple[list[int], int]:
        """(ids, drop): the ids of `text` (drop=0), or of keep + text[len(keep) + drop:] with at least
        need + SLACK ids, whose last `need` are the whole text's. `keep` is a head the text starts with
        and that must stay (a chat template's BOS)."""
        size = (need + SLACK) * self.longest
        while len(keep) + size < len(text):
            drop = len(text) - size - len(keep)
            ids = self.encode(keep + text[len(keep) + drop:], lead, template)
            if len(ids) >= need + SLACK:
                return ids, drop
            size *= 2
        return self.encode(text, lead, template), 0

    def render(self, messages: list[dict], generation_prompt: bool, name: str) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise UserError("the data is conversational (lists of {role, content} messages) but the tokenizer has "
                            "no chat template; use a tokenizer with one, or give the data as text")
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja TemplateError and templates' own raise_exception(...) alike
            raise BadRow(name, f"the chat template failed on this conversation: {e}") from None

    def check_messages(self, messages: list[dict], name: str) -> None:
        """A special-token string in a message is a bad row. The rendered conversation is tokenized
        with special tokens parsed, so that the template's own <|im_end|> become real ones; one typed
        into a message would become real too, and nothing in the rendered text tells the two apart."""
        if self.specials is None:
            return
        for m in messages:
            stack = [m]
            while stack:
                v = stack.pop()
                if isinstance(v, str):
                    found = self.specials.search(v)
                    if found:
                        raise BadRow(name, f"the {m.get('role')} message holds the special-token string "
                                           f"{found.group()!r}; in a conversation the chat template writes the "
                                           "special tokens, so one in the data would be read as a real one: "
                                           "remove it (in text data it is tokenized as plain text)")
                elif isinstance(v, dict):
                    stack.extend(v.values())
                elif isinstance(v, list):
                    stack.extend(v)

    def has_special_text(self, texts) -> bool:
        return self.specials is not None and any(self.specials.search(t) for t in texts)

    def split(self, prompt, completions: dict) -> tuple[list[int], dict, dict]:
        """prompt_ids, {name: completion_ids}, counts for stats: the boundary and truncation rules of
        the module docstring, tokenizing only as much of a long text as truncation keeps."""
        chat = isinstance(prompt, list)
        self.deduplicated = False
        counts = dict(boundary_mismatch=0, eos_appended=0, truncated=0,
                      special_text=0 if chat else int(self.has_special_text([prompt, *completions.values()])))
        if chat:
            for name, messages in {"prompt": prompt, **completions}.items():
                self.check_messages(messages, name)
            prompt_text = self.render(prompt, True, "prompt")
            fulls = {name: self.render(prompt + c, False, name) for name, c in completions.items()}
        else:
            prompt_text, fulls = prompt, {name: prompt + c for name, c in completions.items()}
        prompt_ids, cut = self._prompt(prompt_text, fulls, chat)
        prompt_ids_kept, counts["truncated"] = _truncate_prompt(prompt_ids, self.max_prompt_length, self.bos)
        room = self.max_length - len(prompt_ids_kept)
        if room < 1:
            after = " (after truncating it to max_prompt_length)" if counts["truncated"] else ""
            raise BadRow("prompt", f"the prompt is {len(prompt_ids_kept)} tokens{after}, leaving no room for the "
                                   f"completion within max_length={self.max_length}; raise max_length or set "
                                   "max_prompt_length")
        out = {}
        for name, full_text in fulls.items():
            ids, ends_turn, mismatched = self._completion(name, cut(prompt_text), prompt_ids, cut(full_text),
                                                          room + 1, chat)
            counts["boundary_mismatch"] |= mismatched  # rows, not completions
            if not ends_turn:
                ids = ids + [self.eos]
                counts["eos_appended"] += 1
            if len(ids) > room:  # a truncated completion loses its EOS: the text did not end there
                ids, counts["truncated"] = ids[:room], 1
            out[name] = ids
        counts["bos_deduplicated"] = int(self.deduplicated)
        return prompt_ids_kept, out, counts

    def _prompt(self, prompt_text: str, fulls: dict, chat: bool):
        """The prompt's ids, whole or of a cut that keeps its end, and the same cut as a function to
        apply to the full texts (so the boundary rule compares like with like)."""
        if self.max_prompt_length is None:  # no left truncation: a prompt of max_length tokens is a bad row
            ids, long = self.head(prompt_text, self.max_length, not chat, chat)
            if long:
                raise BadRow("prompt", f"the prompt is over {self.max_length} tokens, leaving no room for the "
                                       f"completion within max_length={self.max_length}; raise max_length or set "
                                       "max_prompt_length")
            return ids, _same
        if not all(f.startswith(prompt_text) for f in fulls.values()):
            return self.encode(prompt_text, not chat, chat), _same  # an odd template: no cut, tokenize whole
        keep = self.tok.bos_token if chat and self.tok.bos_token and prompt_text.startswith(self.tok.bos_token) else ""
        ids, drop = self.tail(prompt_text, keep, self.max_prompt_length + 1, not chat, chat)
        if not drop:
            return ids, _same
        return ids, lambda text: keep + text[len(keep) + drop:]

    def _completion(self, name, prompt_text, prompt_ids, full_text, need, chat) -> tuple[list[int], bool, bool]:
        """The completion's first `need` ids (all of them if fewer), whether they end the turn, and
        whether the boundary mismatched (allowed: the completion was tokenized alone)."""
        full_ids, cut = self.head(full_text, len(prompt_ids) + need, not chat, chat, len(prompt_text), len(prompt_ids))
        mismatched = full_ids[:len(prompt_ids)] != prompt_ids
        if not mismatched:
            ids = full_ids[len(prompt_ids):]
        else:
            if not self.allow_mismatch:
                raise BadRow(name, self._mismatch_reason(prompt_ids, full_ids, name))
            if not full_text.startswith(prompt_text):
                raise BadRow(name, "the chat template renders the prompt differently alone than inside the "
                                   "whole conversation, so the completion cannot be cut out of it")
            ids, cut = self.head(full_text[len(prompt_text):], need, False, chat)
        if not ids:
            raise BadRow(name, "no tokens after the prompt")
        if cut:  # the ids past `need` are near the cut: not the whole text's
            ids = ids[:need]
            # a chat reply's EOS ends its turn in the template's text (its content holds no special strings)
            return ids, chat and full_text.find(self.tok.eos_token, len(prompt_text)) >= 0, mismatched
        return ids, (self.eos in ids) if chat else ids[-1] == self.eos, mismatched

    def _mismatch_reason(self, prompt_ids, full_ids, name) -> str:
        k = next(i for i in range(len(prompt_ids)) if i >= len(full_ids) or full_ids[i] != prompt_ids[i])
        alone = self.tok.decode(prompt_ids[k:k + 1])
        joined = self.tok.decode(full_ids[k:k + 1])
        return (f"the tokenized prompt is not a prefix of the tokenized prompt+{name}: at token {k} the prompt alone "
                f"has {alone!r} but prompt+{name} has {joined!r} (the tokenizer merges across the join, e.g. a "
                "prompt ending in a space). Move the space into the completion, or pass allow_boundary_mismatch "
                "to tokenize the pieces separately")


def _same(text: str) -> str:
    return text


def _truncate_prompt(prompt: list[int], max_prompt_length: int | None, bos) -> tuple[list[int], int]:
    """Step 1 of the truncation policy: keep the prompt's end and its leading BOS; (ids, 1 if cut)."""
    if max_prompt_length is None or len(prompt) <= max_prompt_length:
        return prompt, 0
    keep_bos = bos is not None and prompt[0] == bos
    return ([bos] if keep_bos else []) + prompt[len(prompt) - max_prompt_length + keep_bos:], 1


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
                 eos_appended=0, bos_deduplicated=0, special_text=0)
    enc = _Encoder(tokenizer, allow_boundary_mismatch, max_length, max_prompt_length, prepend_bos)
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
        except BadRow as bad:
            message = f"{place(ex.source, ex.row, bad.field)}: {bad.reason}"
            if on_bad_row == "error":
                raise UserError(message) from None
            rejects.write(ex.source, ex.row, message, vars(ex))
            continue
        for key, n in counts.items():
            stats[key] += n
        truncated = bool(counts["truncated"])
        if isinstance(ex, PairExample):
            items.append(TokenizedPair(prompt, ids["chosen"], ids["rejected"], ex.source, ex.row, truncated))
        elif isinstance(ex, UnpairedExample):
            items.append(TokenizedUnpaired(prompt, ids["completion"], ex.label, ex.source, ex.row, truncated))
        else:
            items.append(TokenizedPrompt(prompt, ex.source, ex.row, ex.extra, truncated))
    stats["kept"], stats["skipped"] = len(items), rejects.count
    return TokenizeResult(items, stats)
