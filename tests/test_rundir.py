"""The run directory, through the real CLI: one run at a time (lock), never another tool's files or
another run written over, a finished run continued rather than retrained, atomic model saves, the
replaced run's outputs gone, rejects written once, SIGHUP and signals during the final save, and
file modes that follow the umask."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from prefalign.cli import main
from test_bad_inputs import digest_tree
from test_crash_resume import metrics, wait_for
from test_train import assert_same_weights, run_files, weights  # noqa: F401 (run_files: fixture)

# A real `prefalign train` process, slowed down (a sleep in each micro-step) so that it is still
# training while the test acts; patched from the command line, not through a hook in the library.
SLOW_CLI = ("import sys, time; import prefalign.step as t; f = t.micro_step; "
            "t.micro_step = lambda *a, **k: (time.sleep(1.0), f(*a, **k))[1]; "
            "from prefalign.cli import main; sys.exit(main(sys.argv[1:]))")
# SIGTERM to itself from inside the final model save.
TERM_IN_SAVE = ("import os, signal, sys; import prefalign.models as m; f = m.save_model; "
                "m.save_model = lambda *a, **k: (os.kill(os.getpid(), signal.SIGTERM), f(*a, **k))[1]; "
                "from prefalign.cli import main; sys.exit(main(sys.argv[1:]))")


def args_for(run_files, out, *extra, steps=4):
    return ["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--lr-schedule", "constant",
            "--max-length", "64", "--no-packing", "--no-progress", *extra]


def start(code, args):
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def cli(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def eight(run_files, tmp_path_factory):
    """An uninterrupted 8-step run."""
    out = tmp_path_factory.mktemp("eight") / "run"
    assert main(args_for(run_files, out, steps=8)) == 0
    return out


@pytest.fixture(scope="module")
def four(run_files, tmp_path_factory):
    """A finished 4-step run with the default --save-every 0."""
    out = tmp_path_factory.mktemp("four") / "run"
    assert main(args_for(run_files, out)) == 0
    return out


def copy_of(run, tmp_path, name="out"):
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def test_a_running_run_holds_its_directory_and_sighup_stops_it_with_a_checkpoint(run_files, eight, tmp_path,
                                                                                  capsys):
    out = tmp_path / "busy"
    proc = start(SLOW_CLI, args_for(run_files, out, "--save-every", "1", steps=8))
    wait_for(out / "checkpoints" / "step-000001" / "manifest.json", proc)
    # Neither a second run, nor --overwrite (which must never kill it), nor a resume gets in.
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        rc, err = cli(args_for(run_files, out, *extra, steps=8), capsys)
        assert rc == 2 and "Traceback" not in err, err
        assert f"prefalign: error: {out} is in use by pid {proc.pid}" in err
    assert proc.poll() is None, "the running run was disturbed"
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, err[-2000:]
    assert "Traceback" not in err and "signal SIGHUP; checkpoint saved" in err
    stopped_at = int(err.split("stopped at step ")[1].split(":")[0])
    assert 1 <= stopped_at < 8
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "manifest.json").exists()
    assert not (out / ".lock").exists() and not (out / "model").exists()
    # Released: the interrupted run continues to the same weights as an uninterrupted one.
    assert main(args_for(run_files, out, "--resume", "auto", steps=8)) == 0
    assert_same_weights(weights(eight), weights(out), atol=0)
    assert metrics(out) == metrics(eight)


def test_a_directory_of_another_tool_is_refused(run_files, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.9}\n')
    (out / "notes.txt").write_text("mine\n")
    before = digest_tree(out)
    rc, err = cli(args_for(run_files, out), capsys)
    assert rc == 2 and "Traceback" not in err
    assert f"{out} is not empty and holds no prefalign run (metrics.jsonl, notes.txt)" in err and "--overwrite" in err
    assert digest_tree(out) == before and sorted(os.listdir(out)) == ["metrics.jsonl", "notes.txt"]
    # A directory left by a failed start (only prefalign's own leftovers) is as good as empty.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "rejects.jsonl.new").write_text("{}\n")
    assert main(args_for(run_files, fresh, steps=1)) == 0
    assert not (fresh / "rejects.jsonl.new").exists()


def test_a_finished_run_continues_to_a_larger_max_steps_exactly(run_files, four, eight, tmp_path, capsys):
    out = copy_of(four, tmp_path)
    assert os.listdir(out / "checkpoints") == ["step-000004"], "--save-every 0: a checkpoint at the end"
    rc, err = cli(args_for(run_files, out, "--resume", "auto", steps=8), capsys)
    assert rc == 0 and "resumed from" in err and "(step 4)" in err
    assert_same_weights(weights(eight), weights(out), atol=0)
    assert metrics(out) == metrics(eight)
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))


def test_a_finished_run_without_a_larger_target_is_left_alone(run_files, four, tmp_path, capsys):
    out = copy_of(four, tmp_path)
    before = digest_tree(out)
    for steps in (4, 3):
        rc, err = cli(args_for(run_files, out, "--resume", "auto", steps=steps), capsys)
        assert rc == 0 and "Traceback" not in err
        assert f"{out}: the run already finished at step 4; nothing to do" in err
        assert digest_tree(out) == before and sorted(os.listdir(out)) == sorted(os.listdir(four))
    # A plain re-run is refused, and is told how to train further, not to "--resume auto" alone.
    rc, err = cli(args_for(run_files, out, steps=8), capsys)
    line = [x for x in err.splitlines() if x.startswith("prefalign: error:")]
    assert rc == 2 and len(line) == 1
    assert "finished at step 4; use --resume auto --max-steps N (N > 4)" in line[0] and "--overwrite" in line[0]
    assert digest_tree(out) == before


def test_resume_without_a_checkpoint_never_retrains_a_finished_run(run_files, four, tmp_path, capsys):
    out = copy_of(four, tmp_path)
    shutil.rmtree(out / "checkpoints")  # as a run made before the final checkpoint existed
    before = digest_tree(out)
    rc, err = cli(args_for(run_files, out, "--resume", "auto", steps=8), capsys)
    assert rc == 2 and "holds a finished run but no valid checkpoint" in err and "Traceback" not in err
    assert digest_tree(out) == before
    rc, err = cli(args_for(run_files, out, steps=8), capsys)  # nothing to resume: not suggested
    assert rc == 2 and "no checkpoint to continue from; use --overwrite" in err and "--resume" not in err
    assert digest_tree(out) == before
    # --overwrite says to replace it: a fresh start.
    rc, err = cli(args_for(run_files, out, "--resume", "auto", "--overwrite", steps=2), capsys)
    assert rc == 0 and "starting from step 0" in err and [r["step"] for r in metrics(out)] == [1, 2]
    # A new directory: --resume auto starts from step 0, as a job script's first attempt needs.
    rc, err = cli(args_for(run_files, tmp_path / "new", "--resume", "auto", steps=2), capsys)
    assert rc == 0 and "starting from step 0" in err


def test_resume_from_another_runs_checkpoint_never_replaces_a_run(run_files, four, tmp_path, capsys):
    out = copy_of(four, tmp_path)
    other = copy_of(four, tmp_path, "other")
    before = digest_tree(out)
    ckpt = str(other / "checkpoints" / "step-000004")
    rc, err = cli(args_for(run_files, out, "--resume", ckpt, steps=6), capsys)
    assert rc == 2 and f"resuming {ckpt} into it would replace it" in err and "Traceback" not in err
    assert digest_tree(out) == before
    assert main(args_for(run_files, out, "--resume", ckpt, "--overwrite", steps=6)) == 0
    assert os.listdir(out / "checkpoints") == ["step-000006"]
    assert [r["step"] for r in metrics(out)] == [5, 6]  # the replaced run's lines are gone


def test_a_failed_final_save_leaves_the_previous_model_whole(run_files, four, tmp_path, capsys, monkeypatch):
    """A full disk while writing the tokenizer: a clear error naming the path, and OUTPUT/model is
    still the previous, complete model (written to a temporary directory, renamed at the end)."""
    from transformers import PreTrainedTokenizerBase

    def full_disk(self, path, *a, **k):
        with open(os.path.join(path, "tokenizer.json"), "w") as fh:
            fh.write('{"trunc')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "tokenizer.json"))

    out = copy_of(four, tmp_path)
    model_before = digest_tree(out / "model")
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    rc, err = cli(args_for(run_files, out, "--resume", "auto", steps=6), capsys)
    assert rc == 2 and "Traceback" not in err
    assert f"could not save the model to {out}/model: No space left on device" in err
    assert digest_tree(out / "model") == model_before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")], "no temporary left behind"


def test_overwrite_removes_the_replaced_runs_outputs(run_files, four, tmp_path):
    out = copy_of(four, tmp_path)
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_bytes(b"old")
    (out / "tb").mkdir()
    (out / "rejects.jsonl").write_text('{"row": 1}\n')
    assert main(args_for(run_files, out, "--overwrite", "--no-save-model", steps=2)) == 0
    for gone in ("model", "merged", "tb", "rejects.jsonl"):
        assert not (out / gone).exists(), gone
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert os.listdir(out / "checkpoints") == ["step-000002"]
    assert (out / "plots" / "loss.png").exists()


def test_rejects_are_written_once(run_files, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    shutil.copy(run_files["data"], data)
    with open(data, "a") as fh:
        fh.write('{"prompt": "p"}\n')
    out = tmp_path / "o"
    argv = args_for(run_files, out, "--data", str(data), "--on-bad-row", "skip", "--save-every", "1", steps=2)
    assert main(argv) == 0
    assert main([*argv, "--resume", "auto", "--max-steps", "3"]) == 0
    lines = (out / "rejects.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["row"] == 17
    # A failing --overwrite run keeps the old run's file as it was; its own rejects are named in the error.
    before = digest_tree(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    rc, err = cli(args_for(run_files, out, "--data", str(bad), "--on-bad-row", "skip", "--overwrite"), capsys)
    assert rc == 2 and f"see {out}/rejects.jsonl.new" in err
    assert {k: v for k, v in digest_tree(out).items() if k in before} == before
    assert len((out / "rejects.jsonl.new").read_text().splitlines()) == 2


def test_sigterm_during_the_final_save_finishes_it_and_says_so(run_files, tmp_path, capsys):
    out = tmp_path / "t"
    proc = start(TERM_IN_SAVE, args_for(run_files, out, steps=2))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert "signal SIGTERM during the final save; the save completed (model and checkpoint at step 2)" in err
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["trainer"]["finished"] is True
    rc, err = cli(args_for(run_files, out, "--resume", "auto", steps=2), capsys)
    assert rc == 0 and "already finished at step 2" in err


def test_weights_files_follow_the_umask(run_files, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(args_for(run_files, tmp_path / "u", steps=1)) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "u" / "model" / "model.safetensors",
             tmp_path / "u" / "checkpoints" / "step-000001" / "weights.safetensors",
             tmp_path / "u" / "checkpoints" / "step-000001" / "optim.pt",
             tmp_path / "u" / "model" / "tokenizer.json"]
    for f in files:
        assert oct(os.stat(f).st_mode & 0o777) == oct(0o644), f


def test_a_bad_row_under_two_processes_is_one_line(run_files, tmp_path):
    """Every rank meets the bad row; rank 0 alone says so, and the launcher adds nothing."""
    data = tmp_path / "d.jsonl"
    shutil.copy(run_files["data"], data)
    with open(data, "a") as fh:
        fh.write('{"prompt": "p"}\n')
    proc = subprocess.run([sys.executable, "-m", "prefalign.cli", *args_for(run_files, tmp_path / "o", "--data",
                                                                            str(data), "--num-processes", "2")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines == [f"prefalign: error: {data}, row 17, field 'chosen': missing field 'chosen'; the row has prompt"], \
        proc.stderr[-3000:]
