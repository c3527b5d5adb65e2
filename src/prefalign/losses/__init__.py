"""The loss registry: every preference loss by name, and weighted combinations of them.

A loss is a pure function of [B] tensors returning ``LossOutput(losses, chosen_rewards,
rejected_rewards)`` (see ``pairwise`` and ``unpaired`` for the formulas). ``LOSSES``
describes how to call each one (``LossSpec``); ``get_loss`` looks one up by name, with a
"did you mean" for typos; ``combined`` builds a weighted sum such as RPO (dpo + sft).

Calling a spec: ``spec.fn(*(inputs[k] for k in input_keys(spec)), **hyper)`` where the
input keys are

    paired, inputs "sum":   policy_chosen, policy_rejected[, ref_chosen, ref_rejected]
    paired, inputs "mean":  policy_chosen_avg, policy_rejected_avg[, ref_..._avg]
    unpaired (kto):         policy_logps, ref_logps, desirable, kl

(the reference keys only when ``needs_reference``).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from ..errors import UserError
from . import pairwise, unpaired
from .pairwise import LossOutput, log_odds, logratios
from .unpaired import kto_kl_estimate

__all__ = [
    "LossOutput",
    "LossSpec",
    "LOSSES",
    "ALIASES",
    "CombinedLoss",
    "combined",
    "get_loss",
    "input_keys",
    "kto_kl_estimate",
    "log_odds",
    "logratios",
]


@dataclass(frozen=True)
class LossSpec:
    """How to call one loss. ``defaults`` are its hyper-parameters (beta, gamma, ...)."""

    name: str
    fn: Callable[..., LossOutput]
    kind: str  # "paired" | "unpaired"
    needs_reference: bool
    inputs: str  # "sum" (summed sequence log-probs) | "mean" (per-token means)
    defaults: dict = field(default_factory=dict)


# Keyword arguments that are training state passed in by the trainer, not hyper-parameters.
_STATE_ARGS = frozenset({"delta"})


def _spec(fn, kind="paired", needs_reference=True, inputs="sum") -> LossSpec:
    # Defaults come from the signature so they cannot drift from the function.
    defaults = {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.default is not inspect.Parameter.empty and p.name not in _STATE_ARGS
    }
    return LossSpec(fn.__name__, fn, kind, needs_reference, inputs, defaults)


_REFERENCE_PAIRED = (
    pairwise.dpo,
    pairwise.robust,
    pairwise.hinge,
    pairwise.ipo,
    pairwise.bco_pair,
    pairwise.nca_pair,
    pairwise.sppo_hard,
    pairwise.apo_zero,
    pairwise.apo_down,
    pairwise.exo_pair,
    pairwise.discopop,
    pairwise.aot,
    pairwise.aot_unpaired,
)

LOSSES: dict[str, LossSpec] = {
    **{fn.__name__: _spec(fn) for fn in _REFERENCE_PAIRED},
    "simpo": _spec(pairwise.simpo, needs_reference=False, inputs="mean"),
    "orpo": _spec(pairwise.orpo, needs_reference=False, inputs="mean"),
    "kto": _spec(unpaired.kto, kind="unpaired"),
}

# Names other libraries use (TRL's loss_type values). They are valid keys of LOSSES too,
# so a config check `name in LOSSES` accepts them; the spec keeps the canonical name.
ALIASES = {"sigmoid": "dpo", "aot_pair": "aot_unpaired"}
LOSSES.update({alias: LOSSES[target] for alias, target in ALIASES.items()})

SFT = "sft"  # the chosen NLL term of `combined`; not a loss on its own

_SUM_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
_MEAN_KEYS = ("policy_chosen_avg", "policy_rejected_avg", "ref_chosen_avg", "ref_rejected_avg")
_UNPAIRED_KEYS = ("policy_logps", "ref_logps", "desirable", "kl")


def input_keys(spec: LossSpec) -> tuple[str, ...]:
    """The names of the tensors ``spec.fn`` takes positionally, in order."""
    if spec.kind == "unpaired":
        return _UNPAIRED_KEYS
    keys = _SUM_KEYS if spec.inputs == "sum" else _MEAN_KEYS
    return keys if spec.needs_reference else keys[:2]


def get_loss(name: str) -> LossSpec:
    """The spec registered under ``name`` (aliases accepted); UserError if unknown."""
    spec = LOSSES.get(name)
    if spec is None:
        known = sorted(LOSSES)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UserError(f"unknown loss {name!r}: {hint}known losses: {', '.join(known)}")
    return spec


@dataclass(frozen=True)
class CombinedLoss:
    """A weighted sum of paired losses, built by ``combined``; call it with a dict of inputs.

    ``needs_reference`` and ``required`` (the input keys it reads) tell the trainer what
    to compute.
    """

    terms: tuple[tuple[str, float, LossSpec | None, dict], ...]  # (name, weight, spec, hyper)
    needs_reference: bool
    required: frozenset[str]

    def __call__(self, inputs: Mapping[str, Tensor]) -> LossOutput:
        missing = sorted(self.required - set(inputs))
        if missing:
            raise ValueError(f"combined loss needs inputs {missing}; got {sorted(inputs)}")
        total = None
        rewards = None
        for _name, weight, spec, hyper in self.terms:
            if spec is None:  # sft: mean per-token NLL of the chosen response
                losses = -inputs["policy_chosen_avg"]
            else:
                out = spec.fn(*(inputs[k] for k in input_keys(spec)), **hyper)
                losses = out.losses
                if rewards is None:  # the first preference term's rewards are reported
                    rewards = (out.chosen_rewards, out.rejected_rewards)
            total = weight * losses if total is None else total + weight * losses
        return LossOutput(total, *rewards)


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

    ``weights``: loss name (or ``"sft"``: -policy_chosen_avg, the chosen NLL per token)
    -> weight. ``params``: loss name -> hyper-parameters overriding that loss's defaults.
    The returned callable takes one dict holding every input any term needs (keys as in
    ``input_keys``; see ``CombinedLoss.required``) and returns LossOutput with the summed
    [B] losses and the rewards of the first preference term in ``weights`` order. Stateful
    inputs (bco_pair's ``delta``) go in ``params``. Unpaired losses cannot be combined.
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
            if params.get(SFT):
                raise UserError("combined loss: 'sft' takes no options")
            terms.append((SFT, float(weight), None, {}))
            required.add("policy_chosen_avg")
            continue
        try:
            spec = get_loss(name)
        except UserError:
            close = difflib.get_close_matches(str(name), sorted(LOSSES) + [SFT], n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise UserError(f"combined loss: unknown loss {name!r}: {hint}") from None
        if spec.kind != "paired":
            raise UserError(f"combined loss: {name!r} is unpaired; only paired losses combine")
        hyper = dict(params.get(name, {}))
        unknown = sorted(set(hyper) - set(spec.defaults) - _STATE_ARGS)
        if unknown:
            raise UserError(
                f"combined loss: {name!r} has no option {unknown}; "
                f"its options: {', '.join(sorted(spec.defaults))}"
            )
        terms.append((name, float(weight), spec, hyper))
        required.update(input_keys(spec))
        needs_ref = needs_ref or spec.needs_reference
    if all(spec is None for _, _, spec, _ in terms):
        raise UserError("combined loss: needs at least one preference loss besides 'sft'")
    return CombinedLoss(tuple(terms), needs_ref, frozenset(required))
