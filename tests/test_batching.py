"""prefalign.data.batching: right-padded [2B, T] pair batches and single-completion batches."""

import pytest
import torch

from prefalign.data.batching import IGNORE, pad_pairs, pad_sequences
from prefalign.data.formats import PairExample
from prefalign.data.tokenize import TokenizedPair, tokenize_examples
from tiny import PAD_ID, make_model, make_tokenizer


def test_pad_pairs_layout():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6]), TokenizedPair([7], [8], [9, 10, 11, 12])]
    batch = pad_pairs(pairs, pad_id=0)
    assert batch.input_ids.tolist() == [
        [1, 2, 3, 4, 5],   # pair 0, chosen
        [7, 8, 0, 0, 0],   # pair 1, chosen
        [1, 2, 6, 0, 0],   # pair 0, rejected
        [7, 9, 10, 11, 12],  # pair 1, rejected
    ]
    assert batch.attention_mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 5]
    x = IGNORE
    assert batch.labels.tolist() == [[x, x, 3, 4, 5], [x, 8, x, x, x], [x, x, 6, x, x], [x, 9, 10, 11, 12]]
    assert all(t.dtype == torch.long for t in batch)


def test_pad_sequences():
    batch = pad_sequences([[1], [2, 3]], [[4, 5], [6]], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 4, 5], [2, 3, 6]]
    assert batch.labels.tolist() == [[IGNORE, 4, 5], [IGNORE, IGNORE, 6]]
    with pytest.raises(ValueError):
        pad_sequences([[1]], [], pad_id=0)
    with pytest.raises(ValueError):
        pad_pairs([], pad_id=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tokenized_batch_runs_through_tiny_models(arch):
    tok = make_tokenizer(add_bos=True)
    examples = [PairExample("Question: What is 2 + 2? Answer:", " 4.", " 5, I think.", "d.jsonl", 1),
                PairExample("Human: Hello there!\n\nAssistant:", " Hi!", " Go away.", "d.jsonl", 2)]
    pairs = tokenize_examples(examples, tok, 64).items
    batch = pad_pairs(pairs, PAD_ID)
    # Exactly the completion tokens (EOS included) are scored.
    scored = (batch.labels != IGNORE).sum(1).tolist()
    assert scored == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    model = make_model(arch, vocab_size=len(tok))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert logits.shape == (*batch.input_ids.shape, len(tok)) and torch.isfinite(logits).all()
    # Same seed, same weights: other tests rely on it.
    assert torch.equal(next(make_model(arch, seed=0).parameters()), next(model.parameters()))
