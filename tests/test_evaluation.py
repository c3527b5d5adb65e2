"""prefalign.evaluation, the one evaluation path of `prefalign eval`, the demo, compare and the
experiments: generation_metrics, pair_logratios; plus the one JSONL writer they share."""

import json

import pytest
import torch

import prefalign
from prefalign import evaluation, objective
from prefalign.demo import task
from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.metrics import read_jsonl, write_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    problems = task.make_splits(seed=0, n_heldout=20).heldout[:6]
    return tok, build_model(tok, seed=0), build_model(tok, seed=1), problems


def test_evaluate_is_the_api_function_not_a_module():
    from prefalign import api

    assert prefalign.evaluate is api.evaluate
    assert "evaluate" in dir(prefalign)


def test_generation_metrics_scores_lengths_kl_and_degenerate_shares(tiny):
    tok, policy, ref, problems = tiny
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    policy.train()
    seen = []

    def score(texts):  # a reward that is 1 for the first completion only: score = 1/6 exactly
        seen.append(list(texts))
        return [1.0] + [0.0] * (len(texts) - 1)

    out = evaluation.generation_metrics(policy, tok, prompts, score, max_new_tokens=4, seed=3, reference_model=policy,
                                        well_formed=lambda t: t == "never")
    assert policy.training  # put back as it was
    assert out["score"] == out["score_sampled"] == pytest.approx(1 / 6)
    assert len(seen) == 2 and all(len(t) == len(problems) for t in seen)  # greedy, then T=1
    assert 1 <= out["length"] <= 4
    assert out["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy against itself
    assert out["malformed"] == 1.0 and 0.0 <= out["run_on"] <= 1.0
    other = evaluation.generation_metrics(policy, tok, prompts, score, max_new_tokens=4, seed=3, reference_model=ref)
    assert other["kl"] > 0.01 and "malformed" not in other
    again = evaluation.generation_metrics(policy, tok, prompts, score, max_new_tokens=4, seed=3, reference_model=ref)
    assert again == other  # seeded: the same numbers every time


def test_pair_logratios_are_the_summed_log_prob_differences(tiny, tmp_path):
    tok, policy, ref, problems = tiny
    rows = [{"prompt": p.prompt, "chosen": task.format_completion(p.answer),
             "rejected": task.format_completion(p.answer + 1)} for p in problems]
    path = write_jsonl(str(tmp_path / "pairs.jsonl"), rows)
    rw, rl = evaluation.pair_logratios(policy, policy, tok, path, max_length=16)
    assert torch.equal(rw, torch.zeros(len(rows))) and torch.equal(rl, torch.zeros(len(rows)))
    rw, rl = evaluation.pair_logratios(policy, ref, tok, path, max_length=16, batch_size=4)
    r = rows[2]
    prompt = [tok(r["prompt"])["input_ids"]]
    for text, got in ((r["chosen"], rw[2]), (r["rejected"], rl[2])):
        comp = [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        with torch.no_grad():
            want = (objective.completion_logps(policy, prompt, comp, pad_id=tok.pad_token_id, chunk_size=0).sum
                    - objective.completion_logps(ref, prompt, comp, pad_id=tok.pad_token_id, chunk_size=0).sum)
        assert float(got) == pytest.approx(float(want), abs=1e-4)


def test_write_jsonl_round_trips_and_leaves_no_partial_file(tmp_path):
    rows = [{"prompt": "héllo", "n": 1}, {"prompt": "2+2=", "tags": ["a"], "x": None}]
    path = write_jsonl(str(tmp_path / "new" / "rows.jsonl"), rows)
    assert read_jsonl(path) == rows
    assert "héllo" in open(path, encoding="utf-8").read()  # written as text, not \u escapes
    assert not (tmp_path / "new" / "rows.jsonl.tmp").exists()
    write_jsonl(path, [{"when": object, "half": "a\ud800b"}])  # not JSON, not Unicode: still one line
    assert json.loads(open(path, encoding="utf-8").read()) == {"when": str(object), "half": "a\ud800b"}
