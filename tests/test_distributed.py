"""Data parallel: 2 CPU processes (gloo, launched by `prefalign train --num-processes 2`, i.e.
through accelerate's launcher) train exactly like 1 process with the same global batch; sharded
launchers (FSDP, DeepSpeed), which the loop cannot drive correctly yet, are refused."""

import json
import os
import subprocess
import sys

import pytest

from prefalign import train
from prefalign.cli import main
from test_train import assert_same_weights, cfg_for, run_files, weights  # noqa: F401 (run_files: fixture)

TIMING = ("pairs_per_s", "tokens_per_s", "peak_memory_mb")


def metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def test_two_processes_equal_one(run_files, tmp_path):
    """2 processes x batch 2 == 1 process x batch 4: the same loss and metrics each step, the same
    weights at the end. The 2-process run also uses the precomputed reference, whose one pass over
    the data is split across the ranks; the 1-process run uses a live frozen copy."""
    common = ["--model", run_files["model"], "--data", run_files["data"], "--lr", "1e-3", "--lr-schedule",
              "constant", "--max-steps", "3", "--max-length", "64", "--no-progress", "--seed", "0", "--no-packing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "prefalign.cli", "train", *common, "--output", str(two),
                           "--batch-size", "2", "--num-processes", "2", "--reference", "precomputed"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 3 steps") == 1  # one summary, from rank 0
    one = train.train(cfg_for(run_files, tmp_path / "one", max_steps=3, batch_size=4,
                              reference="copy"))
    assert one.steps == 3
    a, b = metrics(tmp_path / "one"), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            # Step 1 runs before any update: policy == reference, every margin is 0 up to rounding,
            # and the accuracy (margin > 0) counts rounding noise; it is compared from step 2 on.
            if k == "rewards/accuracies" and ra["step"] == 1:
                continue
            if k not in TIMING and isinstance(v, float):
                assert rb[k] == pytest.approx(v, abs=1e-5), (ra["step"], k)
    assert_same_weights(weights(tmp_path / "one"), weights(two), atol=1e-5)


def test_kto_two_processes_equal_one(run_files, tmp_path):
    """KTO's KL reference point is estimated over the whole step and all-reduced: 2 processes x
    batch 2 == 1 process x batch 4, loss, KL and weights (live reference copy, packed rows)."""
    common = ["--model", run_files["model"], "--data", run_files["data"], "--lr", "1e-3", "--lr-schedule",
              "constant", "--max-steps", "3", "--max-length", "64", "--no-progress", "--seed", "0", "--loss", "kto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "prefalign.cli", "train", *common, "--output", str(two),
                           "--batch-size", "2", "--num-processes", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train.train(cfg_for(run_files, tmp_path / "one", loss="kto", max_steps=3, batch_size=4, packing=True))
    a, b = metrics(tmp_path / "one"), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), (ra["step"], k)
    assert a[2]["kl"] != 0
    assert_same_weights(weights(tmp_path / "one"), weights(two), atol=1e-5)


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launchers_are_refused(run_files, tmp_path, monkeypatch, capsys, var):
    """Under FSDP or DeepSpeed the loop would bypass the wrapper: a clear error, not a wrong run."""
    monkeypatch.setenv(var, "true")
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output",
               str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not support" in err and "docs/distributed.md" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_accelerate_configs_parse():
    """The shipped launcher configs are valid YAML naming the distributed type their file says."""
    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate")
    want = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED",
            "deepspeed_zero3.yaml": "DEEPSPEED"}
    for name, kind in want.items():
        with open(os.path.join(root, name)) as fh:
            assert yaml.safe_load(fh)["distributed_type"] == kind, name
