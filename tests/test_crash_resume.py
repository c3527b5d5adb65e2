"""Crash and resume, signals, damaged checkpoints and the non-finite guard, through real runs.

A real `prefalign train` subprocess is killed with SIGKILL mid-run (after its step-3 checkpoint)
and resumed with --resume auto; it must end with the same weights and the same metrics.jsonl as
an uninterrupted run: no step lost, none repeated. SIGTERM must save and exit cleanly. The
subprocess gets a short sleep in each micro-step (patched in from the command line, not a test
hook in the library), so the kill lands mid-run rather than after a finished run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from prefalign.cli import main
from test_train import assert_same_weights, run_files, weights, write_pairs  # noqa: F401 (run_files: fixture)
from tiny import make_model, make_tokenizer

TIMING = ("pairs_per_s", "tokens_per_s", "peak_memory_mb")
SLOW_CLI = ("import sys, time; import prefalign.step as t; f = t.micro_step; "
            "t.micro_step = lambda *a, **k: (time.sleep(0.25), f(*a, **k))[1]; "
            "from prefalign.cli import main; sys.exit(main(sys.argv[1:]))")


def args_for(run_files, out, *extra):
    # 16 pairs, 4 per step: 8 steps are two epochs, so the resumed run also crosses an epoch boundary.
    return ["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
            "--max-steps", "8", "--batch-size", "4", "--lr", "1e-3", "--lr-schedule", "cosine",
            "--warmup-steps", "2", "--max-length", "64", "--no-packing", "--no-progress", "--save-every", "3",
            *extra]


def metrics(out):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in open(os.path.join(out, "metrics.jsonl"))]


def start_slow(args):
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(run_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(args_for(run_files, out)) == 0
    return out


def test_sigkill_then_resume_equals_uninterrupted(run_files, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start_slow(args_for(run_files, out))
    wait_for(out / "checkpoints" / "step-000003", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists(), "killed mid-run: no final model yet"
    rc = main(args_for(run_files, out, "--resume", "auto"))
    assert rc == 0
    assert_same_weights(weights(uninterrupted), weights(out), atol=0)
    got, want = metrics(out), metrics(uninterrupted)
    assert [r["step"] for r in got] == list(range(1, 9))  # no step lost or repeated
    assert got == want


def test_sigterm_saves_and_exits_cleanly(run_files, uninterrupted, tmp_path):
    out = tmp_path / "term"
    proc = start_slow(args_for(run_files, out))
    wait_for(out / "checkpoints" / "step-000003", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "signal SIGTERM; checkpoint saved" in err
    stopped_at = int(err.split("stopped at step ")[1].split(":")[0])
    assert 3 <= stopped_at < 8
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "manifest.json").exists()
    assert main(args_for(run_files, out, "--resume", "auto")) == 0
    assert_same_weights(weights(uninterrupted), weights(out), atol=0)
    assert metrics(out) == metrics(uninterrupted)


def test_damaged_checkpoints(run_files, uninterrupted, tmp_path, capsys):
    """Explicit path: a clear error. auto: fall back to the previous valid one, saying so."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)  # checkpoints step-6 and step-8 (keep 2)
    ck = out / "checkpoints"
    assert sorted(os.listdir(ck)) == ["step-000006", "step-000008"]
    weights_file = ck / "step-000008" / "weights.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])  # truncated
    for spec, problem in ((ck / "step-000008", "truncated"), (ck / "step-000099", "not found")):
        assert main(args_for(run_files, out, "--resume", str(spec))) == 2
        err = capsys.readouterr().err
        assert f"cannot resume from {spec}" in err and problem in err and "Traceback" not in err
    weights_file.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit flipped
    assert main(args_for(run_files, out, "--resume", str(ck / "step-000008"))) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    # A half-written checkpoint of a killed save (no manifest yet) is never picked either.
    os.makedirs(ck / "step-000009")
    assert main(args_for(run_files, out, "--resume", "auto", "--max-steps", "8")) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-000009" in err and "step-000008" in err
    assert "resumed from" in err and "step-000006 (step 6)" in err
    assert_same_weights(weights(uninterrupted), weights(out), atol=0)
    assert metrics(out) == metrics(uninterrupted)


def test_truncated_metrics_line_of_a_killed_run(run_files, uninterrupted, tmp_path):
    """SIGKILL can cut metrics.jsonl mid-line: the resume drops the cut line and rewrites the step."""
    import shutil

    out = tmp_path / "cut"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "checkpoints" / "step-000008")
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[: len(text) - 40])  # step 8's line cut short
    assert main(args_for(run_files, out, "--resume", "auto")) == 0
    assert metrics(out) == metrics(uninterrupted)


# ---------------------------------------------------------------------------------------------
# The non-finite guard: a model whose embedding of one token is NaN gives a NaN loss exactly on
# the rows that contain that token. The token is a plain character ("~"), not a special token:
# data text is tokenized as text, so a special-token string in a row never reaches its id.
POISON = "~"
POISON_ID = make_tokenizer().encode(POISON, add_special_tokens=False)[0]

@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("nan") / "model"
    model = make_model("llama", seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[POISON_ID] = float("nan")
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return str(d)


def poison(path, rows):
    """Put the NaN token into the chosen text of the given 1-based rows."""
    lines = open(path).read().splitlines()
    for r in rows:
        row = json.loads(lines[r - 1])
        row["chosen"] += POISON
        lines[r - 1] = json.dumps(row)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def test_nonfinite_step_is_skipped_and_logged(nan_model, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    poison(data, [5])
    out = tmp_path / "o"
    rc = main(["train", "--model", nan_model, "--data", data, "--output", str(out), "--max-steps", "4",
               "--batch-size", "4", "--lr", "1e-3", "--max-length", "64", "--no-progress", "--log-every", "10"])
    assert rc == 0
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    bad = [r for r in lines if "nonfinite/rows" in r]
    assert len(bad) == 1, "one epoch: the poisoned row is in exactly one step (logged despite log_every)"
    assert f"{data}:5" in bad[0]["nonfinite/rows"] and len(bad[0]["nonfinite/rows"]) == 4
    assert bad[0]["loss"] is None
    assert lines[-1]["step"] == 4 and lines[-1]["nonfinite/skipped_steps"] == 1
    # The skipped update did not poison the weights: only the NaN embedding row itself is NaN.
    w = load_file(out / "model" / "model.safetensors")
    for name, t in w.items():
        if "embed_tokens" in name:
            t = torch.cat([t[:POISON_ID], t[POISON_ID + 1:]])
        assert torch.isfinite(t).all(), name


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(nan_model, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    poison(data, range(1, 17))
    out = tmp_path / "o"
    rc = main(["train", "--model", nan_model, "--data", data, "--output", str(out), "--max-steps", "4",
               "--batch-size", "4", "--max-length", "64", "--no-progress", "--max-nonfinite", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "stopped after 2 non-finite steps in a row (step 2); checkpoint saved" in err
    assert os.path.isfile(out / "checkpoints" / "step-000002" / "manifest.json")
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]
