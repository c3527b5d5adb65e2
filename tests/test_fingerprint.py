"""The run fingerprint: a resume that would silently change the run is refused, an allowed change
is applied and recorded, `--resume auto` needs only --output, and an update that makes the
weights non-finite is never saved. Real CLI runs on the tiny model."""

import json
import os
import shutil

import pytest
import torch
import yaml

from prefalign import checkpoint, config, fingerprint, trainer
from prefalign.cli import main
from prefalign.errors import UserError
from test_train import assert_same_weights, cfg_for, run_files, weights, write_pairs  # noqa: F401 (run_files: fixture)
from tiny import make_model, make_tokenizer

TIMING = ("pairs_per_s", "tokens_per_s", "peak_memory_mb")


def base_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--output", str(out), "--max-steps", "4", "--batch-size", "4",
            "--lr", "1e-3", "--lr-schedule", "constant", "--max-length", "64", "--no-packing", "--no-progress",
            "--save-every", "2", *extra]


def metrics(out):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in open(os.path.join(out, "metrics.jsonl"))]


def snapshot(out):
    """What a refused resume must leave untouched."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, out)] = open(p, "rb").read()
    return files


@pytest.fixture(scope="module")
def finished(run_files, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) and a second model to swap in."""
    d = tmp_path_factory.mktemp("fp")
    other = d / "other_model"
    make_model("llama", seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    swapped = d / "swapped.jsonl"
    with open(swapped, "w") as fh:
        for line in open(run_files["data"]):
            row = json.loads(line)
            fh.write(json.dumps({**row, "chosen": row["rejected"], "rejected": row["chosen"]}) + "\n")
    out = d / "run"
    assert main(base_args(run_files["model"], run_files["data"], out)) == 0
    return {"out": out, "other_model": str(other), "swapped": str(swapped)}


@pytest.mark.parametrize("change, shown", [
    (["--lr", "2e-3"], "lr: 0.001 -> 0.002"),
    (["--batch-size", "8"], "pairs_per_step: 4 -> 8"),
    (["--loss", "ipo"], "loss: 'dpo' -> 'ipo'"),
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--data", "SWAPPED"], "data/sha256: "),
    (["--model", "OTHER"], "model/sha256: "),
])
def test_changed_resume_is_refused_listing_the_difference(run_files, finished, tmp_path, capsys, change, shown):
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out)
    before = snapshot(out)
    change = [{"SWAPPED": finished["swapped"], "OTHER": finished["other_model"]}.get(c, c) for c in change]
    args = base_args(run_files["model"], run_files["data"], out, "--resume", "auto", "--max-steps", "6")
    if change[0] in args:  # replace the flag's value, keep everything else as the original run had it
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += change
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("prefalign: error:")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert "cannot resume from" in line[0] and "step-000004" in line[0] and shown in line[0], line[0]
    assert "--resume-changes allow" in line[0]
    if change[0] != "--batch-size":
        assert "pairs_per_step" not in line[0]  # only what differs is listed
    assert snapshot(out) == before, "a refused resume changes nothing"


def test_swapped_in_place_data_is_refused(run_files, tmp_path, capsys):
    """Same path, chosen and rejected swapped inside the file: only the content digest tells."""
    data = tmp_path / "pairs.jsonl"
    shutil.copy(run_files["data"], data)
    out = tmp_path / "run"
    assert main(base_args(run_files["model"], str(data), out)) == 0
    rows = [json.loads(x) for x in open(data)]
    data.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume", "auto", "--max-steps", "6"]) == 2
    changed = capsys.readouterr().err.split("the run changed (")[1].split(")")[0]
    assert changed.startswith("data/sha256: ") and ";" not in changed  # the path is the same: only the content


def test_allowed_changes_are_applied_logged_and_recorded(run_files, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out)
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume", "auto", "--max-steps", "6", "--lr", "2e-3",
                 "--resume-changes", "allow"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changes (--resume-changes allow): lr: 0.001 -> 0.002" in err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["model"] == run_files["model"] and saved["max_steps"] == 6
    assert saved["history"] == [{"step": 4, "changes": {"lr": [0.001, 0.002]}}]
    lrs = {r["step"]: r["lr"] for r in metrics(out)}
    assert lrs[4] == 0.001 and lrs[5] == 0.002 and lrs[6] == 0.002  # really applied, not only written down
    # The next leg continues the changed run as it is now: nothing differs, the history stays.
    assert main(["train", "--output", str(out), "--resume", "auto", "--max-steps", "8"]) == 0
    again = yaml.safe_load((out / "config.yaml").read_text())
    assert again["lr"] == 0.002 and again["max_steps"] == 8 and again["history"] == saved["history"]
    assert "resuming with changes" not in capsys.readouterr().err


def test_resume_auto_with_only_output_equals_uninterrupted(run_files, tmp_path):
    """A crash after step 3; `prefalign train --output O --resume auto` takes the rest from
    O/config.yaml and ends bit-identical to a run that was never interrupted (monitor included)."""
    extra = ("--max-steps", "6", "--save-every", "3", "--monitor-every", "2", "--eval-data", run_files["eval"])
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(base_args(run_files["model"], run_files["data"], full, *extra)) == 0
    assert main(base_args(run_files["model"], run_files["data"], part, *extra)) == 0
    shutil.rmtree(part / "checkpoints" / "step-000006")
    shutil.rmtree(part / "model")
    assert main(["train", "--output", str(part), "--resume", "auto"]) == 0
    assert_same_weights(weights(full), weights(part), atol=0)
    got, want = metrics(part), metrics(full)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6, 6]  # 6 twice: the step's line and the final eval
    assert got == want
    assert "monitor/chosen_drop" in got[5] and "monitor/chosen_drop" not in got[4]


