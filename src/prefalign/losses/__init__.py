"""The loss registry: every preference loss by name, and weighted combinations of them.

A loss is a pure function of [B] tensors returning ``LossOutput(losses, chosen_rewards,
rejected_rewards)`` (see ``pairwise`` and ``unpaired`` for the formulas). ``LOSSES``
describes how to call each one (``LossSpec``); ``get_loss`` looks one up by name, with a
"did you mean" for typos; ``combined`` builds a weighted sum such as RPO (dpo + sft).

Calling a spec: ``spec.fn(*(inputs[k] for k in input_keys(spec)), **hyper)`` where
``hyper`` holds ``spec.defaults`` keys only (``spec.options`` are applied around the call,
see ``CombinedLoss``), and the input keys are

    paired, inputs "sum":   policy_chosen, policy_rejected[, ref_chosen, ref_rejected]
    paired, inputs "mean":  policy_chosen_avg, policy_rejected_avg[, ref_..._avg]
    unpaired (kto):         policy_logps, ref_logps, desirable, kl

(the reference keys only when ``needs_reference``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor

from .. import validation
from ..errors import UserError
from ..loss_table import ALIASES, CHOICES, SFT, SFT_PARAMS, TABLE, LossInfo  # noqa: F401 (re-exported)
from . import pairwise, unpaired
from .pairwise import LossOutput, log_odds, logratios
# The loss functions themselves, for use outside the trainer: `from prefalign.losses import dpo`.
from .pairwise import (aot, aot_unpaired, apo_down, apo_zero, bco_pair, discopop, dpo, exo_pair, hinge, ipo,
                       nca_pair, orpo, robust, simpo, sppo_hard)
from .grpo import group_advantages, grpo_loss
from .unpaired import kto, kto_kl_estimate

__all__ = [
    "LossOutput",
    "LossSpec",
    "LOSSES",
    "ALIASES",
    "CombinedLoss",
    "check_params",
    "chosen_nll",
    "combined",
    "get_loss",
    "input_keys",
    "kto_kl_estimate",
    "log_odds",
    "logratios",
    # the loss functions
    "aot", "aot_unpaired", "apo_down", "apo_zero", "bco_pair", "discopop", "dpo", "exo_pair", "hinge",
    "group_advantages", "grpo_loss", "ipo", "kto", "nca_pair", "orpo", "robust", "simpo", "sppo_hard",
]


@dataclass(frozen=True)
class LossSpec(LossInfo):
    """How to call one loss: its table entry (prefalign.loss_table.LossInfo: ``defaults`` are its
    hyper-parameters, ``options`` conventions the caller applies around the function, ``params``
    = defaults | options: everything a user may set) with its canonical name and function."""

    name: str = ""
    fn: Callable[..., LossOutput] | None = None


# Keyword arguments that are training state passed in by the trainer, not hyper-parameters.
_STATE_ARGS = frozenset({"delta"})

_FUNCTIONS = {fn.__name__: fn for fn in (
    pairwise.dpo, pairwise.robust, pairwise.hinge, pairwise.ipo, pairwise.bco_pair, pairwise.nca_pair,
    pairwise.sppo_hard, pairwise.apo_zero, pairwise.apo_down, pairwise.exo_pair, pairwise.discopop, pairwise.aot,
    pairwise.aot_unpaired, pairwise.simpo, pairwise.orpo, unpaired.kto)}


def _spec(name: str) -> LossSpec:
    info = TABLE[name]  # the function's defaults are the table's (loss_table.takes_defaults)
    return LossSpec(**{**vars(info), "defaults": dict(info.defaults), "options": dict(info.options)},
                    name=name, fn=_FUNCTIONS[name])


LOSSES: dict[str, LossSpec] = {name: _spec(name) for name in TABLE}
# Other libraries' names (TRL's loss_type values) are valid keys of LOSSES too, so a config
# check `name in LOSSES` accepts them; the spec keeps the canonical name.
LOSSES.update({alias: LOSSES[target] for alias, target in ALIASES.items()})

_SUM_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
_MEAN_KEYS = ("policy_chosen_avg", "policy_rejected_avg", "ref_chosen_avg", "ref_rejected_avg")
_UNPAIRED_KEYS = ("policy_logps", "ref_logps", "desirable", "kl")


def _nll_keys(params: Mapping[str, Any]) -> tuple[str, ...]:
    if params.get("nll_tokens", "completion") == "all":
        return ("policy_chosen", "chosen_count", "prompt_logps", "prompt_count")
    return ("policy_chosen_avg",) if params["nll_reduction"] == "pair" else ("policy_chosen", "chosen_count")


def input_keys(spec: LossSpec, params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The names of the tensors ``spec.fn`` takes positionally, in order (``params``: the
    term's parameters; ``average_logps`` switches a "sum" loss to the means)."""
    if spec.kind == "unpaired":
        return _UNPAIRED_KEYS
    means = spec.inputs == "mean" or bool((params or {}).get("average_logps"))
    keys = _MEAN_KEYS if means else _SUM_KEYS
    return keys if spec.needs_reference else keys[:2]


