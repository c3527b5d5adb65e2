"""prefalign agrees with TRL 1.16's DPOTrainer (issues 2 and 3). Skipped when trl is not installed
(it is the `bench` extra, never a runtime dependency).

The end-to-end check is bench/trl_agreement.py (3 DPO steps of each tool on a tiny Llama);
here it runs once, plus a fast token-for-token check of the two tokenizations."""

import os
import sys
import types

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from prefalign.data.formats import PairExample  # noqa: E402
from prefalign.data.tokenize import tokenize_examples  # noqa: E402
from tiny import EOS_ID, make_tokenizer  # noqa: E402

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

ROWS = [
    {"prompt": "Question: What is 2 + 2?", "chosen": " Answer: 4.", "rejected": " Answer: five"},
    {"prompt": "Human: Hello there!", "chosen": " I am fine, thank you.", "rejected": " no"},
]


def _trl_ids(tok):
    """TRL's own dataset preparation (DPOTrainer._prepare_dataset), without building a trainer."""
    fake = types.SimpleNamespace(_tokenizer=tok)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=1024, truncation_mode="keep_start")
    ds = trl.DPOTrainer._prepare_dataset(fake, datasets.Dataset.from_list(ROWS), tok, args, "train")
    return [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in ds]


def _our_ids(tok):
    examples = [PairExample(r["prompt"], r["chosen"], r["rejected"], "rows", i + 1) for i, r in enumerate(ROWS)]
    return [[i.prompt_ids, i.chosen_ids, i.rejected_ids] for i in tokenize_examples(examples, tok, 1024).items]


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenization_equals_trl(add_bos):
    tok = make_tokenizer(add_bos=add_bos)
    assert _our_ids(tok) == _trl_ids(tok)


def test_eos_appending_tokenizer_trl_doubles_eos():
    """A tokenizer whose post-processor appends EOS: TRL appends the EOS string and tokenizes with
    special tokens, so its completions end in EOS EOS; prefalign ends them with one EOS."""
    tok = make_tokenizer(add_bos=True, add_eos=True)
    ours, theirs = _our_ids(tok), _trl_ids(tok)
    for (p, c, r), (tp, tc, tr) in zip(ours, theirs):
        assert p == tp
        assert c[-1] == EOS_ID and c[-2] != EOS_ID
        assert tc == c + [EOS_ID] and tr == r + [EOS_ID]


@pytest.mark.slow
def test_three_dpo_steps_agree_with_trl(tmp_path):
    sys.path.insert(0, BENCH)
    import trl_agreement

    out = trl_agreement.run(str(tmp_path), verbose=False)
    assert out["tokenization"]["identical"]
    for name, run in out["runs"].items():
        assert run["step1_logps_max_rel_diff"] <= 1e-4, name
        assert run["ok"], (name, [r for r in run["rows"] if not r["ok"]])
