"""Tiny tokenizers and models built in-process, so no test ever touches the hub.

    make_tokenizer(chat_template=False, add_bos=False, add_eos=False, vocab_size=320)
        a byte-level BPE (the GPT-2/Llama-3/Qwen2 kind) trained on a few sentences,
        wrapped in transformers' PreTrainedTokenizerFast, with <pad>, <bos>, <eos>.
    make_model(arch="llama", vocab_size=320, seed=0)
        a random 2-layer Llama / Qwen2 / GPT-2 / Mistral, the same weights for the same seed.

Special tokens have fixed ids (PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID) so a model
built without a tokenizer still agrees with it.
"""

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # trained first, so their ids are 0..4
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)

# ChatML, as Qwen2 uses it: each turn ends with <|im_end|> (the chat tokenizer's EOS) and a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer: Paris.",
    "Question: What is 2 + 2? Answer: 4. The answer is four, not five.",
    "Human: Hello there! How are you today?\n\nAssistant: I am fine, thank you for asking.",
    "A good answer is short, correct and polite; a bad answer is long, wrong or rude.",
    "user assistant system tool: please help me write a poem about the sea and the sky.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000",
]


@functools.lru_cache(maxsize=None)
def _trained_bpe(vocab_size: int) -> str:
    # Training takes milliseconds, but tests build many tokenizers: train once per size, keep the JSON.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok.to_str()


def make_tokenizer(chat_template=False, add_bos=False, add_eos=False, vocab_size=320):
    """A fresh tiny tokenizer.

    add_bos / add_eos: the tokenizer itself adds <bos> in front / EOS at the end of every text
    (like Llama / some T5-style tokenizers), which is what data.tokenize must cope with.
    chat_template: attach the ChatML template above; EOS becomes <|im_end|>, as in Qwen2-Instruct.
    With add_bos the template also starts with the BOS token, as Llama-3's does.
    """
    assert vocab_size >= 256 + len(SPECIAL_TOKENS), "byte-level BPE needs 256 byte tokens + specials"
    tok = Tokenizer.from_str(_trained_bpe(vocab_size))
    eos = IM_END if chat_template else EOS
    if add_bos or add_eos:
        single = (f"{BOS} " if add_bos else "") + "$A" + (f" {eos}" if add_eos else "")
        specials = [(BOS, BOS_ID)] * add_bos + [(eos, tok.token_to_id(eos))] * add_eos
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=eos, pad_token=PAD)
    if chat_template:
        hf.chat_template = ("{{ bos_token }}" if add_bos else "") + CHAT_TEMPLATE
    return hf


def make_model(arch="llama", vocab_size=320, seed=0, hidden_size=32, num_layers=2):
    """A random tiny causal LM (eval mode, fp32); same seed, same weights."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    ids = dict(vocab_size=vocab_size, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    decoder = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **ids,
    )
    if arch == "llama":
        config = LlamaConfig(**decoder, tie_word_embeddings=False)
    elif arch == "qwen2":
        config = Qwen2Config(**decoder, tie_word_embeddings=True)
    elif arch == "mistral":
        config = MistralConfig(**decoder, tie_word_embeddings=False)
    elif arch == "gpt2":
        # GPT-2 has dropout by default; zero it so forward passes are deterministic.
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    else:
        raise ValueError(f"unknown arch {arch!r}: use llama, qwen2, mistral or gpt2")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
