"""SFT rows in TRL's formats, besides prefalign's prompt + completion (label optional):

    {"messages": [{role, content}, ...]}   conversational ("language modeling, conversational"):
        the last message must be the assistant's; it is the completion, every message before it the
        prompt (rendered with the chat template and its generation prompt, as any conversation).
        Only the last assistant turn is trained on (TRL's assistant_only_loss trains on every
        assistant turn; split a multi-turn conversation into one row per turn for that).
    {"text": "..."}                        plain language modeling: the whole text is the completion,
        with an empty prompt. Every token is trained on except the first, which has nothing before
        it to be predicted from, unless the tokenizer adds a BOS token (then the prompt is that BOS).

prompt/completion rows (text or conversations) are read as data.rows reads unpaired rows.
"""

from __future__ import annotations

from prefalign.data.jsonsafe import type_name
from prefalign.data.records import Record
from prefalign.data.rows import BadRow, UnpairedExample, check_messages, unpaired_example


def example(data: dict, rec: Record) -> UnpairedExample:
    """One SFT row, in any of the formats above."""
    if "messages" in data and "prompt" not in data and "completion" not in data:
        return _conversation(data["messages"], rec)
    if "text" in data and "prompt" not in data and "completion" not in data:
        return _text(data["text"], rec)
    return unpaired_example(data, rec, label_required=False)


def _conversation(value, rec: Record) -> UnpairedExample:
    if not isinstance(value, list):
        raise BadRow("messages", f"expected a list of {{role, content}} messages, got {type_name(value)}")
    messages = check_messages(value, "messages")
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"messages[{len(messages) - 1}].role",
                     f"the last message is the {messages[-1]['role']}'s; SFT trains on a final assistant message")
    if len(messages) < 2:
        raise BadRow("messages", "only an assistant message: the conversation needs a prompt message before it")
    return UnpairedExample(messages[:-1], messages[-1:], True, rec.source, rec.row)


def _text(value, rec: Record) -> UnpairedExample:
    if not isinstance(value, str):
        raise BadRow("text", f"expected a string, got {type_name(value)}")
    if not value.strip():
        raise BadRow("text", "empty string")
    return UnpairedExample("", value, True, rec.source, rec.row)