def test_checkpoint_without_fingerprint_resumes_with_a_warning(run_files, finished, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(finished["out"], out)
    ck = out / "checkpoints" / "step-000004"
    state = json.loads((ck / "state.json").read_text())
    del state["trainer"]["fingerprint"]  # as an older prefalign wrote it
    (ck / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"bytes": os.path.getsize(ck / "state.json"),
                                       "sha256": checkpoint._digest(str(ck / "state.json"))}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume", "auto", "--max-steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "has no run fingerprint" in err and "resumed from" in err


# ------------------------------------------------------------------------------------- the function


def test_fingerprint_fields(run_files, tmp_path):
    a = config.build(dict(model=run_files["model"], data=run_files["data"], output="a", lr=1e-3))
    fp = fingerprint.of_run(a)
    # Where it writes, how long and how often it logs/saves, and the micro-batch layout are free to change.
    b = config.build(dict(model=run_files["model"], data=run_files["data"], output="b", lr=1e-3, max_steps=50,
                          log_every=5, save_every=3, packing=False, batch_size=2, grad_accum=2, monitor_every=0))
    assert fingerprint.differences(fp, fingerprint.of_run(b)) == {}
    assert fingerprint.differences(fp, fingerprint.of_run(a, world=2)) == {"pairs_per_step": [4, 8]}
    c = config.build(dict(model=run_files["model"], data=run_files["data"], output="a", lr=1e-3, beta=0.2,
                          reference="precomputed"))
    assert fingerprint.differences(fp, fingerprint.of_run(c)) == {"beta": [0.1, 0.2],
                                                                  "reference": ["auto", "precomputed"]}
    # A field one side does not know (another prefalign version) cannot be compared.
    assert fingerprint.differences({**fp, "new_field": 1}, fp) == {}
    assert fp["data/sha256"] == fingerprint.file_digest(run_files["data"]) and len(fp["data/sha256"]) == 64
    # Files count by content: the same data moved elsewhere is the same run; other content is not.
    moved = tmp_path / "moved.jsonl"
    shutil.copy(run_files["data"], moved)
    assert fingerprint.differences(fp, fingerprint.of_run(config.build(
        dict(model=run_files["model"], data=str(moved), output="a", lr=1e-3)))) == {}
    other = write_pairs(tmp_path / "other.jsonl", 16, seed=5)
    diff = fingerprint.differences(fp, fingerprint.of_run(config.build(
        dict(model=run_files["model"], data=other, output="a", lr=1e-3))))
    assert list(diff) == ["data", "data/sha256"] and diff["data"] == [run_files["data"], other]
    assert fingerprint.describe(diff).startswith(f"data: {run_files['data']!r} -> {other!r}; data/sha256: ")
    assert fingerprint.file_digest("org/some-hub-model") == "name:org/some-hub-model"


def test_model_identity(tmp_path):
    d = tmp_path / "m"
    make_model("llama", seed=0).save_pretrained(d)
    before = fingerprint.file_digest(str(d))
    original = (d / "config.json").read_text()
    (d / "config.json").write_text(json.dumps({**json.loads(original), "rope_theta": 1234.0}))
    assert fingerprint.file_digest(str(d)) != before
    (d / "config.json").write_text(original)
    assert fingerprint.file_digest(str(d)) == before
    # Weights files are sampled (size, first and last MiB): cheap for GB models, and a retrained
    # checkpoint differs there. Here: the last bytes of the tensor data.
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 1
    w.write_bytes(bytes(data))
    assert fingerprint.file_digest(str(d)) != before
    # In-process models: their config and weight shapes.
    small, other = make_model("llama", seed=0), make_model("llama", seed=1)
    assert fingerprint.model_digest(small) == fingerprint.model_digest(other)  # same architecture
    changed = make_model("llama", seed=0)
    changed.config.rope_theta = 99.0
    assert fingerprint.model_digest(changed) != fingerprint.model_digest(small)


# ------------------------------------------------------------------------------------- non-finite update


def test_nonfinite_update_is_never_saved(run_files, tmp_path, monkeypatch):
    """The loss and gradient are finite but the update is not (here forced: the optimizer writes
    a NaN into one weight at its third step): the run stops with one error naming the step, the
    last good checkpoint stays the newest, and no model is written."""
    real_step = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *a, **k):
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "o"
    with pytest.raises(UserError) as e:
        trainer.train(cfg_for(run_files, out, max_steps=6, save_every=2))
    msg = str(e.value)
    assert msg.startswith("step 3: the update made the weights non-finite") and "no model written" in msg
    assert "last good checkpoint is kept" in msg
    assert not (out / "model").exists()
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out / "checkpoints"))] == ["step-000002"]
    saved = checkpoint.read(str(out / "checkpoints" / "step-000002"))[0]
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_infinite_weight_decay_through_an_unvalidated_config(run_files, tmp_path):
    """A config that skipped validation (weight_decay inf) cannot produce an all-NaN model either."""
    cfg = cfg_for(run_files, tmp_path / "o", max_steps=3)
    cfg.weight_decay = float("inf")
    with pytest.raises(UserError, match="step 1: the update made the weights non-finite"):
        trainer.train(cfg)
    assert not (tmp_path / "o" / "model").exists()
