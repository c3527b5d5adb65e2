"""The losses as data, without torch: names, what each does, how it is called, its parameters and defaults.

`prefalign losses` lists this table without importing torch (it answers in a fraction of a second);
`prefalign.losses` builds its registry (LOSSES) from it, and every loss function takes its default
hyper-parameters from it (`@takes_defaults`), so a default is written once, here.
Option keys (average_logps, nll_reduction, ...) are conventions applied around the function; see
the comments on CHOICES.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LossInfo:
    """One loss: ``defaults`` are its function's hyper-parameters, ``options`` conventions the caller applies
    around the call, ``nll_weight`` the weight of the chosen NLL it includes by definition (ORPO: 1)."""

    about: str
    kind: str = "paired"  # "paired" | "unpaired"
    needs_reference: bool = True
    inputs: str = "sum"  # "sum" (summed sequence log-probs) | "mean" (per-token means)
    defaults: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    nll_weight: float = 0.0

    @property
    def params(self) -> dict:
        return {**self.defaults, **self.options}


# The options and the values a string option may take, prefalign's default first; docs/trl.md gives
# the TRL setting of each.
#   average_logps:   feed per-token mean log-probs instead of sums (IPO; TRL: true)
#   running_delta:   bco_pair's delta = running mean reward (the BCO paper); false: 0 (TRL 1.16)
#   nll_reduction:   the chosen NLL as the mean of per-pair token means ("pair") or one
#                    token-weighted mean over the micro-batch ("token", TRL)
#   nll_tokens:      ORPO's NLL over the completion ("completion") or prompt + completion
#                    ("all", TRL's ORPOTrainer; the trainer then scores the prompts too)
#   prompt_bos:      the tokenizer's own BOS ("tokenizer") or a BOS in front of every prompt
#                    that lacks one ("always", TRL's CPOTrainer/ORPOTrainer)
CHOICES = {"nll_reduction": ("pair", "token"), "nll_tokens": ("completion", "all"),
           "prompt_bos": ("tokenizer", "always")}
_NLL = {"nll_reduction": "pair"}
_BOS = {"prompt_bos": "tokenizer"}
_BETA = {"beta": 0.1}
_SMOOTHED = {"beta": 0.1, "label_smoothing": 0.0}

TABLE: dict[str, LossInfo] = {
    "dpo": LossInfo("DPO's sigmoid loss on the log-ratio margin; cDPO with label_smoothing", defaults=_SMOOTHED),
    "robust": LossInfo("robust DPO: unbiased under label noise of rate label_smoothing", defaults=_SMOOTHED),
    "hinge": LossInfo("hinge (SLiC): relu(1 - beta x margin)", defaults=_BETA),
    "ipo": LossInfo("IPO: the margin regressed to 1/(2 beta)", defaults=_BETA, options={"average_logps": False}),
    "bco_pair": LossInfo("pairwise BCO: a reward classifier, chosen vs rejected, with a running-mean shift",
                         defaults=_BETA, options={"running_delta": True}),
    "nca_pair": LossInfo("NCA (2 answers): raises the chosen answer's own reward, not only the margin",
                         defaults=_BETA),
    "sppo_hard": LossInfo("SPPO with hard labels: each reward regressed to +-1/(2 beta)", defaults=_BETA),
    "apo_zero": LossInfo("APO-zero: chosen up, rejected down (for chosen answers better than the model's)",
                         defaults=_BETA),
    "apo_down": LossInfo("APO-down: both down, rejected more (for chosen answers worse than the model's)",
                         defaults=_BETA),
    "exo_pair": LossInfo("EXO: reverse KL to the soft label (1 - label_smoothing)",
                         defaults={"beta": 0.1, "label_smoothing": 1e-3}),
    "discopop": LossInfo("DiscoPOP: a logistic/exponential blend of the margin",
                         defaults={"beta": 0.1, "discopop_tau": 0.05}),
    "aot": LossInfo("AOT: the batch's sorted policy margins above its sorted reference margins",
                    defaults=_SMOOTHED),
    "aot_unpaired": LossInfo("AOT unpaired: chosen log-ratios dominate rejected ones in distribution",
                             defaults=_SMOOTHED),
    "simpo": LossInfo("SimPO: per-token mean log-prob margin above gamma, no reference", needs_reference=False,
                      inputs="mean", defaults={"beta": 2.0, "gamma": 0.5}, options=_BOS),
    "orpo": LossInfo("ORPO: chosen NLL + an odds-ratio term, no reference", needs_reference=False,
                     inputs="mean", defaults=_BETA, options={**_NLL, "nll_tokens": "completion", **_BOS},
                     nll_weight=1.0),
    "kto": LossInfo("KTO: unpaired desirable/undesirable completions around a KL reference point",
                    kind="unpaired", defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
}

# Names other libraries use (TRL's loss_type values) -> the canonical name.
ALIASES = {"sigmoid": "dpo", "aot_pair": "aot_unpaired"}

SFT = "sft"  # the chosen NLL term of a combination; not a loss on its own
SFT_PARAMS = dict(_NLL)  # what the "sft" term of a combination accepts


def takes_defaults(fn):
    """Give a loss function its hyper-parameter defaults from TABLE (its name is its key): the
    signature leaves them out so they live in one place. Parameters after them keep their own."""
    names = list(inspect.signature(fn).parameters)
    table = TABLE[fn.__name__].defaults
    first = names.index(next(iter(table)))
    own = dict(zip(names[len(names) - len(fn.__defaults__ or ()):], fn.__defaults__ or ()))
    missing = [n for n in names[first:] if n not in table and n not in own]
    if set(table) - set(names[first:]) or missing:
        raise TypeError(f"{fn.__name__}: the parameters after the inputs must be TABLE's {sorted(table)}")
    fn.__defaults__ = tuple(table.get(n, own.get(n)) for n in names[first:])
    return fn
