"""The demo's tokenizer: one token per character of the task alphabet, built in-process.

Why character-level: the demo task is small arithmetic ("12+7=" -> "19"), whose alphabet is a
handful of characters. One token per character keeps the model tiny (vocab 20), makes the
prompt/completion boundary exact (tokenizing "12+7=" then "19" gives the same ids as
tokenizing "12+7=19"), and needs no download or training: the vocabulary is a constant, so
two builds are identical on every machine.

It is returned as a ``transformers.PreTrainedTokenizerFast``, so the rest of prefalign (and a
user) treats it like any hub tokenizer: ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
round-trip, ``bos``/``eos``/``pad`` are set, and encoding adds BOS the way Llama tokenizers do.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# The task alphabet. Kept a little wider than addition needs (operators, space, minus) so the
# same tokenizer serves variants of the task (subtraction, multiplication) without a new vocab.
ALPHABET = "0123456789+-*= "


def build_vocab() -> dict[str, int]:
    """Token -> id. Special tokens first (pad = 0), then the alphabet in a fixed order."""
    tokens = list(SPECIAL_TOKENS) + list(ALPHABET)
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer (deterministic: a constant vocabulary, no training).

    Encoding ``"12+7="`` gives ``[<s>, 1, 2, +, 7, =]``; ``add_special_tokens=False`` drops the
    BOS. EOS is never added by encoding: the data pipeline appends it to completions, as it does
    for hub tokenizers. Characters outside the alphabet map to ``<unk>``.
    """
    vocab = build_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token, so WordLevel sees single characters.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins the characters back without the spaces a WordLevel decoder would insert.
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="left",  # left padding: batched generation appends to the right edge
        clean_up_tokenization_spaces=False,
    )
