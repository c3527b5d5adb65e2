"""The both-drop alarm on a fixed monitor set: the statistic (pure), its state, and three real
runs - weights that do not move never fire it, the overtrained both-drop experiment does, and
--both-drop-stop ends with a model, a checkpoint and exit status 3."""

import json
import os

import pytest

from prefalign import cli, monitor
from prefalign.experiments import both_drop
from prefalign.cli import main
from test_train import run_files  # noqa: F401 (fixture)


def scores(chosen, margin):
    return {"chosen": list(chosen), "margin": list(margin)}


START = scores([-1.0, -1.2, -0.8, -1.1], [0.0, 0.5, -0.5, 0.2])


def test_unchanged_scores_never_fire_even_with_no_threshold():
    stat = monitor.both_drop(START, START, threshold=0.0)
    assert stat == {"chosen_drop": 0.0, "chosen_drop_se": 0.0, "margin_growth": 0.0, "margin_growth_se": 0.0,
                    "fired": False}


def test_fires_when_chosen_falls_beyond_threshold_and_noise_while_margin_grows():
    now = scores([c - 1.0 for c in START["chosen"]], [m + 2.0 for m in START["margin"]])
    stat = monitor.both_drop(START, now, threshold=0.5)
    assert stat["fired"] and stat["chosen_drop"] == pytest.approx(1.0) and stat["margin_growth"] == pytest.approx(2.0)
    assert stat["chosen_drop_se"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("case, chosen_shift, margin_shift, threshold", [
    ("drop below the threshold", [0.4] * 4, [2.0] * 4, 0.5),
    ("margin shrank", [1.0] * 4, [-1.0] * 4, 0.5),
    ("chosen rose", [-1.0] * 4, [2.0] * 4, 0.5),
    # mean drop 0.75 > 0.5, but all of it is one pair's 3 nats: 3 se = 2.25 nats of noise
    ("drop within its noise", [3.0, 0.0, 0.0, 0.0], [2.0] * 4, 0.5),
    # the margin grew on average, but only by one pair's swing
    ("margin growth within its noise", [1.0] * 4, [8.0, -2.0, -2.0, -2.0], 0.5),
])
def test_does_not_fire(case, chosen_shift, margin_shift, threshold):
    now = scores([c - d for c, d in zip(START["chosen"], chosen_shift)],
                 [m + g for m, g in zip(START["margin"], margin_shift)])
    assert not monitor.both_drop(START, now, threshold)["fired"], case


def test_monitor_baseline_fires_once_and_state_round_trips():
    items = [type("Item", (), {"source": "d.jsonl", "row": r})() for r in range(1, 5)]
    m = monitor.BothDropMonitor(items, "training", threshold=0.5, every=10)
    assert m.due(10) and m.due(20) and not m.due(5)
    record, fired = m.observe(0, START)
    assert not fired and m.start == START and record["monitor/chosen_drop"] == 0.0
    bad = scores([c - 1.0 for c in START["chosen"]], [g + 2.0 for g in START["margin"]])
    record, fired = m.observe(10, bad)
    assert fired and m.fired_at == 10
    assert record["monitor/logps_chosen"] == pytest.approx(sum(bad["chosen"]) / 4)
    assert record["monitor/margins"] == pytest.approx(sum(bad["margin"]) / 4)
    assert "BOTH-DROP ALARM" in m.message(10, record) and "4 fixed training pairs" in m.message(10, record)
    assert m.observe(20, bad)[1] is False  # once
    again = monitor.BothDropMonitor(items, "training", 0.5, 10, json.loads(json.dumps(m.state())))
    assert again.start == START and again.fired_at == 10
    other = monitor.BothDropMonitor(items[:3], "training", 0.5, 10, m.state())
    assert other.start is None  # another set (data changed on an allowed resume): a new baseline


def test_monitor_set_is_held_out_else_a_seeded_training_sample():
    train, held = list(range(100)), list(range(1000, 1010))
    assert monitor.pick(train, held, 32, seed=0) == (held, "held-out")
    a, src = monitor.pick(train, [], 32, seed=0)
    assert src == "training" and len(a) == 32 and len(set(a)) == 32 and a == sorted(a)
    assert monitor.pick(train, [], 32, seed=0)[0] == a and monitor.pick(train, [], 32, seed=1)[0] != a
    assert monitor.pick(train[:10], [], 32, seed=0)[0] == train[:10]


# ------------------------------------------------------------------------------------- real runs


def test_weights_that_do_not_move_never_fire(run_files, tmp_path, capsys):
    """lr 1e-12: the weights do not change. The old alarm stopped such a run at step 2 (a later
    mini-batch of other examples, against step 1's margin of exactly 0)."""
    out = tmp_path / "still"
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
               "--max-steps", "8", "--batch-size", "4", "--lr", "1e-12", "--max-length", "64", "--no-progress",
               "--monitor-every", "1", "--monitor-pairs", "8", "--both-drop-stop"])
    assert rc == 0 and "BOTH-DROP" not in capsys.readouterr().err
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(1, 9))
    for r in lines:
        assert "alarm/both_drop" not in r
        assert abs(r["monitor/chosen_drop"]) < 1e-6 and abs(r["monitor/margin_growth"]) < 1e-5
    # the training mini-batches, by contrast, differ from step to step
    assert len({round(r["logps/chosen_mean"], 4) for r in lines}) > 1


