"""Reward functions and verifiers for the online methods: loading, checking, combining.
(Reward models and the LM judge: online.reward_models.)

Every reward is called the same way, on a batch:

    fn(prompts: list[str], completions: list[str], **extra_columns) -> list[float]

extra_columns are the prompt rows' other fields (e.g. `answer=[...]`), one list entry per row.
A function gets only the columns its signature names (all of them if it takes **kwargs).

    reward = load_reward("my_rewards.py:score")          # or "pkg.module:score", "exact_answer", ...
    scores = reward(prompts, completions, answer=answers)

Wrapped in `Reward`, a function's output is checked: an exception (sys.exit too), a wrong length,
a NaN/inf, a value beyond float32 or a non-number becomes a `UserError` that names the function
and the row.

Built-in specs for `load_reward`:
    exact_answer        1 if the completion's final answer equals the `answer` column
    format              1 if the completion is "<think>...</think> <answer>...</answer>"
    format=PATTERN      1 if the whole (stripped) completion matches PATTERN
    regex=PATTERN       1 if PATTERN occurs anywhere in the completion
    rm:PATH             the score of a reward model trained by `prefalign reward` (PATH = its OUTPUT/model)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

from prefalign.errors import UserError

RewardFn = Callable[..., Sequence[float]]
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are float32 tensors in the loops


# ----------------------------------------------------------------------------------------------
# Loading by import path


def load_reward(spec: str, weight: float = 1.0) -> "Reward":
    """A reward from a spec: a built-in name, "module:function" or "path/to/file.py:function"."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"reward function spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTINS:
        return Reward(spec, BUILTINS[spec], weight)
    if spec.startswith("rm:"):  # a reward model trained by `prefalign reward`
        from prefalign.reward_model import load_scorer

        return Reward(spec, load_scorer(spec[3:]), weight)
    for prefix, make in (("regex=", regex_reward), ("format=", format_reward)):
        if spec.startswith(prefix):
            try:
                return Reward(spec, make(spec[len(prefix):]), weight)
            except re.error as e:
                raise UserError(f"reward function {spec!r}: bad regular expression: {e}") from None
    return Reward(spec, _import_function(spec), weight)


