"""The loss contract (issue 12, items 3-5): every hyper-parameter reaches the loss in one way
(the loss's own defaults unless set; loss_params / --loss-param checked against the loss),
weighted combinations from the CLI and YAML, the TRL-convention options against hand
computations of TRL's formulas, one SFT normalisation, and metric names on the console."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from prefalign import config, evaluation, objective, prepare, train
from prefalign.cli import main
from prefalign.errors import UserError
from prefalign.losses import LOSSES, pairwise
from prefalign.metrics import progress_info
from test_train import cfg_for, run_files  # noqa: F401  (the tiny model + data fixture)

LN2 = math.log(2.0)
CANONICAL = sorted({spec.name for spec in LOSSES.values()})


def _spy(monkeypatch, name):
    """Replace loss `name`'s function by one that records the keyword arguments it gets."""
    spec = LOSSES[name]
    calls = []

    def spy(*args, **kwargs):
        calls.append({**kwargs, "_rows": len(args[0])})
        return spec.fn(*args, **kwargs)

    monkeypatch.setitem(LOSSES, name, dataclasses.replace(spec, fn=spy))
    return calls


def _kwargs(calls):
    """The one set of keyword arguments every call got (the config check's dry run and the
    training steps alike), without bco's state `delta`."""
    seen = [{k: v for k, v in c.items() if k not in ("delta", "_rows")} for c in calls]
    assert seen and all(c == seen[0] for c in seen), seen
    return seen[0]


