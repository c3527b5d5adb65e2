"""prefalign.sampling: the KV-cache decode loop against naive recompute and model.generate."""

import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prefalign.errors import UserError
from prefalign.sampling import Generations, SamplingConfig, _sample, generate
import transformers as tf
from tiny_lms import llama_config, tiny_lm

EOS = 2  # tiny_lms: pad 0, bos 1, eos 2, vocab 211


def byte_bpe(vocab_size=211):
    """A small byte-level BPE whose ids 0/1/2 are pad/bos/eos, matching tiny_lms."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the cat sat on the mat, answer: 42.\n"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


def text_lm(tok, seed=0):
    """A tiny Llama whose vocabulary covers the whole BPE (the tiny_lms models stop at 211 ids)."""
    torch.manual_seed(seed)
    config = llama_config()
    config.vocab_size = len(tok)
    return tf.AutoModelForCausalLM.from_config(config).eval()


PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50], [1, 60, 61, 62, 63]]  # ragged: left padding matters


def naive_greedy(model, prompt, max_new, eos=EOS):
    """No cache, no padding: the whole sequence goes through the model for every new token."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids])).logits[0, -1]
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
            if t == eos:
                break
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma2"])
def test_greedy_kv_cache_equals_naive_recompute(arch, tok):
    # fp64: rounding cannot flip an argmax. Gemma2's eager attention turns left padding into NaN
    # in fp64 (in transformers itself, model.generate included), so it runs in fp32.
    model = tiny_lm(arch, seed=1)
    model = model if arch == "gemma2" else model.double()
    gens = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0))
    for prompt, got in zip(PROMPTS, gens.token_ids):
        assert got == naive_greedy(model, prompt, 12)


def test_greedy_equals_transformers_generate(tok):
    model = tiny_lm("llama", seed=2)
    gens = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0))
    L = max(map(len, PROMPTS))
    input_ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    attn = (torch.arange(L)[None, :] >= torch.tensor([L - len(p) for p in PROMPTS])[:, None]).long()
    ref = model.generate(input_ids=input_ids, attention_mask=attn, max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=EOS)[:, L:].tolist()
    for got, want in zip(gens.token_ids, ref):
        if EOS in want:  # transformers pads after EOS; we stop there
            want = want[:want.index(EOS) + 1]
        assert got == want


def test_string_prompts_equal_token_prompts(tok):
    model = text_lm(tok, seed=3)
    texts = ["the cat", "answer: 4", "on the mat, the cat sat"]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    by_text = generate(model, tok, texts, cfg)
    by_ids = generate(model, tok, [tok(t)["input_ids"] for t in texts], cfg)
    assert by_text.token_ids == by_ids.token_ids and by_text.texts == by_ids.texts
    assert by_text.texts[0] == tok.decode(by_text.token_ids[0], skip_special_tokens=True)


def test_seed_reproduces_and_differs(tok):
    model = tiny_lm("llama", seed=4)
    cfg = lambda seed: SamplingConfig(max_new_tokens=10, temperature=1.0, n=3, seed=seed, ignore_eos=True)
    a, b, c = (generate(model, tok, PROMPTS, cfg(s)) for s in (7, 7, 8))
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids


def test_n_samples_per_prompt_shape(tok):
    model = tiny_lm("llama", seed=5)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n=4, seed=0, ignore_eos=True)
    g = generate(model, tok, PROMPTS, cfg, batch_size=5)  # 5 // 4 = 1 prompt per chunk
    assert isinstance(g, Generations) and len(g) == 12 and g.n == 4
    assert g.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert all(len(t) == 6 and len(lp) == 6 for t, lp in zip(g.token_ids, g.logprobs))
    assert g.finish_reasons == ["length"] * 12 and g.num_tokens == 72
    for i in range(3):  # a group's samples share the prefix cache but not the noise
        assert len({tuple(t) for t in g.token_ids[4 * i:4 * i + 4]}) > 1


def test_sampled_logprobs_match_full_forward(tok):
    """With temperature 1 and no filtering the reported logprobs are the model's log-softmax."""
    model = tiny_lm("llama", seed=6).double()
    g = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, seed=3))
    for k, (ids, lps) in enumerate(zip(g.token_ids, g.logprobs)):
        prompt = PROMPTS[g.prompt_index[k]]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), want, atol=1e-5, rtol=0)


def test_filters_that_leave_one_token_are_greedy(tok):
    model = tiny_lm("llama", seed=7)
    greedy = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0))
    for cfg in (SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=0),
                SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=0)):
        g = generate(model, tok, PROMPTS, cfg)
        assert g.token_ids == greedy.token_ids
        assert all(abs(x) < 1e-6 for lp in g.logprobs for x in lp)  # one token left: probability 1


def test_top_k_restricts_support(tok):
    model = tiny_lm("llama", seed=8).double()
    g = generate(model, tok, [PROMPTS[0]], SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=3, n=64, seed=0))
    with torch.no_grad():
        top3 = set(model(torch.tensor([PROMPTS[0]])).logits[0, -1].topk(3).indices.tolist())
    firsts = {t[0] for t in g.token_ids}
    assert firsts <= top3 and len(firsts) > 1


