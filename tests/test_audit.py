"""prefalign audit: planted problems are found with exact counts, a clean file stays quiet, reference
margins equal a direct log-prob computation, exit codes and the JSON report."""

import json
import random

import pytest
import torch

from prefalign.audit import Thresholds, run_audit
from prefalign.audit_checks import binom_two_sided, margin_stats, paired_length_stats
from prefalign.cli import main
from prefalign.data.formats import load_examples
from prefalign.data.tokenize import tokenize_examples
from tiny import make_model, make_tokenizer

WORDS = ("river stone maple quiet lantern copper harbor violet orchard thunder meadow pencil saddle glacier "
         "velvet compass marble falcon prairie ember willow basket cobalt meteor tundra garnet canyon whistle "
         "saffron beacon quartz ripple thistle juniper anchor gravel nectar summit hollow bramble cinder "
         "fathom lagoon mosaic plume quiver rustle sparrow timber umber vessel wander yonder zephyr").split()


def sent(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def clean_rows(n, seed=0):
    """Distinct random pairs; chosen is the longer one in exactly every other pair; no style markers."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        p, a, b = sent(rng, 10), sent(rng, 16), sent(rng, 16)
        if len(a) == len(b):
            b = b[:-1] + " now."
        lo, hi = sorted((a, b), key=len)
        c, r = (hi, lo) if i % 2 == 0 else (lo, hi)
        rows.append({"prompt": p, "chosen": c, "rejected": r})
    return rows


def planted_rows():
    rng = random.Random(1)
    rows = clean_rows(20, seed=1)                      # rows 1-20
    for _ in range(12):                                # rows 21-32: chosen = rejected-sized text + filler
        rows.append({"prompt": sent(rng, 10), "chosen": sent(rng, 14) + " " + sent(rng, 30),
                     "rejected": sent(rng, 14)})
    rows += [dict(rows[0]) for _ in range(3)] + [dict(rows[1])]  # rows 33-36: exact duplicates of 1, 2
    near = dict(rows[2])
    near["chosen"] = near["chosen"].upper() + "  "     # row 37: near duplicate of 3 (case, whitespace)
    rows.append(near)
    near = dict(rows[3])
    near["rejected"] = near["rejected"].replace(" ", "  ", 1).replace("e", "a", 1)  # row 38: of 4, an edit
    rows.append(near)
    rows += [{"prompt": "Same?", "chosen": "Yes indeed.", "rejected": "Yes indeed."}] * 2  # 39-40: identical
    rows.append({"prompt": sent(rng, 8), "chosen": "Paris is the capital.",          # 41: identical up to case
                 "rejected": "paris is the capital."})
    for _ in range(2):                                 # rows 42-45: two contradictions
        p, a, b = sent(rng, 8), sent(rng, 12), sent(rng, 12)
        rows += [{"prompt": p, "chosen": a, "rejected": b}, {"prompt": p, "chosen": b, "rejected": a}]
    for _ in range(6):                                 # rows 46-51: header + bold only in chosen
        rows.append({"prompt": sent(rng, 8), "chosen": "## Answer\n**" + sent(rng, 14) + "**",
                     "rejected": sent(rng, 16)})
    for _ in range(5):                                 # rows 52-56: apologies only in rejected
        rows.append({"prompt": sent(rng, 8), "chosen": sent(rng, 14), "rejected": "I'm sorry, " + sent(rng, 12)})
    rows.append({"prompt": "x", "chosen": "y"})        # row 57: no rejected
    rows.append({"prompt": "x", "choosen": "y", "rejected": "z"})  # row 58: misnamed field
    return rows


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("audit"), "planted.jsonl", planted_rows())
    return run_audit(path)


def test_planted_counts_and_fields(planted):
    c = planted["counts"]
    assert (c["rows"], c["loaded"], c["skipped"]) == (58, 54, 4)
    assert c["skipped_identical"] == 2
    assert {r["row"] for r in c["skipped_rows"]} == {39, 40, 57, 58}
    by_row = {r["row"]: r for r in c["skipped_rows"]}
    assert by_row[57]["field"] == "rejected" and "missing field 'rejected'" in by_row[57]["reason"]
    assert "rename it to 'chosen'" in by_row[58]["reason"]


def test_planted_duplicates_identical_contradictions(planted):
    ch = planted["checks"]
    assert ch["duplicates"]["exact"]["groups"] == 2
    assert ch["duplicates"]["exact"]["extra_rows"] == 4
    assert ch["duplicates"]["exact"]["examples"] == [[1, 33, 34, 35], [2, 36]]
    assert ch["duplicates"]["near"]["extra_rows"] == 2
    assert sorted(ch["duplicates"]["near"]["examples"]) == [[3, 37], [4, 38]]
    assert ch["identical"] == {"exact": 2, "normalized": 1, "normalized_rows": [41]}
    assert ch["contradictions"]["pairs"] == 2
    assert ch["contradictions"]["rows_involved"] == 4
    assert sorted(ch["contradictions"]["examples"]) == [[42, 43], [44, 45]]


def test_planted_length_bias_and_style(planted):
    lb = planted["checks"]["length_bias"]
    assert lb["chosen_at_least_2x"] == 12 and lb["rejected_at_least_2x"] == 0
    assert lb["share_chosen_longer"] > 0.6 and lb["sign_test_p"] < 0.05
    st = planted["checks"]["style_markers"]
    for marker in ("markdown_header", "bold"):
        assert (st[marker]["count_chosen"], st[marker]["count_rejected"]) == (6, 0)
        assert st[marker]["pairs_only_chosen"] == 6 and st[marker]["only_in_chosen"]
    assert (st["apology"]["count_chosen"], st["apology"]["count_rejected"]) == (0, 5)
    assert st["apology"]["ratio"] == 0.0
    for marker in ("list", "code_block", "emoji", "exclamation"):
        assert st[marker]["count_chosen"] == st[marker]["count_rejected"] == 0
    checks = {w["check"] for w in planted["warnings"]}
    assert checks == {"fields", "length_bias", "duplicates/exact", "duplicates/near", "identical",
                      "contradictions", "style/markdown_header", "style/bold", "style/apology"}


def test_clean_file_is_quiet(tmp_path):
    report = run_audit(write(tmp_path, "clean.jsonl", clean_rows(30)))
    assert report["warnings"] == []
    ch = report["checks"]
    assert ch["length_bias"]["share_chosen_longer"] == 0.5
    assert ch["duplicates"]["exact"]["extra_rows"] == ch["duplicates"]["near"]["extra_rows"] == 0
    assert ch["contradictions"]["pairs"] == 0 and ch["identical"]["normalized"] == 0
    assert "truncation: skipped (no tokenizer; pass --tokenizer or --model)" in report["notes"]


def test_thresholds_are_flags(tmp_path):
    path = write(tmp_path, "p.jsonl", planted_rows())
    relaxed = Thresholds(length_share=0.9, max_skipped=0.5, max_duplicates=0.5, max_identical=0.5,
                         max_contradictions=0.5, style_min_count=7)
    assert run_audit(path, thresholds=relaxed)["warnings"] == []


def test_unpaired_contradictions_and_length(tmp_path):
    rng = random.Random(3)
    rows = []
    for i in range(12):
        good = i % 2 == 0
        rows.append({"prompt": sent(rng, 6), "completion": sent(rng, 20 if good else 5), "label": good})
    rows += [{"prompt": "Q?", "completion": "A.", "label": True}, {"prompt": "Q?", "completion": "A.", "label": False}]
    report = run_audit(write(tmp_path, "u.jsonl", rows))
    assert report["kind"] == "unpaired"
    assert report["checks"]["contradictions"]["pairs"] == 1
    assert report["checks"]["contradictions"]["examples"] == [[13, 14]]
    assert report["checks"]["length_bias"]["point_biserial"] > 0.5
    assert {"length_bias", "contradictions"} <= {w["check"] for w in report["warnings"]}


def test_truncation_with_tokenizer(tmp_path):
    long = " fox" * 60
    rows = [{"prompt": "Question: What is 2 + 2?", "chosen": " 4", "rejected": " 5"},
            {"prompt": "Question: What is 2 + 2?", "chosen": long + " jumps", "rejected": long + " sleeps"},
            {"prompt": "Hello there!", "chosen": " Hello." + long, "rejected": " Hi."}]
    report = run_audit(write(tmp_path, "t.jsonl", rows), tokenizer=make_tokenizer(), max_length=32)
    tr = report["checks"]["truncation"]
    assert (tr["truncated"], tr["dropped"], tr["truncated_rows"]) == (2, 0, [2, 3])
    assert tr["identical_after_truncation"] == 1 and tr["identical_after_truncation_rows"] == [2]
    assert any(w["check"] == "truncation" for w in report["warnings"])


def direct_logp(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    n = len(prompt_ids)
    return sum(logp[n + i - 1, t].item() for i, t in enumerate(completion_ids)), len(completion_ids)


def test_reference_margins_equal_direct_logprobs(tmp_path):
    rng = random.Random(5)
    rows = [{"prompt": "Question: What is 2 + 2? Answer:", "chosen": " " + sent(rng, 1 + i % 4),
             "rejected": " " + sent(rng, 2 + i % 3)} for i in range(10)]
    path = write(tmp_path, "m.jsonl", rows)
    model_dir = tmp_path / "model"
    make_model(seed=0).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "report.json"
    assert main(["audit", path, "--model", str(model_dir), "--max-length", "64", "--batch-size", "3",
                 "--json", str(out)]) == 0
    ref = json.loads(out.read_text())["checks"]["reference"]
    model, tok = make_model(seed=0), make_tokenizer()
    items = tokenize_examples(load_examples(path).examples, tok, max_length=64, max_prompt_length=32).items
    sums, means = [], []
    for it, m in zip(items, ref["margins"]):
        c, nc = direct_logp(model, it.prompt_ids, it.chosen_ids)
        r, nr = direct_logp(model, it.prompt_ids, it.rejected_ids)
        assert m["row"] == it.row
        assert m["sum"] == pytest.approx(c - r, abs=1e-4)
        assert m["mean"] == pytest.approx(c / nc - r / nr, abs=1e-5)
        sums.append(c - r)
        means.append(c / nc - r / nr)
    assert len(ref["margins"]) == 10
    assert ref["share_correct"] == sum(s > 0 for s in sums) / 10
    assert ref["share_correct_mean"] == sum(s > 0 for s in means) / 10
    expect = margin_stats(sums, 3.0)
    assert ref["median"] == pytest.approx(expect["median"], abs=1e-4)
    assert ref["too_easy"] == len(expect["easy"])


def test_margin_stats_threshold():
    s = margin_stats([0.0, 1.0, 2.0, 3.0, 50.0], k=3.0)
    assert s["median"] == 2.0 and s["mad"] == 1.0
    assert s["threshold"] == pytest.approx(2.0 + 3 * 1.4826)
    assert s["easy"] == [4] and s["share_correct"] == 0.8


def test_length_statistics_by_hand():
    s = paired_length_stats([10, 20, 30, 5], [5, 10, 30, 10])  # d = 5, 10, 0, -5
    assert (s["chosen_longer"], s["rejected_longer"], s["ties"]) == (2, 1, 1)
    assert s["point_biserial"] == pytest.approx(2.5 / (150 / 4) ** 0.5)
    assert s["ratio_quantiles"]["p50"] == pytest.approx(1.5)
    assert binom_two_sided(2, 3) == 1.0
    assert binom_two_sided(10, 10) == pytest.approx(2 / 1024)


def test_cli_exit_codes_and_json(tmp_path, capsys):
    path = write(tmp_path, "p.jsonl", planted_rows())
    out = tmp_path / "r.json"
    assert main(["audit", path, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["counts"]["rows"] == 58 and len(report["warnings"]) == 9
    printed = capsys.readouterr().out
    assert "9 warnings" in printed and "contradictions" in printed
    assert main(["audit", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
    garbage = tmp_path / "g.jsonl"
    garbage.write_text("this is not json\n")
    assert main(["audit", str(garbage)]) == 2
    allbad = write(tmp_path, "bad.jsonl", [{"question": "x", "answer": "y"}] * 3)
    assert main(["audit", allbad, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["counts"]["skipped"] == 3 and report["kind"] is None
    assert [w["check"] for w in report["warnings"]] == ["fields"]
