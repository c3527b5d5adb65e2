"""Data parallel: 2 CPU processes (gloo, launched by `prefalign train --num-processes 2`, i.e.
through accelerate's launcher) train exactly like 1 process with the same global batch, with
plain data parallel and with FSDP; DeepSpeed, which the loop cannot drive yet, is refused."""

import json
import os
import subprocess
import sys

import pytest

from prefalign import trainer
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
    one = trainer.train(cfg_for(run_files, tmp_path / "one", max_steps=3, batch_size=4,
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
    trainer.train(cfg_for(run_files, tmp_path / "one", loss="kto", max_steps=3, batch_size=4, packing=True))
    a, b = metrics(tmp_path / "one"), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), (ra["step"], k)
    assert a[2]["kl"] != 0
    assert_same_weights(weights(tmp_path / "one"), weights(two), atol=1e-5)


def _launch(args, out, timeout=300, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, "-m", "prefalign.cli", "train", *args, "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_same_metrics(a, b, keys=None):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k == "rewards/accuracies" and ra["step"] == 1:  # rounding noise at margin 0, see above
                continue
            if (keys is None or k in keys) and k not in TIMING and isinstance(v, float):
                assert rb[k] == pytest.approx(v, abs=1e-5), (ra["step"], k)


_ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}


@pytest.mark.parametrize("packing, route", [("--packing", "flag"), ("--no-packing", "deepspeed-zero2")])
def test_fsdp_two_processes_equal_one(run_files, tmp_path, packing, route):
    """FSDP (weights, gradients, AdamW state and the reference copy sharded over 2 gloo processes)
    trains like 1 plain process with the same global batch: every metric of 3 steps and the final
    weights (gathered from the shards) within 1e-5. Packed rows with `--sharding fsdp`; padded
    batches under a DeepSpeed ZeRO-2 launcher config, i.e. FSDP keeping weights gathered from
    forward to backward."""
    common = ["--model", run_files["model"], "--data", run_files["data"], "--lr", "1e-3", "--lr-schedule",
              "constant", "--max-steps", "3", "--max-length", "64", "--no-progress", "--seed", "0", packing,
              "--batch-size", "2", "--num-processes", "2"]
    if route == "flag":  # with held-out evaluation at the end: every rank scores all eval pairs
        common += ["--eval-data", run_files["eval"]]
        proc = _launch([*common, "--sharding", "fsdp"], tmp_path / "two")
        assert "FSDP (--sharding fsdp): weights, gradients and optimizer state sharded over 2 processes" in proc.stderr
    else:
        proc = _launch(common, tmp_path / "two", **_ZERO2)
        assert "FSDP (accelerate DeepSpeed ZeRO-2 config, run as its FSDP equivalent)" in proc.stderr
        assert "stay gathered until its backward" in proc.stderr
    trainer.train(cfg_for(run_files, tmp_path / "one", max_steps=3, batch_size=4, reference="copy",
                        packing=packing == "--packing", eval_data=run_files["eval"] if route == "flag" else ""))
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    _assert_same_metrics(a, b)
    if route == "flag":
        assert "eval/rewards/margins" in b[-1] and b[-1]["eval/loss"] == pytest.approx(a[-1]["eval/loss"], abs=1e-5)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)


def test_fsdp_checkpoint_resume(run_files, tmp_path, capsys):
    """Under FSDP a checkpoint holds the gathered weights and optimizer state: 2 steps, then
    --resume auto to 4, ends where an uninterrupted 1-process run of 4 steps ends (KTO: its KL
    reference point across sharded ranks too)."""
    common = ["--model", run_files["model"], "--data", run_files["data"], "--lr", "1e-3", "--lr-schedule",
              "constant", "--max-length", "64", "--no-progress", "--seed", "0", "--loss", "kto",
              "--batch-size", "2", "--num-processes", "2", "--sharding", "fsdp", "--save-every", "2"]
    out = tmp_path / "two"
    _launch([*common, "--max-steps", "2"], out)
    assert os.path.isdir(out / "checkpoints" / "step-000002")
    # Its optimizer state is keyed by name: resuming it without FSDP is refused, not mis-loaded.
    plain = common[:common.index("--num-processes")] + ["--save-every", "2", "--sharding", "none"]  # not config.yaml's
    assert main(["train", *plain, "--output", str(out), "--max-steps", "4", "--resume", "auto"]) == 2
    assert "was written with FSDP; resume it with --sharding fsdp" in capsys.readouterr().err
    proc = _launch([*common, "--max-steps", "4", "--resume", "auto"], out)
    assert "resumed from" in proc.stderr
    trainer.train(cfg_for(run_files, tmp_path / "one", loss="kto", max_steps=4, batch_size=4))
    a, b = metrics(tmp_path / "one"), metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    _assert_same_metrics(a, b, keys={"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"})
    assert_same_weights(weights(tmp_path / "one"), weights(out), atol=1e-5)


