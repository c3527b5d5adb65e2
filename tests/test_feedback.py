"""Feedback during a run (the start summary, eval lines, phase progress, a quiet log file) and
fast, precise failure on a mistyped local path (no hub request is ever made for one)."""

import json
import os
import socket
import warnings

import pytest

from prefalign import cli, config, metrics, models, prepare
from prefalign.cli import main
from test_train import write_pairs
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("feedback")
    make_model("llama", seed=0).save_pretrained(d / "model")
    make_tokenizer().save_pretrained(d / "model")
    data = write_pairs(d / "prefs.jsonl", 16)
    with open(data, "a") as fh:  # two bad rows: skipped under --on-bad-row skip
        fh.write(json.dumps({"prompt": "a", "chosen": " same", "rejected": " same"}) + "\n")
        fh.write(json.dumps({"prompt": "b", "chosen": " x"}) + "\n")
    return {"dir": d, "model": str(d / "model"), "data": data, "eval": write_pairs(d / "eval.jsonl", 6, seed=1)}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (hub, datasets) fails the test: a typo must never reach the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_summary_eval_lines_and_reference_progress(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFALIGN_VERBOSE", raising=False)
    out = tmp_path / "run"
    rc = main(["train", "--model", files["model"], "--data", files["data"], "--eval-data", files["eval"],
               "--eval-every", "2", "--output", str(out), "--max-steps", "4", "--batch-size", "4",
               "--max-length", "24", "--on-bad-row", "skip", "--reference", "precomputed", "--lr", "1e-3"])
    assert rc == 0
    err = capsys.readouterr().err
    lines = err.splitlines()

    # The numbers, recomputed from the data independently of the run.
    cfg = config.build(dict(model=files["model"], data=files["data"], output=str(tmp_path / "x"), max_length=24,
                            on_bad_row="skip", batch_size=4))
    items, stats = prepare.load_items(cfg, make_tokenizer(), files["data"], "paired", None, log=lambda m: None)
    assert len(items) == 16 and stats["skipped"] == 2 and stats["truncated"] > 0
    n_params = sum(p.numel() for p in make_model("llama", seed=0).parameters())
    tokens = 4 * sum(len(i.prompt_ids) + len(i.chosen_ids) + len(i.rejected_ids) for i in items) / 16
    assert f"data: 16 rows used, 2 skipped, {stats['truncated']} truncated" in lines
    run = next(line for line in lines if line.startswith("run: "))
    assert run.startswith("run: 4 steps of 4 pairs (batch 4 x accum 1 x 1 processes), "
                          f"~{tokens:.0f} tokens/step, {n_params:,} of {n_params:,} parameters trainable (100.00%)")
    assert run.endswith("precision fp32, reference precomputed")
    # Printed once, before the first step; the reference pass's progress before it, ending complete.
    assert sum(line.startswith("run: ") for line in lines) == 1
    assert lines.index(run) < next(i for i, line in enumerate(lines) if line.startswith("step 1/4"))
    ref = [line for line in lines if line.startswith("reference: ")]
    assert ref and ref[-1].startswith("reference: 22/22") and lines.index(ref[-1]) < lines.index(run)

    # The periodic eval (step 2; step 4 is the final eval) on the console, the same figures as metrics.jsonl.
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    at2 = next(r for r in records if r["step"] == 2)
    eval_lines = [line for line in lines if line.startswith("eval at step")]
    assert eval_lines == [f"eval at step 2: loss {at2['eval/loss']:.4g}  rewards/accuracies "
                          f"{at2['eval/rewards/accuracies']:.4g}  rewards/margins {at2['eval/rewards/margins']:.4g}"]
    # Third-party loading and saving bars are hidden.
    assert "Loading weights" not in err and "Writing model shards" not in err and "not sharded" not in err


@pytest.mark.parametrize("total, start, expected", [
    (100, 0, list(range(5, 101, 5))),      # about 20 lines, not 100
    (7, 0, list(range(1, 8))),             # a short run: every step
    (250, 200, list(range(204, 251, 12)) + [250]),  # resumed: same cadence, and the last step
])
def test_plain_console_logs_every_nth_step_and_the_last(total, start, expected, capsys):
    console = metrics.Console(total, True, start)
    for step in range(start + 1, total + 1):
        console.update(step, {"loss": 0.5})
    console.close()
    printed = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().err.splitlines()]
    assert printed == expected