def nucleus(logits, top_k, top_p):
    """The filtered distribution, naively: top-k, then the smallest most-likely set with mass >= top_p."""
    p = torch.softmax(logits.double(), -1)
    if top_k:
        p = torch.where(p >= p.topk(top_k).values[-1], p, 0)
        p = p / p.sum()
    keep, mass = torch.zeros_like(p, dtype=torch.bool), 0.0
    for i in p.argsort(descending=True).tolist():
        if mass > top_p:
            break
        keep[i], mass = True, mass + p[i].item()
    p = torch.where(keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("scale, top_k, top_p", [(4.0, 0, 0.9), (0.3, 0, 0.9), (1.0, 20, 0.8), (1.0, 0, 1.0)])
def test_sampling_frequencies_match_the_filtered_distribution(scale, top_k, top_p):
    """Peaked logits take the top-64 shortcut for top-p, flat ones the full sort: both must be exact."""
    torch.manual_seed(0)
    V, N = 200, 40000
    logits = torch.randn(V) * scale
    want = nucleus(logits, top_k, top_p)
    cfg = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(1)
    tok, lp = _sample(logits.expand(N, V).clone(), cfg, gen, torch.arange(N), N)
    freq = torch.bincount(tok, minlength=V).double() / N
    assert set(tok.tolist()) <= set(want.nonzero().flatten().tolist())
    assert (freq - want).abs().max() < 0.01
    torch.testing.assert_close(lp.double(), want[tok].log(), atol=1e-5, rtol=0)


def test_finished_rows_do_not_change_the_others(tok):
    """Rows that stop early are dropped from the batch; the rows left must sample the same tokens."""
    model = tiny_lm("llama", seed=9).double()
    base = SamplingConfig(max_new_tokens=16, temperature=1.0, n=4, seed=11, ignore_eos=True)
    free = generate(model, tok, PROMPTS, base)
    # A stop token that half the rows emit early makes the loop compact the batch mid-way.
    firsts = [t[1] for t in free.token_ids]
    stop_tok = max(set(firsts), key=firsts.count)
    stopped = generate(model, tok, PROMPTS, SamplingConfig(**{**base.__dict__, "stop_token_ids": [stop_tok]}))
    assert any(r == "eos" for r in stopped.finish_reasons) and any(r == "length" for r in stopped.finish_reasons)
    for a, b in zip(free.token_ids, stopped.token_ids):
        cut = a.index(stop_tok) + 1 if stop_tok in a else len(a)
        assert b == a[:cut]


def test_stop_strings_cut_text_and_tokens(tok):
    model = tiny_lm("llama", seed=10)
    full = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0, ignore_eos=True))
    text = full.texts[0]
    stop = text[5:7]  # a string the greedy completion is known to contain
    first = text.index(stop)
    g = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))
    assert g.finish_reasons[0] == "stop"
    assert g.texts[0] == text[:first + len(stop)]
    # Tokens stop at the token that completed the stop string, and no earlier.
    ids = g.token_ids[0]
    assert ids == full.token_ids[0][:len(ids)]
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    excl = generate(model, tok, PROMPTS[:1], SamplingConfig(max_new_tokens=16, temperature=0, ignore_eos=True,
                                                           stop=[stop], include_stop_str=False))
    assert excl.texts[0] == text[:first] and excl.token_ids[0] == ids
    for k in (1, 2):  # other rows: cut wherever the string appears, untouched otherwise
        t = full.texts[k]
        assert g.texts[k] == (t[:t.index(stop) + len(stop)] if stop in t else t)


def test_stops_at_eos(tok):
    model = tiny_lm("llama", seed=12)
    free = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True))
    second = free.token_ids[0][3]
    model.generation_config.eos_token_id = [EOS, second]  # several EOS ids, as chat models have
    g = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0))
    assert g.token_ids[0] == free.token_ids[0][:free.token_ids[0].index(second) + 1]
    assert g.finish_reasons[0] == "eos"


def test_training_mode_is_restored_and_bad_config_is_a_user_error(tok):
    model = tiny_lm("llama").train()
    generate(model, tok, PROMPTS[:1], SamplingConfig(max_new_tokens=2, temperature=0))
    assert model.training
    for bad in (dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_new_tokens=0), dict(stop=[""])):
        with pytest.raises(UserError):
            SamplingConfig(**bad)
    with pytest.raises(UserError, match="engine"):
        generate(model, tok, PROMPTS, engine="tgi")


def test_vllm_missing_is_a_user_error(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError, match="pip install vllm"):
        generate("some/model", tok, ["hi"], SamplingConfig(), engine="vllm")


def test_vllm_adapter_maps_config_and_outputs(tok, monkeypatch):
    """A stand-in vllm module: checks the parameters we pass and how outputs are read back."""
    seen = {}

    class Logprob:
        def __init__(self, lp):
            self.logprob = lp

    class LLM:
        def __init__(self, model, seed=0):
            seen["model"] = model

        def get_tokenizer(self):
            return tok

        def generate(self, inputs, params):
            seen["inputs"], seen["params"] = inputs, params
            comp = lambda ids, reason, stop_reason: types.SimpleNamespace(
                token_ids=ids, text="x" * len(ids), finish_reason=reason, stop_reason=stop_reason,
                logprobs=[{t: Logprob(-0.5)} for t in ids])
            return [types.SimpleNamespace(outputs=[comp([5, 6], "stop", None), comp([7], "stop", "\n")]),
                    types.SimpleNamespace(outputs=[comp([8, 9, 10], "length", None), comp([2], "stop", 2)])]

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.5, top_p=0.9, n=2, stop=["\n"], seed=4)
    g = generate("some/model", None, [[1, 40], "the cat"], cfg, engine="vllm")
    p = seen["params"]
    assert (p["n"], p["temperature"], p["top_p"], p["top_k"], p["max_tokens"], p["stop"], p["seed"]) == \
        (2, 0.5, 0.9, -1, 3, ["\n"], 4)
    assert seen["inputs"][0] == {"prompt_token_ids": [1, 40]}
    assert g.token_ids == [[5, 6], [7], [8, 9, 10], [2]]
    assert g.finish_reasons == ["eos", "stop", "length", "eos"]
    assert g.logprobs[2] == [-0.5] * 3 and g.prompt_index == [0, 0, 1, 1]
