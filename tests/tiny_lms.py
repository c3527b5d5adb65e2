"""Tiny causal LMs built in-process from transformers configs (no hub downloads).

Shared by the log-prob and packing tests. initializer_range is raised to 0.2 so the
next-token distributions are far from uniform and softcaps/scales actually matter.
"""

import torch
import transformers as tf

VOCAB = 211  # odd on purpose: nothing divides it


def _common(**kw):
    return dict(vocab_size=VOCAB, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def llama_config():
    return tf.LlamaConfig(**_common(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def qwen2_config():
    # Qwen2 has q/k/v biases; tied embeddings as in the small Qwen2 checkpoints.
    return tf.Qwen2Config(**_common(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def mistral_config():
    return tf.MistralConfig(**_common(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8))


def gpt2_config():
    # Absolute position embeddings, tied head; dropout off so train/eval agree.
    return tf.GPT2Config(**_common(n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True))


def gemma2_config():
    # final_logit_softcapping of 1.0 with logits of std ~1: the tanh is far from linear.
    return tf.Gemma2Config(**_common(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     final_logit_softcapping=1.0, attn_logit_softcapping=None,
                                     query_pre_attn_scalar=8, sliding_window=64))


def cohere_config():
    return tf.CohereConfig(**_common(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5))


def granite_config():
    return tf.GraniteConfig(**_common(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0))


CONFIGS = {
    "llama": llama_config,
    "qwen2": qwen2_config,
    "mistral": mistral_config,
    "gpt2": gpt2_config,
    "gemma2": gemma2_config,
    "cohere": cohere_config,
    "granite": granite_config,
}


def tiny_lm(name: str, seed: int = 0, attn: str | None = None):
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    attn = attn or ("eager" if name == "gemma2" else "sdpa")  # Gemma2 has no SDPA path (softcapped attention)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.float().eval()  # eval: no dropout; gradients still flow