@pytest.fixture(scope="module")
def both_drop_experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("bd")
    out = root / "both-drop"
    assert cli.main(["experiment", "both-drop", "--quick", "--output", str(out)]) == 0
    return root, out


def test_the_both_drop_experiment_fires(both_drop_experiment):
    _, out = both_drop_experiment
    summary = json.loads((out / "summary.json").read_text())
    fired = summary["alarm_step"]
    assert fired is not None and 0 < fired <= summary["steps"]
    lines = [json.loads(x) for x in open(out / "dpo" / "metrics.jsonl")]
    at = next(r for r in lines if r.get("alarm/both_drop"))
    assert at["step"] == fired
    assert at["monitor/chosen_drop"] > max(0.5, monitor.Z * at["monitor/chosen_drop_se"])
    assert at["monitor/margin_growth"] > monitor.Z * at["monitor/margin_growth_se"]
    # it fired on a real fall: both summed log-probs ended below their start
    for key in ("logps/chosen", "logps/rejected"):
        assert lines[-1][key] < lines[0][key], key


def test_both_drop_stop_saves_the_model_and_exits_3(both_drop_experiment, capsys):
    """The experiment's training run through the CLI with --both-drop-stop: it stops at the step
    the alarm fires, with a checkpoint and the model written, and a non-zero status."""
    root, exp = both_drop_experiment
    summary = json.loads((exp / "summary.json").read_text())
    sft = root / "_start" / "sft" / "model"  # the experiments' shared SFT start, next to their outputs
    out = root / "stop"
    capsys.readouterr()
    rc = main(["train", "--model", str(sft), "--data", str(exp / "data" / "pairs_subset.jsonl"), "--output", str(out),
               "--max-length", "16", "--beta", str(both_drop.BETA), "--lr", str(both_drop.LR_QUICK),
               "--lr-schedule", "constant", "--batch-size", "8", "--max-steps", str(summary["steps"]),
               "--monitor-every", str(both_drop.EVERY_QUICK // 3),
               "--both-drop-stop", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == cli.BOTH_DROP_EXIT == 3
    fired = summary["alarm_step"]
    assert f"stopped at step {fired}: both-drop alarm" in err and "model in" in err and "Traceback" not in err
    assert (out / "model" / "model.safetensors").is_file()
    assert os.listdir(out / "checkpoints") == [f"step-{fired:06d}"]
    assert json.loads(open(out / "metrics.jsonl").readlines()[-1])["step"] == fired
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "exits with status 3" in " ".join(capsys.readouterr().out.split())  # documented in the flag's help
