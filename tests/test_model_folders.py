"""LoRA output folders and checkpoints load as models in every command: eval, generate, audit
and train --model give the same numbers as the final (merged) model."""

import json
import os

import pytest

from prefalign.cli import main
from tiny import make_model, make_tokenizer
from test_train import write_pairs

STEPS = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--no-progress", "--max-length", "64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("folders")
    os.chdir(d)  # the base model is given by a RELATIVE path: the adapter must still load from elsewhere
    try:
        make_model("llama", seed=0).save_pretrained(d / "base")
        make_tokenizer().save_pretrained(d / "base")
        data, held = write_pairs(d / "pairs.jsonl", 16), write_pairs(d / "eval.jsonl", 6, seed=1)
        assert main(["train", "--model", "base", "--data", data, "--output", "lora", "--lora-r", "4",
                     "--merge-lora", *STEPS]) == 0
        assert main(["train", "--model", "base", "--data", data, "--output", "full", *STEPS]) == 0
    finally:
        os.chdir(request.config.invocation_params.dir)
    return {"dir": d, "base": str(d / "base"), "data": data, "eval": held}


def _checkpoint(run):
    root = run / "checkpoints"
    return str(root / sorted(os.listdir(root))[-1])


def _eval(runs, model, name):
    out = runs["dir"] / f"{name}.json"
    assert main(["eval", "--model", model, "--ref-model", runs["base"], "--data", runs["eval"],
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _generate(runs, model, name):
    out = runs["dir"] / f"{name}.jsonl"
    assert main(["generate", "--model", model, "--prompts", runs["eval"], "--output", str(out),
                 "--temperature", "0", "--max-new-tokens", "6"]) == 0
    return [json.loads(line)["completion"] for line in out.read_text().splitlines()]


def test_adapter_stores_an_absolute_base(runs):
    cfg = json.loads((runs["dir"] / "lora" / "model" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == runs["base"]
    assert not (runs["dir"] / "lora" / "model" / "config.json").exists()


@pytest.mark.parametrize("which", ["lora adapter", "lora checkpoint", "full checkpoint"])
def test_eval_and_generate_equal_the_final_model(runs, which):
    d = runs["dir"]
    final = str(d / ("full/model" if which.startswith("full") else "lora/merged"))
    folder = {"lora adapter": str(d / "lora" / "model"), "lora checkpoint": _checkpoint(d / "lora"),
              "full checkpoint": _checkpoint(d / "full")}[which]
    want, got = _eval(runs, final, "want"), _eval(runs, folder, "got")
    assert want["rewards/margins"] != pytest.approx(0, abs=1e-4)  # trained: not the base again
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert _generate(runs, folder, "got") == _generate(runs, final, "want")


def test_audit_and_train_take_an_adapter(runs, capsys):
    d = runs["dir"]
    adapter = str(d / "lora" / "model")
    assert main(["audit", runs["eval"], "--model", adapter, "--json", str(d / "audit.json")]) == 0
    assert main(["audit", runs["eval"], "--model", str(d / "lora" / "merged"), "--json", str(d / "audit2.json")]) == 0
    a, b = (json.loads((d / f).read_text()) for f in ("audit.json", "audit2.json"))
    margins = [[m["sum"] for m in r["checks"]["reference"]["margins"]] for r in (a, b)]
    assert len(margins[0]) == 6 and margins[0] == pytest.approx(margins[1], abs=1e-4)
    # train further from the adapter folder (SFT on top of the merged weights)
    assert main(["sft", "--model", adapter, "--data", runs["data"], "--output", str(d / "more"),
                 "--max-steps", "1", "--batch-size", "4", "--no-progress", "--max-length", "64"]) == 0


def test_a_checkpoint_without_its_run_config_is_refused(runs, tmp_path, capsys):
    import shutil

    lone = tmp_path / "x" / "checkpoints" / "step-000001"
    shutil.copytree(_checkpoint(runs["dir"] / "full"), lone)
    assert main(["eval", "--model", str(lone), "--ref-model", runs["base"], "--data", runs["eval"]]) == 2
    assert "config.yaml" in capsys.readouterr().err