def test_phase_progress_plain_lines(capsys):
    phase = metrics.Phase("reference", 95, True)
    for _ in range(19):
        phase(5)
    phase.close()
    done = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().err.splitlines()]
    assert done[-1] == 95 and 5 <= len(done) <= 11 and done == sorted(done)
    off = metrics.Phase("reference", 95, False)
    off(95)
    assert capsys.readouterr().err == ""


def test_loading_is_quiet_unless_verbose(files, capsys, monkeypatch):
    monkeypatch.delenv("PREFALIGN_VERBOSE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with models.quiet_third_party():
            warnings.warn("old API", FutureWarning)
        models.load_model(files["model"])
    assert not caught and "Loading weights" not in capsys.readouterr().err
    # -v (a top-level flag) shows them again.
    seen = []
    monkeypatch.setattr(cli, "cmd_losses", lambda args: seen.append(os.environ.get("PREFALIGN_VERBOSE")))
    assert main(["-v", "losses"]) == 0
    assert seen == ["1"] and "PREFALIGN_VERBOSE" not in os.environ  # set for the command, put back after
    monkeypatch.setenv("PREFALIGN_VERBOSE", "1")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with models.quiet_third_party():
            warnings.warn("old API", FutureWarning)
        models.load_model(files["model"])
    assert [str(w.message) for w in caught] == ["old API"]
    assert "Loading weights" in capsys.readouterr().err


def _fails(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_mistyped_paths_fail_at_once_with_a_suggestion(files, tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.chdir(files["dir"])
    out = ["--output", str(tmp_path / "o"), "--no-progress"]
    line = _fails(["train", "--model", "model", "--data", "prefs.jsonll", *out], capsys)
    assert line == "prefalign: error: prefs.jsonll: file not found; did you mean prefs.jsonl?"
    line = _fails(["train", "--model", "modle", "--data", "prefs.jsonl", *out], capsys)
    assert line == "prefalign: error: no such model directory 'modle' (a hub id looks like owner/name); did you mean model?"
    # A bare word with no local near miss may be one of the hub's legacy ids ("gpt2"): it goes to the
    # hub, unless the hub is off, where it fails at once.
    from prefalign import models

    models._check_source("gpt2", "model")  # not refused here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _fails(["train", "--model", "tinyy", "--data", "prefs.jsonl", *out], capsys)
    assert line == "prefalign: error: no such model directory 'tinyy' (a hub id looks like owner/name)"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    line = _fails(["train", "--model", "./modle", "--data", "prefs.jsonl", *out], capsys)
    assert line == "prefalign: error: model path not found: ./modle; did you mean ./model?"
    line = _fails(["train", "--model", "model", "--data", "sub/dir/prefs.csv", *out], capsys)
    assert line == "prefalign: error: sub/dir/prefs.csv: file not found"


def test_offline_hub_id_not_in_cache_fails_at_once(files, tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _fails(["train", "--model", "nobody-here/no-such-model-42", "--data", files["data"],
                   "--output", str(tmp_path / "o")], capsys)
    assert line == ("prefalign: error: model nobody-here/no-such-model-42: no such directory, and HF_HUB_OFFLINE "
                    "is set and the hub cache does not hold it")


def test_cli_train_hides_only_the_known_third_party_warnings(capsys, monkeypatch):
    monkeypatch.delenv("PREFALIGN_VERBOSE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        assert main(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--lr", "nan"]) == 2
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("some other FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other FutureWarning"]


@pytest.mark.parametrize("name, local", [
    ("prefs.jsonll", True), ("./tinyy", True), ("~/x", True), ("/abs/x", True), ("a/b/c", True),
    ("model.gguf", True), ("Qwen/Qwen2.5-0.5B", False), ("HuggingFaceH4/ultrafeedback_binarized", False),
    ("org/name.v2", False), ("imdb", False), ("meta-llama/Llama-3.1-8B", False),
])
def test_what_looks_like_a_local_path(name, local):
    from prefalign import paths

    assert paths.looks_local(name) is local
