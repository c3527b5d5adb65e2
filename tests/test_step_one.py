"""Before any update the policy IS the reference: every log-ratio is exactly 0, so the loss is
its value at zero log-ratio (ln 2 for DPO) and the rewards are 0, in every precision and with
every reference strategy. Runs use lr 1e-30 (AdamW's step is far below one ulp of any weight,
so the weights never change) and check the whole first epoch, not just step 1: a precomputed
reference must be scored in the very batches the loop will use."""

import json
import math

import pytest

from prefalign import trainer
from prefalign.cli import main
from test_train import cfg_for, run_files  # noqa: F401  (the module fixture)

# beta 0.1 throughout: ipo's (h - 1/(2 beta))^2 = 25, hinge's relu(1 - beta h) = 1, bco_pair's
# two logistic terms (delta 0 at the start) 2 ln 2, apo_zero's sig(0) + sig(0) = 1, kto's 1 - sig(0).
LOSS_AT_ZERO = {"dpo": math.log(2), "ipo": 25.0, "kto": 0.5, "hinge": 1.0, "bco_pair": 2 * math.log(2),
                "apo_zero": 1.0}
STRATEGIES = [("copy", 0), ("precomputed", 0), ("adapters-off", 8), ("precomputed", 8)]
FROZEN = dict(lr=1e-30, max_steps=4, batch_size=4, beta=0.1, save_model=False)  # 16 pairs: 4 steps = 1 epoch


def assert_at_zero(records, loss):
    assert len(records) == 4
    for r in records:
        assert r["loss"] == pytest.approx(LOSS_AT_ZERO[loss], abs=1e-6), r["step"]
        assert abs(r["rewards/chosen"]) <= 1e-7 and abs(r["rewards/rejected"]) <= 1e-7, r


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy,lora_r", STRATEGIES, ids=[f"{s}-lora{r}" for s, r in STRATEGIES])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto"])
def test_first_epoch_at_zero_log_ratio(run_files, tmp_path, precision, strategy, lora_r, loss):  # noqa: F811
    if loss == "kto" and strategy == "precomputed":
        pytest.skip("precomputed supports paired losses only (refused with a UserError)")
    result = trainer.train(cfg_for(run_files, tmp_path / "o", precision=precision, reference=strategy,
                                 lora_r=lora_r, loss=loss, **FROZEN))
    assert_at_zero(result.history, loss)


@pytest.mark.parametrize("loss", ["hinge", "bco_pair", "apo_zero"])
@pytest.mark.parametrize("strategy,lora_r", [("copy", 0), ("precomputed", 8)])
def test_other_reference_losses_start_at_zero_in_bf16(run_files, tmp_path, loss, strategy, lora_r):  # noqa: F811
    result = trainer.train(cfg_for(run_files, tmp_path / "o", precision="bf16", reference=strategy,
                                 lora_r=lora_r, loss=loss, **FROZEN))
    assert_at_zero(result.history, loss)


def test_cli_bf16_precomputed_with_accumulation_and_eval(run_files, tmp_path):  # noqa: F811
    """Through the CLI, with micro-batches (2 x 2 per step) and evaluation batches: the cache was
    scored in each of them, so every step and the final eval sit at exactly zero log-ratio."""
    out = tmp_path / "o"
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--eval-data",
               run_files["eval"], "--output", str(out), "--precision", "bf16", "--reference", "precomputed",
               "--lr", "1e-30", "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--beta", "0.1",
               "--max-length", "64", "--no-progress", "--no-packing"])
    assert rc == 0
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert_at_zero([r for r in records if "loss" in r], "dpo")
    final = records[-1]
    assert final["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert final["eval/rewards/margins"] == 0.0


def test_bf16_reference_copy_keeps_fp32_weights(run_files, tmp_path):  # noqa: F811
    """The documented memory price: the copy is fp32 like the policy (autocast does the bf16)."""
    import torch

    from prefalign import prepare

    s = prepare.build(cfg_for(run_files, tmp_path / "o", precision="bf16", reference="copy"),
                      device=torch.device("cpu"), log=lambda m: None)
    assert {p.dtype for p in s.reference.model.parameters()} == {torch.float32}