def chosen_nll(inputs: Mapping[str, Tensor], reduction: str = "pair", tokens: str = "completion") -> Tensor:
    """[B] chosen NLL terms whose mean over the batch is the NLL of the convention:

        pair:  mean_i (-logp_i / n_i)                    (each pair weighs the same)
        token: sum_i (-logp_i) / sum_i n_i  (TRL)        (each token weighs the same)

    "token" is spread over the rows as -logp_i * B / sum n, so a sum over rows divided by
    B (what the trainer does) is that token-weighted mean. tokens "all": logp_i and n_i
    also count the prompt's tokens (all but its first, which nothing predicts)."""
    if tokens == "completion" and reduction == "pair":
        return -inputs["policy_chosen_avg"]
    logp, counts = inputs["policy_chosen"], inputs["chosen_count"]
    if tokens == "all":
        logp, counts = logp + inputs["prompt_logps"], counts + inputs["prompt_count"]
    counts = counts.to(logp.dtype)
    if reduction == "pair":
        return -logp / counts
    return -logp * (counts.numel() / counts.sum())


def get_loss(name: str) -> LossSpec:
    """The spec registered under ``name`` (aliases accepted); UserError if unknown."""
    spec = LOSSES.get(name)
    if spec is None:
        known = sorted(LOSSES)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UserError(f"unknown loss {name!r}: {hint}known losses: {', '.join(known)}")
    return spec


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def check_params(name: str, valid: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """``valid`` (the defaults) updated with ``given``, after checking every key and type.

    UserError on an unknown key (naming the valid ones), a value of the wrong type, or a
    string option outside its choices."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        opts = ", ".join(sorted(valid)) or "none"
        raise UserError(f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                        f"its parameters: {opts}")
    out = dict(valid)
    for key, value in given.items():
        default = valid[key]
        if not _type_ok(default, value):
            raise UserError(f"loss {name!r}: {key} must be {type(default).__name__} "
                            f"(like its default {default!r}); got {value!r}")
        bad = validation.problem(key, value, validation.LOSS_PARAM_RANGES.get(key, "finite"))
        if bad:
            raise UserError(f"loss {name!r}: {bad}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"loss {name!r}: {key} must be one of {', '.join(CHOICES[key])}; got {value!r}")
        out[key] = float(value) if isinstance(default, float) else value
    return out


@dataclass(frozen=True)
class CombinedLoss:
    """A weighted sum of paired losses, built by ``combined``; call it with a dict of inputs.

    ``needs_reference`` and ``required`` (the input keys it reads) tell the trainer what
    to compute. ``terms`` hold each term's full parameters (defaults filled in).
    """

    terms: tuple[tuple[str, float, LossSpec | None, dict], ...]  # (name, weight, spec, params)
    needs_reference: bool
    required: frozenset[str]

    def __call__(self, inputs: Mapping[str, Tensor]) -> LossOutput:
        missing = sorted(self.required - set(inputs))
        if missing:
            raise ValueError(f"combined loss needs inputs {missing}; got {sorted(inputs)}")
        total = None
        rewards = None
        for _name, weight, spec, params in self.terms:
            if spec is None:  # sft: the chosen NLL
                losses = _nll_term(inputs, params)
            else:
                kwargs = {k: v for k, v in params.items() if k not in spec.options}
                out = spec.fn(*(inputs[k] for k in input_keys(spec, params)), **kwargs)
                losses = out.losses
                if spec.nll_weight:
                    losses = losses + spec.nll_weight * _nll_term(inputs, params)
                if rewards is None:  # the first preference term's rewards are reported
                    rewards = _sum_rewards(spec, params, inputs, out)
            total = weight * losses if total is None else total + weight * losses
        return LossOutput(total, *rewards)


def _nll_term(inputs: Mapping[str, Tensor], params: Mapping[str, Any]) -> Tensor:
    return chosen_nll(inputs, params["nll_reduction"], params.get("nll_tokens", "completion"))


def _sum_rewards(spec: LossSpec, params: Mapping, inputs: Mapping[str, Tensor], out: LossOutput):
    """rewards/* mean beta x SUMMED log-ratio under every loss with a reference (TRL's too),
    also when the loss itself saw per-token means (``average_logps``)."""
    if spec.needs_reference and spec.inputs == "sum" and params.get("average_logps"):
        beta = params["beta"]
        return ((beta * (inputs["policy_chosen"] - inputs["ref_chosen"])).detach(),
                (beta * (inputs["policy_rejected"] - inputs["ref_rejected"])).detach())
    return out.chosen_rewards, out.rejected_rewards


def _term_keys(spec: LossSpec, params: Mapping) -> set[str]:
    keys = set(input_keys(spec, params))
    if spec.nll_weight:
        keys.update(_nll_keys(params))
    if spec.needs_reference and params.get("average_logps"):
        keys.update(_SUM_KEYS)  # for the rewards
    return keys


def combined(
    weights: Mapping[str, float], params: Mapping[str, Mapping[str, Any]] | None = None
) -> CombinedLoss:
    """Build loss = sum_i w_i * loss_i over paired losses and the optional ``"sft"`` term.

        combined({"dpo": 1.0, "sft": alpha})                  # RPO (Pang et al. 2024,
                                                              # "Iterative Reasoning PO")
        combined({"dpo": 0.8, "bco_pair": 0.2}, {"dpo": {"beta": 0.05}})
        fn = ...; out = fn({"policy_chosen": ..., "policy_rejected": ...,
                            "ref_chosen": ..., "ref_rejected": ...,
                            "policy_chosen_avg": ...})

    ``weights``: loss name (or ``"sft"``: the chosen NLL, see ``chosen_nll``) -> weight.
    ``params``: loss name -> parameters overriding that loss's defaults and options
    (``check_params``). The returned callable takes one dict holding every input any term
    needs (keys as in ``input_keys``; see ``CombinedLoss.required``) and returns LossOutput
    with the summed [B] losses and the rewards of the first preference term in ``weights``
    order. Stateful inputs (bco_pair's ``delta``) go in ``params``. Unpaired losses cannot
    be combined.
    """
    params = dict(params or {})
    if not weights:
        raise UserError("combined loss: give at least one loss with its weight")
    stray = sorted(set(params) - set(weights))
    if stray:
        raise UserError(f"combined loss: options given for {stray}, which have no weight")
    terms, required, needs_ref = [], set(), False
    for name, weight in weights.items():
        if name == SFT:
            full = check_params(SFT, SFT_PARAMS, params.get(SFT, {}))
            terms.append((SFT, float(weight), None, full))
            required.update(_nll_keys(full))
            continue
        try:
            spec = get_loss(name)
        except UserError:
            close = difflib.get_close_matches(str(name), sorted(LOSSES) + [SFT], n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise UserError(f"combined loss: unknown loss {name!r}: {hint}") from None
        if spec.kind != "paired":
            raise UserError(f"combined loss: {name!r} is unpaired; only paired losses combine")
        given = dict(params.get(name, {}))
        state = {k: given.pop(k) for k in _STATE_ARGS & set(given)}
        full = {**check_params(name, spec.params, given), **state}
        terms.append((name, float(weight), spec, full))
        required.update(_term_keys(spec, full))
        needs_ref = needs_ref or spec.needs_reference
    if all(spec is None for _, _, spec, _ in terms):
        raise UserError("combined loss: needs at least one preference loss besides 'sft'")
    return CombinedLoss(tuple(terms), needs_ref, frozenset(required))
