"""Model, checkpoint and cache files that are damaged or do not fit, and OS errors on user paths,
through the real CLI: each is exit 2 and one `prefalign: error:` line naming the file and what is
wrong (never a traceback, never a run on random or wrong weights), or, for a damaged cache or an
auto-resume, a one-line notice and a correct fallback.

OS errors are simulated by monkeypatching (the tests run as root, whom chmod does not stop):
each raises what the real call raises for a full disk, a read-only file system or a denied path.
"""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prefalign.cli import main
from test_train import assert_same_weights, weights, write_pairs
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("io")
    # Qwen2's tokenizer class adds <|endoftext|> (id 320) on loading: its model gets 336 rows.
    for name, arch, hidden, vocab in (("model", "llama", 32, 320), ("wide", "llama", 64, 320),
                                      ("tied", "qwen2", 32, 336)):
        make_model(arch, seed=0, hidden_size=hidden, vocab_size=vocab).save_pretrained(d / name)
        make_tokenizer().save_pretrained(d / name)
    return {"dir": d, "model": str(d / "model"), "wide": str(d / "wide"), "tied": str(d / "tied"),
            "data": write_pairs(d / "pairs.jsonl", 8)}


def train_args(files, out, *extra, model=None):
    return ["train", "--model", model or files["model"], "--data", files["data"], "--output", str(out),
            "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--max-length", "64", "--no-packing",
            "--no-progress", *extra]


def run(args, capsys):
    """(exit code, the prefalign lines on stderr, all of stderr)."""
    rc = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return rc, [line for line in err.splitlines() if line.startswith("prefalign")], err


def one_error(args, capsys, *expect):
    rc, lines, err = run(args, capsys)
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("prefalign: error: "), lines
    for s in expect:
        assert s in lines[0], (s, lines[0])
    return lines[0]


def copy_model(files, tmp_path, name="model"):
    dst = tmp_path / f"copy-{name}"
    shutil.copytree(files[name], dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Model files: the policy and the reference


def drop_tensor(model_dir, name):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("role", ["policy", "reference"])
def test_a_missing_tensor_is_refused_not_initialised(files, tmp_path, capsys, role):
    bad = copy_model(files, tmp_path)
    drop_tensor(bad, "model.layers.1.mlp.down_proj.weight")
    args = (train_args(files, tmp_path / "o", model=str(bad)) if role == "policy"
            else train_args(files, tmp_path / "o", "--ref-model", str(bad), "--reference", "copy"))
    one_error(args, capsys, f"{bad}: the weights file lacks model.layers.1.mlp.down_proj.weight",
              "random values")
    assert not os.path.exists(tmp_path / "o" / "model")


def test_tied_output_weights_are_not_missing(files, tmp_path, capsys):
    """Qwen2's lm_head is tied to the embeddings and not stored: the run trains normally."""
    assert "lm_head.weight" not in load_file(os.path.join(files["tied"], "model.safetensors"))
    rc, lines, _ = run(train_args(files, tmp_path / "o", model=files["tied"]), capsys)
    assert rc == 0 and lines == []
    assert os.path.isfile(tmp_path / "o" / "model" / "model.safetensors")


def test_config_vocab_size_that_does_not_match_the_weights(files, tmp_path, capsys):
    bad = copy_model(files, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["vocab_size"] = 400
    (bad / "config.json").write_text(json.dumps(config))
    one_error(train_args(files, tmp_path / "o", model=str(bad)), capsys,
              f"{bad}: lm_head.weight has shape [320, 32] in the weights but [400, 32] in config.json")


@pytest.mark.parametrize("damage", ["truncated", "empty", "header"])
def test_damaged_safetensors_model_file(files, tmp_path, capsys, damage):
    bad = copy_model(files, tmp_path)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "header": data[:12] + b"\xff\xfe" + data[14:]}[damage])
    one_error(train_args(files, tmp_path / "o", model=str(bad)), capsys,
              f"{bad}: the safetensors weights are truncated or corrupted")


def test_tokenizer_ids_beyond_the_embeddings_are_refused_before_the_first_step(files, tmp_path, capsys):
    bad = copy_model(files, tmp_path)
    tok = make_tokenizer()
    tok.add_tokens(["<extra_a>", "<extra_b>", "<extra_c>"])  # ids 320..322, the model has 320 rows
    tok.save_pretrained(bad)
    one_error(train_args(files, tmp_path / "o", model=str(bad)), capsys,
              "the tokenizer has ids up to 322", f"the model {bad} has only 320 embedding rows")
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")  # refused before any step