def _pair_logps(seed, B=4, requires_grad=False):
    """Random summed log-probs of B pairs; the token counts are the same for every seed (the
    policy and the reference score the same completions)."""
    counts = torch.randint(2, 9, (2, B), generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    sums = -(torch.rand(2, B, generator=g, dtype=torch.float64) + 0.1) * counts
    sums.requires_grad_(requires_grad)
    return objective.PairLogps(sums[0], sums[1], counts[0], counts[1]), sums


def _cfg(**kw):
    return config.build({"loss": "dpo", **kw})


def _run_loss(cfg, state=None, seed=0):
    """What the trainer computes for one micro-batch of random log-probs: (loss sum, metrics)."""
    plan = objective.loss_plan(cfg)
    pol, _ = _pair_logps(seed)
    ref, _ = _pair_logps(seed + 1)
    if plan.kind == "unpaired":
        desirable = torch.tensor([True, False, True, False])
        return objective.kto_loss(plan, cfg, objective.logprobs.SeqLogps(pol.chosen, pol.chosen_count),
                                  objective.logprobs.SeqLogps(ref.chosen, ref.chosen_count), desirable,
                                  torch.tensor(0.3, dtype=torch.float64))
    return objective.paired_loss(plan, cfg, pol, ref if plan.needs_reference else None, state)


# ------------------------------------------------------------------ defaults unless set


@pytest.mark.parametrize("name", CANONICAL)
def test_trainer_passes_exactly_the_losss_defaults(monkeypatch, name):
    calls = _spy(monkeypatch, name)
    _run_loss(_cfg(loss=name), state={})
    assert _kwargs(calls) == LOSSES[name].defaults


def test_set_values_and_loss_params_reach_the_loss_and_nothing_else(monkeypatch):
    calls = _spy(monkeypatch, "discopop")
    _run_loss(_cfg(loss="discopop", beta=0.3, loss_params={"discopop_tau": 0.2}))
    assert _kwargs(calls) == {"beta": 0.3, "discopop_tau": 0.2}
    calls = _spy(monkeypatch, "kto")
    _run_loss(_cfg(loss="kto", loss_params={"desirable_weight": 2}))
    assert _kwargs(calls) == {"beta": 0.1, "desirable_weight": 2.0, "undesirable_weight": 1.0}


def test_simpo_through_the_cli_gets_its_own_beta(monkeypatch, run_files, tmp_path, capsys):  # noqa: F811
    """`prefalign losses` shows simpo's beta 2.0: `train --loss simpo` uses exactly that, and the
    logged step-1 loss equals the loss computed directly with it."""
    calls = _spy(monkeypatch, "simpo")
    args = ["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(tmp_path / "r"),
            "--loss", "simpo", "--max-steps", "1", "--batch-size", "16", "--max-length", "64", "--no-progress",
            "--no-save-model", "--no-packing", "--lr", "1e-3"]
    assert main(args) == 0
    assert _kwargs(calls) == {"beta": 2.0, "gamma": 0.5}
    assert any(c["_rows"] == 16 for c in calls)  # the training step's call, not only the config check
    main(["losses"])
    assert "simpo" in capsys.readouterr().out.split("beta=2.0")[0].splitlines()[-1]


def test_loss_params_from_yaml_and_flags_merge(monkeypatch, tmp_path, run_files):  # noqa: F811
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("loss: discopop\nloss_params: {discopop_tau: 0.07, beta: 0.2}\n")
    calls = _spy(monkeypatch, "discopop")
    args = ["train", "--config", str(cfg_file), "--loss-param", "beta=0.4", "--model", run_files["model"],
            "--data", run_files["data"], "--output", str(tmp_path / "r"), "--max-steps", "1", "--batch-size", "4",
            "--max-length", "64", "--no-progress", "--no-save-model"]
    assert main(args) == 0
    assert _kwargs(calls) == {"beta": 0.4, "discopop_tau": 0.07}


@pytest.mark.parametrize("extra,words", [
    (["--loss", "discopop", "--loss-param", "tau=0.05"], ["'tau'", "beta, discopop_tau"]),
    (["--loss", "dpo", "--gamma", "1"], ["'gamma'", "beta, label_smoothing"]),
    (["--loss", "dpo", "--loss-param", "beta=abc"], ["beta must be float", "'abc'"]),
    (["--loss", "ipo", "--loss-param", "average_logps=3"], ["average_logps must be bool"]),
    (["--loss", "dpo,sft", "--loss-param", "sft.nll_reduction=tokens"], ["nll_reduction must be one of pair, token"]),
    (["--loss", "dpo,sft", "--loss-weights", "1"], ["1 loss_weights for 2 losses"]),
    (["--loss", "kto,sft"], ["kto is unpaired"]),
    (["--loss", "dpo,sft", "--rpo-alpha", "1"], ["rpo_alpha"]),
    (["--loss", "dpo", "--loss-param", "beta"], ["KEY=VALUE"]),
    (["--loss", "sft", "--beta", "0.2"], ["sft takes no loss parameters"]),
    (["--loss", "robust", "--loss-param", "label_smoothing=0.7"], ["robust needs 0 <= label_smoothing < 0.5"]),
    # loss_params get the same ranges as the shorthand flags, and every numeric one must be finite
    (["--loss", "dpo", "--loss-param", "beta=-1"], ["beta must be > 0", "-1"]),
    (["--loss", "dpo", "--loss-param", "beta=.inf"], ["beta must be > 0", "inf"]),
    (["--loss", "discopop", "--loss-param", "discopop_tau=0"], ["discopop_tau must be > 0"]),
    (["--loss", "dpo", "--loss-param", "label_smoothing=.nan"], ["label_smoothing must be finite"]),
    (["--loss", "dpo,sft", "--loss-weights", "inf,1"], ["loss_weights must be finite and >= 0"]),
    (["--loss", "dpo,sft", "--loss-weights", "nan,1"], ["loss_weights must be finite and >= 0"]),
    (["--loss", "dpo,sft", "--loss-weights=-1,1"], ["loss_weights must be finite and >= 0"]),
    (["--loss", "dpo,sft", "--loss-weights", "0,0"], ["not all 0"]),
])
def test_bad_loss_settings_are_one_line_errors(tmp_path, capsys, extra, words):
    rc = main(["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("prefalign: error: ") and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


# ------------------------------------------------------------------------ combinations


def test_combination_is_the_weighted_sum_of_its_parts():
    cfg = _cfg(loss="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.5", loss_params={"bco_pair.beta": 0.3})
    loss, m = _run_loss(cfg, state={})
    pol, _ = _pair_logps(0)
    ref, _ = _pair_logps(1)
    args = (pol.chosen, pol.rejected, ref.chosen, ref.rejected)
    want = (0.8 * pairwise.dpo(*args).losses + 0.2 * pairwise.bco_pair(*args, beta=0.3).losses
            + 1.5 * -(pol.chosen / pol.chosen_count)).sum()
    torch.testing.assert_close(loss, want)
    # rewards/* are those of the first preference term (dpo, beta 0.1), summed log-ratios
    torch.testing.assert_close(m["rewards/chosen"], (0.1 * (pol.chosen - ref.chosen)).sum())


def test_combination_end_to_end_from_yaml(tmp_path, run_files):  # noqa: F811
    """MPO-style sigmoid + bco_pair + sft: at step 1 (policy == reference) the log-ratios are 0, so
    the loss is 1 x ln2 + 1 x 2 ln2 (bco, delta 0) + 0.5 x the chosen NLL the run logs."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("loss: [sigmoid, bco_pair, sft]\nloss_weights: [1, 1, 0.5]\n")
    cfg = config.build({**config.load_yaml(str(cfg_file)), **dict(
        model=run_files["model"], data=run_files["data"], output=str(tmp_path / "r"), max_steps=1,
        batch_size=8, max_length=64, progress=False, save_model=False)})
    rec = train.train(cfg).history[0]
    assert rec["loss"] == pytest.approx(3 * LN2 + 0.5 * rec["nll/chosen"], rel=1e-5)
    # config.yaml records every parameter the terms ran with, and reads back as the same loss
    saved = config.load_yaml(str(tmp_path / "r" / "config.yaml"))
    assert saved["loss_params"]["sigmoid.beta"] == 0.1 and saved["loss_params"]["bco_pair.running_delta"] is True
    again = objective.loss_plan(config.build({k: v for k, v in saved.items()}))
    assert again.params == objective.loss_plan(cfg).params and again.weights == {"sigmoid": 1, "bco_pair": 1, "sft": 0.5}


# ------------------------------------------------------- TRL conventions vs TRL's formulas


def _grad(fn, sums):
    sums.grad = None
    fn().backward()
    return sums.grad.clone()


def test_ipo_average_logps_is_trls_ipo_and_keeps_summed_rewards():
    """TRL's IPO: h = (sum r_w)/n_w - (sum r_l)/n_l, loss = mean (h - 1/(2 beta))^2; TRL logs
    rewards as beta x the summed log-ratio: so does prefalign."""
    pol, psums = _pair_logps(0, requires_grad=True)
    ref, _ = _pair_logps(1)
    beta = 0.2
    plan = objective.loss_plan(_cfg(loss="ipo", beta=beta, ipo_average_logps=True))

    def ours():
        return objective.paired_loss(plan, None, pol, ref)[0] / 4

    def trl():
        h = (pol.chosen - ref.chosen) / pol.chosen_count - (pol.rejected - ref.rejected) / pol.rejected_count
        return ((h - 1 / (2 * beta)) ** 2).mean()

    torch.testing.assert_close(ours(), trl())
    torch.testing.assert_close(_grad(ours, psums), _grad(trl, psums))
    m = objective.paired_loss(plan, None, pol, ref)[1]
    torch.testing.assert_close(m["rewards/margins"],
                               (beta * ((pol.chosen - ref.chosen) - (pol.rejected - ref.rejected))).sum().detach())


@pytest.mark.parametrize("how", ["rpo_alpha", "combination"])
def test_token_weighted_nll_is_trls_rpo(how):
    """TRL's RPO: mean DPO loss + alpha x ONE token-weighted chosen NLL over the batch."""
    pol, psums = _pair_logps(2, requires_grad=True)
    ref, _ = _pair_logps(3)
    alpha = 0.7
    cfg = (_cfg(loss="dpo", rpo_alpha=alpha, loss_params={"nll_reduction": "token"}) if how == "rpo_alpha" else
           _cfg(loss="dpo,sft", loss_weights=f"1,{alpha}", loss_params={"sft.nll_reduction": "token"}))
    plan = objective.loss_plan(cfg)

    def ours():
        return objective.paired_loss(plan, cfg, pol, ref)[0] / 4

    def trl():
        logits = 0.1 * ((pol.chosen - ref.chosen) - (pol.rejected - ref.rejected))
        return -F.logsigmoid(logits).mean() + alpha * (-pol.chosen.sum() / pol.chosen_count.sum())

    torch.testing.assert_close(ours(), trl())
    torch.testing.assert_close(_grad(ours, psums), _grad(trl, psums))
    # the default: the mean of per-pair means, which differs when lengths differ
    default = objective.loss_plan(_cfg(loss="dpo", rpo_alpha=alpha))
    assert not torch.isclose(objective.paired_loss(default, None, pol, ref)[0] / 4, trl())


def test_orpo_token_weighted_nll():
    """ORPO with nll_reduction=token: sum(-logp_w)/sum(n_w) - beta mean log sig(log-odds diff)."""
    pol, psums = _pair_logps(4, requires_grad=True)
    plan = objective.loss_plan(_cfg(loss="orpo", loss_params={"nll_reduction": "token"}))

    def ours():
        return objective.paired_loss(plan, None, pol, None)[0] / 4

    def trl():
        avg_w, avg_l = pol.chosen / pol.chosen_count, pol.rejected / pol.rejected_count
        odds = (avg_w - torch.log1p(-torch.exp(avg_w))) - (avg_l - torch.log1p(-torch.exp(avg_l)))
        return -pol.chosen.sum() / pol.chosen_count.sum() - 0.1 * F.logsigmoid(odds).mean()

    torch.testing.assert_close(ours(), trl())
    torch.testing.assert_close(_grad(ours, psums), _grad(trl, psums))


def test_orpo_nll_over_prompt_and_completion_is_trls_orpo():
    """nll_tokens=all, nll_reduction=token (TRL's ORPOTrainer): the NLL is one cross-entropy over
    every token of prompt + chosen (all but the first), token-weighted over the batch."""
    from types import SimpleNamespace

    from tiny import make_model

    torch.manual_seed(0)
    model = make_model("llama", seed=0)
    items = [SimpleNamespace(prompt_ids=[5, 9, 13], chosen_ids=[20, 21, 2], rejected_ids=[30, 2]),
             SimpleNamespace(prompt_ids=[7, 8, 9, 10, 11], chosen_ids=[22, 2], rejected_ids=[31, 32, 33, 2])]
    cfg = _cfg(loss="orpo", loss_params={"nll_tokens": "all", "nll_reduction": "token"})
    plan = objective.loss_plan(cfg)
    assert plan.needs_prompt_logps
    kw = dict(pad_id=0, packing=False, token_budget=0, chunk_size=0)

    def ours():
        pol = objective.pair_logps(model, items, **kw)
        return objective.paired_loss(plan, cfg, pol, None, None, objective.prompt_logps(model, items, **kw))[0] / 2

    def trl():
        nll, n, avg = 0.0, 0, {}
        for side in ("chosen", "rejected"):
            avg[side] = []
            for it in items:
                ids = torch.tensor([it.prompt_ids + getattr(it, side + "_ids")])
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
                comp = logp[len(it.prompt_ids) - 1:]
                avg[side].append(comp.mean())
                if side == "chosen":
                    nll, n = nll - logp.sum(), n + len(logp)
        w, l = torch.stack(avg["chosen"]), torch.stack(avg["rejected"])
        odds = (w - torch.log1p(-torch.exp(w))) - (l - torch.log1p(-torch.exp(l)))
        return nll / n - 0.1 * F.logsigmoid(odds).mean()

    torch.testing.assert_close(ours(), trl(), rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(ours(), params), torch.autograd.grad(trl(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("running", [True, False])
def test_bco_pair_running_delta_and_trls_none(running):
    """running_delta (default): delta = the mean reward seen so far; false: TRL 1.16, delta = 0."""
    pol, psums = _pair_logps(5, requires_grad=True)
    ref, _ = _pair_logps(6)
    plan = objective.loss_plan(_cfg(loss="bco_pair", loss_params={"running_delta": running}))
    delta = 0.25 if running else 0.0

    def ours():
        return objective.paired_loss(plan, None, pol, ref, {"reward_sum": 1.0, "reward_count": 4})[0] / 4

    def trl():
        rw, rl = 0.1 * (pol.chosen - ref.chosen), 0.1 * (pol.rejected - ref.rejected)
        return (-F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))).mean()

    torch.testing.assert_close(ours(), trl())
    torch.testing.assert_close(_grad(ours, psums), _grad(trl, psums))


def test_kto_logs_its_estimate_and_trls_clamped_kl():
    cfg = _cfg(loss="kto")
    plan = objective.loss_plan(cfg)
    seq = objective.logprobs.SeqLogps(torch.tensor([-3.0, -4.0]), torch.tensor([3, 4]))
    for kl, clamped in ((-0.5, 0.0), (0.4, 0.4)):
        _, m = objective.kto_loss(plan, cfg, seq, seq, torch.tensor([True, False]), torch.tensor(kl))
        assert float(m["kl"]) / 2 == pytest.approx(kl) and float(m["kl/clamped"]) / 2 == pytest.approx(clamped)


def test_sft_train_loss_at_step_1_equals_eval_loss_before_the_update(run_files, tmp_path):  # noqa: F811
    """One normalisation: training and evaluation divide the summed NLL by the same tokens."""
    cfg = cfg_for(run_files, tmp_path / "r", loss="sft", reference="none", max_steps=1, batch_size=16,
                  save_model=False)
    from tiny import make_model

    s = prepare.build(cfg, device=torch.device("cpu"), model=make_model("llama", seed=0))
    before = evaluation.pair_metrics(s, cfg, prepare.autocast(cfg, torch.device("cpu")), items=s.items)["loss"]
    rec = train.train(cfg).history[0]
    assert rec["loss"] == pytest.approx(before, rel=1e-5)


# ------------------------------------------------------------------------- the console


def test_progress_line_keeps_full_names_and_shows_a_dash_for_missing_values():
    kto_batch = {"loss": 0.5, "rewards/margins": float("nan"), "logps/chosen": float("nan"), "kl": 0.01,
                 "logratio/pairs": None}
    line = progress_info(kto_batch, ("loss", "rewards/margins", "logps/chosen", "logratio/pairs", "kl", "absent"))
    assert line == "loss 0.5  rewards/margins -  logps/chosen -  logratio/pairs -  kl 0.01"
    line = progress_info({"logratio/pairs": -0.25, "rewards/accuracies": 1}, ("rewards/accuracies", "logratio/pairs"))
    assert line == "rewards/accuracies 1  logratio/pairs -0.25"


@pytest.mark.parametrize("add_bos", [False, True])
def test_prompt_bos_always_is_trls_cpo_orpo_tokenization(tmp_path, add_bos):
    """TRL's CPO/ORPO insert bos_token_id in front of a prompt that does not start with it; the
    default keeps the tokenizer's own (which adds none when add_bos is False)."""
    from tiny import BOS_ID, make_tokenizer

    tok = make_tokenizer(add_bos=add_bos)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "the sky ?", "chosen": " blue sea", "rejected": " no"}\n')
    items = {}
    for bos in ("tokenizer", "always"):
        cfg = _cfg(loss="orpo", data=str(data), max_length=64, loss_params={"prompt_bos": bos})
        items[bos] = prepare.load_items(cfg, tok, str(data), "paired", None, log=lambda m: None)[0][0]
    plain = items["tokenizer"]
    trl_prompt = plain.prompt_ids if plain.prompt_ids[:1] == [BOS_ID] else [BOS_ID] + plain.prompt_ids
    assert items["always"].prompt_ids == trl_prompt
    assert (items["always"].chosen_ids, items["always"].rejected_ids) == (plain.chosen_ids, plain.rejected_ids)
    assert (plain.prompt_ids[:1] == [BOS_ID]) == add_bos