def test_fsdp_needs_processes_and_refuses_lora(run_files, tmp_path, capsys):
    base = ["train", "--model", run_files["model"], "--data", run_files["data"], "--no-progress",
            "--sharding", "fsdp"]
    assert main([*base, "--output", str(tmp_path / "a")]) == 2
    assert "sharding (--sharding fsdp) needs several processes" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b"), "--lora-r", "4"]) == 2
    assert "LoRA is not supported" in capsys.readouterr().err


def test_fsdp_launcher_config_selects_fsdp(run_files, tmp_path, monkeypatch, capsys):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` sets ACCELERATE_USE_FSDP:
    --sharding auto follows it (here in one process, which FSDP refuses: proof it was chosen)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--no-progress",
               "--output", str(tmp_path / "a")])
    assert rc == 2 and "sharding (accelerate FSDP config) needs several processes" in capsys.readouterr().err
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--no-progress",
               "--output", str(tmp_path / "b"), "--sharding", "none", "--max-steps", "1"])
    assert rc == 0


@pytest.mark.parametrize("env, want", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, (True, False)),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, (False, False)),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, (True, True)),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}, (False, False)),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, (True, True)),
    ({}, None),
])
def test_launcher_configs_map_to_a_sharding_plan(monkeypatch, env, want):
    """accelerate's FSDP and DeepSpeed configs reach the trainer as environment variables; each maps
    to FSDP's (reshard after forward, offload) or to plain data parallel (None)."""
    from prefalign import config, sharding

    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = sharding.plan(config.build({"sharding": "auto"}))
    assert (None if got is None else (got.reshard_after_forward, got.offload)) == want
    assert sharding.plan(config.build({"sharding": "none"})) is None


def test_deepspeed_config_runs_as_fsdp(run_files, tmp_path, monkeypatch, capsys):
    """A DeepSpeed ZeRO-3 launcher config selects the FSDP path (one process: refused, which proves it)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output",
               str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "accelerate DeepSpeed ZeRO-3 config, run as its FSDP equivalent" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_accelerate_configs_parse():
    """The shipped launcher configs are valid YAML naming the distributed type their file says."""
    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate")
    want = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED",
            "deepspeed_zero3.yaml": "DEEPSPEED"}
    for name, kind in want.items():
        with open(os.path.join(root, name)) as fh:
            assert yaml.safe_load(fh)["distributed_type"] == kind, name


def test_the_reported_rank_is_the_cause_not_the_ranks_the_launcher_stopped():
    """A launch where rank 1 aborted (-6) and the launcher then stopped rank 0 (SIGTERM, -15) names
    rank 1; a rank's own UserError (exit 2 with its message) wins over both; a plain exit beats signals."""
    from types import SimpleNamespace as F

    from prefalign.cli import first_failure

    def fail(code, t, said=False):
        return F(exitcode=code, timestamp=t, message="bad row" if said else "",
                 error_file_data={"prefalign": True} if said else {})

    assert first_failure({0: fail(-15, 5), 1: fail(-6, 5)})[0] == 1
    assert first_failure({0: fail(-15, 5), 1: fail(-6, 6), 2: fail(1, 7)})[0] == 2
    assert first_failure({0: fail(-6, 5), 1: fail(2, 6, said=True)})[0] == 1
    assert first_failure({0: fail(-6, 6), 1: fail(-11, 5)})[0] == 1  # the earlier of two aborts
    assert first_failure({0: fail(-15, 5), 1: fail(-9, 5)})[0] == 0