# ---------------------------------------------------------------------------------------------
# Checkpoints: a run with checkpoints after steps 1 and 2, damaged in ways the manifest alone
# does not catch, or resumed into a model of another shape.


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "run"
    assert main(train_args(files, out, "--save-every", "1")) == 0
    return out


def damaged_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, out / "checkpoints" / "step-000002"


def rewrite(ck, name, data: bytes):
    """Replace a checkpoint file and make the manifest agree (as a buggy writer would)."""
    from prefalign.checkpoint import MANIFEST, _digest

    (ck / name).write_bytes(data)
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": _digest(ck / name)}
    (ck / MANIFEST).write_text(json.dumps(manifest))


MANIFESTS = {
    "a list": "[]",
    "files a list": '{"step": 2, "files": []}',
    "bytes missing": '{"step": 2, "files": {"weights.safetensors": {"sha256": "x"}}}',
    "no files listed": '{"step": 2, "files": {}}',
}
CONTENTS = {  # file -> (new bytes, words of the error)
    "state.json": (b'{"step": 2}', "state.json is damaged (missing or wrong step"),
    "state.json ": (b'{"step": 2, "trainer"', "state.json is damaged"),
    "optim.pt": (b"PK\x03\x04 not a torch archive", "optim.pt is damaged"),
    "weights.safetensors": (b"", "weights.safetensors is damaged"),
}


@pytest.mark.parametrize("case", list(MANIFESTS) + list(CONTENTS))
def test_damaged_checkpoint_named_is_an_error_and_auto_falls_back(files, finished, tmp_path, capsys, case):
    out, ck = damaged_copy(finished, tmp_path)
    if case in MANIFESTS:
        (ck / "manifest.json").write_text(MANIFESTS[case])
        words = "manifest" if case != "no files listed" else "the manifest does not list"
    else:
        data, words = CONTENTS[case]
        rewrite(ck, case.strip(), data)
    one_error(train_args(files, out, "--resume", str(ck), "--max-steps", "3"), capsys,
              f"cannot resume from {ck}", words)
    # auto: skip it, say why, and continue from step 1's checkpoint to the same end.
    rc, lines, err = run(train_args(files, out, "--resume", "auto", "--max-steps", "2"), capsys)
    assert rc == 0 and lines == [], err[-2000:]
    assert f"skipping checkpoint {ck}" in err and "step-000001 (step 1)" in err
    assert_same_weights(weights(finished), weights(out), atol=0)


def test_resume_into_a_model_of_another_shape(files, finished, tmp_path, capsys):
    """A hidden-32 checkpoint into a hidden-64 model: the first mismatched tensor, both shapes."""
    ck = finished / "checkpoints" / "step-000002"
    one_error(train_args(files, tmp_path / "o", "--resume", str(ck), "--max-steps", "3", model=files["wide"]),
              capsys, f"checkpoint {ck} does not match this model: ",
              "has shape [320, 32] in the checkpoint, [320, 64] in the model")


# ---------------------------------------------------------------------------------------------
# The precomputed reference's cache


def cache_files(cache):
    return [os.path.join(cache, f) for f in os.listdir(cache) if f.startswith("ref-")]


