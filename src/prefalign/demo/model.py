"""The demo's model: a tiny Llama built in-process from a fixed seed.

Why Llama: it is the architecture most users fine-tune, and a ``LlamaForCausalLM`` saved here
loads back with ``AutoModelForCausalLM`` (and peft, vLLM) like any hub checkpoint, so the demo
exercises the same code paths as a real run. Why tiny: the whole demo (SFT, sampling, DPO,
evaluation) must finish in a few minutes on a 2-core CPU. The defaults were found by
prototyping (bench/demo_prototype.py): large enough to learn two-digit addition in about a
minute of SFT, small enough that sampling thousands of completions takes seconds.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# The demo's default size. Sequences are at most ~12 tokens, so the context is short.
DEFAULT_SIZE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
)


def build_config(tokenizer: PreTrainedTokenizerBase, **overrides) -> LlamaConfig:
    """The tiny LlamaConfig for ``tokenizer``'s vocabulary; ``overrides`` change any field."""
    fields = dict(DEFAULT_SIZE)
    fields.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # halves the parameters of a model this small
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialized tiny Llama, identical for the same seed and overrides.

    The global RNG is saved and restored around initialization, so building the model does not
    shift the random stream of the caller (data sampling, dropout).
    """
    config = build_config(tokenizer, **overrides)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    # Generation defaults that fit the task: stop at EOS, pad with the pad token.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