def _import_function(spec: str) -> Callable:
    if ":" not in spec:
        raise UserError(
            f"reward function {spec!r}: expected 'module:function', 'path/to/file.py:function' "
            f"or a built-in ({', '.join(sorted(BUILTINS))}, regex=PATTERN, format=PATTERN, rm:PATH)"
        )
    target, name = spec.rsplit(":", 1)  # rsplit: a Windows path has a drive colon
    if target.endswith(".py") or "/" in target or os.sep in target:
        if not os.path.isfile(target):
            raise UserError(f"reward function {spec!r}: file not found: {target}")
        # Load exactly that file, under a private module name: nothing on sys.path can shadow it,
        # and its directory is not added to sys.path.
        path = os.path.abspath(target)
        mod_name = "prefalign_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # a module-level sys.exit too
            raise UserError(f"reward function {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise UserError(f"reward function {spec!r}: no module named {e.name!r}") from e
        except (Exception, SystemExit) as e:
            raise UserError(f"reward function {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UserError(f"reward function {spec!r}: {target} has no {name!r} (it has: {', '.join(found) or 'nothing callable'})")
    if not callable(fn):
        raise UserError(f"reward function {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


# ----------------------------------------------------------------------------------------------
# A checked reward function, and weighted combinations


@dataclass
class Reward:
    """A reward function with a name (for errors and metrics) and a weight (for combinations)."""

    name: str
    fn: RewardFn
    weight: float = 1.0

    def __call__(self, prompts: list[str], completions: list[str], **extra) -> list[float]:
        return self.score(prompts, completions, extra)

    def score(self, prompts, completions, extra: dict | None = None, rows: list[str] | None = None) -> list[float]:
        """Call the function and check its output. rows: labels for error messages (default "row i")."""
        extra = extra or {}
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        for k, v in extra.items():
            if len(v) != len(prompts):
                raise ValueError(f"column {k!r} has {len(v)} values for {len(prompts)} rows")
        kwargs = self._kwargs(extra)
        try:
            out = self.fn(list(prompts), list(completions), **kwargs)
        except UserError:
            raise
        except SystemExit as e:  # sys.exit in a reward function must not end prefalign with status 0
            where = self._failing_row(prompts, completions, kwargs, rows)
            raise UserError(f"reward function {self.name} called sys.exit({e.code!r}) ({where})") from None
        except Exception as e:
            where = self._failing_row(prompts, completions, kwargs, rows)
            raise UserError(f"reward function {self.name} raised {type(e).__name__}: {e} ({where})") from e
        return self._check(out, completions, rows)

    def _kwargs(self, extra: dict) -> dict:
        """The columns the function asks for; a required one the data lacks is a user error."""
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # some builtins have no signature: give it everything
            return dict(extra)
        params = list(params)
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return dict(extra)
        named = [p for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for p in named:
            if p.default is p.empty and p.name not in extra:
                have = ", ".join(sorted(extra)) or "none"
                raise UserError(f"reward function {self.name} needs the column {p.name!r}, which the rows lack (columns: {have})")
        return {p.name: extra[p.name] for p in named if p.name in extra}

    def _failing_row(self, prompts, completions, kwargs, rows) -> str:
        """Find the first row that fails on its own, to name it (only on the error path)."""
        for i in range(len(prompts)):
            try:
                self.fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in kwargs.items()})
            except (Exception, SystemExit):
                return _row_name(i, rows, completions)
        return f"on a batch of {len(prompts)} rows; each row alone passed"

    def _check(self, out, completions, rows) -> list[float]:
        n = len(completions)
        if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
            out = out.tolist() if getattr(out, "ndim", 0) == 1 else out
        if not isinstance(out, (list, tuple)):
            raise UserError(f"reward function {self.name} must return a list of {n} numbers, got {type(out).__name__}")
        if len(out) != n:
            raise UserError(f"reward function {self.name} returned {len(out)} values for {n} completions")
        values = []
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if type(v).__module__ == "numpy" and hasattr(v, "item"):
                v = v.item()
            if not isinstance(v, (int, float)):  # bool is an int: True/False read as 1/0
                raise UserError(f"reward function {self.name} returned a non-number {v!r} ({_row_name(i, rows, completions)})")
            v = float(v)
            if not abs(v) <= FLOAT32_MAX:  # also nan; rewards become float32 tensors, where 1e39 is inf
                beyond = "" if not math.isfinite(v) else f", beyond the float32 range (|r| <= {FLOAT32_MAX:.4g})"
                raise UserError(f"reward function {self.name} returned {v}{beyond} ({_row_name(i, rows, completions)})")
            values.append(v)
        return values


def _row_name(i: int, rows, completions) -> str:
    head = completions[i][:60] + ("..." if len(completions[i]) > 60 else "")
    where = rows[i] if rows else f"row {i + 1}"
    return f"{where}, completion {head!r}"


class RewardScores(NamedTuple):
    total: list[float]                    # [N] weighted sum
    components: dict[str, list[float]]    # name -> [N] unweighted, for metrics (rewards/<name>)


@dataclass
class CombinedReward:
    """sum_k w_k * r_k(prompts, completions, ...). Each component is checked on its own."""

    rewards: list[Reward] = field(default_factory=list)

    def __post_init__(self):
        seen = {}
        for r in self.rewards:  # unique names, so metrics do not collide
            seen[r.name] = seen.get(r.name, 0) + 1
            if seen[r.name] > 1:
                r.name = f"{r.name}#{seen[r.name]}"

    def __call__(self, prompts, completions, **extra) -> list[float]:
        return self.score(prompts, completions, extra).total

    def score(self, prompts, completions, extra=None, rows=None) -> RewardScores:
        total = [0.0] * len(completions)
        components = {}
        for r in self.rewards:
            values = r.score(prompts, completions, extra, rows)
            components[r.name] = values
            total = [t + r.weight * v for t, v in zip(total, values)]
        for i, t in enumerate(total):
            if not abs(t) <= FLOAT32_MAX:  # each value was in range; the weighted sum is not
                terms = " + ".join(f"{r.weight:g} * {components[r.name][i]:g} ({r.name})" for r in self.rewards)
                raise UserError(f"the weighted reward {terms} = {t:g} is not a finite float32 "
                                f"({_row_name(i, rows, completions)})")
        return RewardScores(total, components)


def combine(rewards: Sequence, weights: Sequence[float] | None = None) -> CombinedReward:
    """Combine specs, functions or Rewards with weights (default: each Reward's own, else 1)."""
    if not rewards:
        raise UserError("no reward function given")
    if weights is not None and len(weights) != len(rewards):
        raise UserError(f"{len(weights)} reward weights for {len(rewards)} reward functions")
    out = []
    for i, r in enumerate(rewards):
        if isinstance(r, str):
            r = load_reward(r)
        elif not isinstance(r, Reward):
            r = Reward(getattr(r, "__name__", f"reward{i}"), r)
        else:
            r = Reward(r.name, r.fn, r.weight)  # a copy: the weight below must not leak back
        if weights is not None:
            r.weight = float(weights[i])
        out.append(r)
    return CombinedReward(out)


# ----------------------------------------------------------------------------------------------
# Built-in verifiers


_NUM = r"-?\d[\d,]*(?:\.\d+)?"


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, by the first convention that matches:
    <answer>X</answer>, \\boxed{X}, "#### X" (GSM8K), "answer is X" / "Answer: X", else the last number.
    """
    m = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if m:
        return m[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r"####\s*([^\n]+)", text)
    if m:
        return m[-1].strip()
    m = re.findall(r"answer(?:\s+is|\s*:)\s*([^\n]+)", text, flags=re.I)
    if m:
        return m[-1].strip()
    m = re.findall(_NUM, text)
    return m[-1] if m else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):  # balanced braces: \boxed{\frac{1}{2}}
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _normalize(ans: str) -> str:
    ans = ans.strip().strip("$").strip().rstrip(".").strip()
    if re.fullmatch(_NUM, ans):
        ans = ans.replace(",", "")
    return ans.lower()


def answers_match(pred: str | None, gold) -> bool:
    """Numbers compare by value (1,000 == 1000.0), anything else as normalized strings."""
    if pred is None or gold is None:
        return False
    p, g = _normalize(pred), _normalize(str(gold))
    try:
        a, b = float(p), float(g)
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    except ValueError:
        return p == g


def exact_answer(prompts: list[str], completions: list[str], answer: list) -> list[float]:
    """1.0 where the completion's final answer (see `extract_answer`) equals the `answer` column."""
    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answer)]


def regex_reward(pattern: str, flags: int = 0) -> RewardFn:
    """1.0 where `pattern` occurs in the completion (re.search)."""
    rx = re.compile(pattern, flags)

    def regex_match(prompts, completions):
        return [float(rx.search(c) is not None) for c in completions]

    return regex_match


DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"


def format_reward(pattern: str = DEFAULT_FORMAT, flags: int = re.S) -> RewardFn:
    """1.0 where the whole completion (stripped) matches `pattern` (re.fullmatch, DOTALL)."""
    rx = re.compile(pattern, flags)

    def format_check(prompts, completions):
        return [float(rx.fullmatch(c.strip()) is not None) for c in completions]

    return format_check


BUILTINS: dict[str, RewardFn] = {"exact_answer": exact_answer, "format": format_reward()}