@pytest.fixture(scope="module")
def fresh_cache(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    assert main(train_args(files, d / "run", "--reference", "precomputed", "--cache-dir", str(d / "cache"))) == 0
    [path] = cache_files(d / "cache")
    return {"run": d / "run", "cache": d / "cache", "tensors": load_file(path), "bytes": open(path, "rb").read()}


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped bit", "other tensors"])
def test_damaged_reference_cache_is_recomputed(files, fresh_cache, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    shutil.copytree(fresh_cache["cache"], cache)
    [path] = cache_files(cache)
    data = fresh_cache["bytes"]
    if damage == "other tensors":  # a well-formed safetensors file of the right name, wrong content
        save_file({"values": torch.zeros(3, 2)}, path)
    else:
        cut = {"truncated": data[: len(data) - 9], "empty": b""}
        # The last byte belongs to the last count: flipped, the file still parses, but lies.
        cut["flipped bit"] = data[:-1] + bytes([data[-1] ^ 1])
        open(path, "wb").write(cut[damage])
    rc, lines, err = run(train_args(files, tmp_path / "run", "--reference", "precomputed", "--cache-dir",
                                    str(cache)), capsys)
    assert rc == 0 and lines == [], err[-2000:]
    notices = [line for line in err.splitlines() if "reference cache" in line]
    assert len(notices) == 1 and f"reference cache {path} is damaged" in notices[0]
    assert notices[0].endswith("recomputing it")
    recomputed = load_file(path)
    for k in ("values", "counts"):  # the same numbers as a fresh cache, bit for bit
        assert torch.equal(recomputed[k], fresh_cache["tensors"][k]), k
    assert_same_weights(weights(fresh_cache["run"]), weights(tmp_path / "run"), atol=0)


def test_intact_cache_is_used_without_a_notice(files, fresh_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(fresh_cache["cache"], cache)
    rc, _, err = run(train_args(files, tmp_path / "run", "--reference", "precomputed", "--cache-dir",
                                str(cache)), capsys)
    assert rc == 0 and "damaged" not in err


# ---------------------------------------------------------------------------------------------
# OS errors on user paths


def raising_for(path_part, err_no, real):
    """A stand-in for `real` that raises OSError(err_no) for paths containing path_part."""
    def fake(path, *a, **k):
        if path_part in str(path):
            raise OSError(err_no, os.strerror(err_no), str(path))
        return real(path, *a, **k)
    return fake


def test_permission_denied_on_the_data_file(files, tmp_path, capsys, monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "open", raising_for("pairs.jsonl", errno.EACCES, builtins.open))
    one_error(train_args(files, tmp_path / "o"), capsys, f"{files['data']}: permission denied")


def test_output_parent_is_a_file(files, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    one_error(train_args(files, tmp_path / "afile" / "run"), capsys, f"{tmp_path / 'afile'} is a file")


def test_read_only_file_system(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "makedirs", raising_for("ro-out", errno.EROFS, os.makedirs))
    one_error(train_args(files, tmp_path / "ro-out"), capsys, f"{tmp_path / 'ro-out'}: read-only file system")


def test_disk_full_during_a_checkpoint_leaves_no_half_checkpoint(files, tmp_path, capsys, monkeypatch):
    import prefalign.checkpoint as checkpoint

    def full(tensors, path, *a, **k):  # what safetensors raises when the disk fills up
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                              f'path "{os.path.dirname(path)}/.tmpAbC123"')

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "o"
    one_error(train_args(files, out, "--save-every", "1"), capsys,
              f"{out / 'checkpoints' / 'step-000001'}: no space left on device")
    assert os.listdir(out / "checkpoints") == []  # neither the temporary nor a final step-000001
    assert not os.path.exists(out / "model")


def test_disk_full_on_a_write_that_names_no_file_names_the_output(files, tmp_path, capsys, monkeypatch):
    """A write that fails at flush has no filename: the line names the run's output directory."""
    from prefalign.metrics import MetricsLog

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MetricsLog, "write", full)
    one_error(train_args(files, tmp_path / "o"), capsys, f"{tmp_path / 'o'}: no space left on device")


def test_cache_dir_permission_denied(files, tmp_path, capsys, monkeypatch):
    import prefalign.reference as reference

    def denied(tensors, path, *a, **k):
        raise SafetensorError(f'Error while serializing: I/O error: Permission denied (os error 13) at '
                              f'path "{os.path.dirname(path)}/.tmpAbC123"')

    monkeypatch.setattr(reference, "save_file", denied)
    cache = tmp_path / "cache"
    line = one_error(train_args(files, tmp_path / "o", "--reference", "precomputed", "--cache-dir", str(cache)),
                     capsys, f"{cache}/ref-", "cannot write the reference cache: permission denied")
    assert "--cache-dir" in line and os.listdir(cache) == []  # no half-written cache file


def test_cache_dir_that_is_a_file_is_refused_before_the_reference_pass(files, tmp_path, capsys, monkeypatch):
    import prefalign.reference as reference

    def no_pass(*a, **k):
        raise AssertionError("the reference pass ran before the cache dir was checked")

    monkeypatch.setattr(reference.ModelReference, "pair_logps", no_pass)
    (tmp_path / "afile").write_text("x")
    one_error(train_args(files, tmp_path / "o", "--reference", "precomputed", "--cache-dir", str(tmp_path / "afile")),
              capsys, f"--cache-dir {tmp_path / 'afile'}: exists and is not a directory")
