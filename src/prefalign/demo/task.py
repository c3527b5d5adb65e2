"""The demo task: two-digit addition with a verifier and noisy demonstrations.

The story the demo tells (see ``prefalign demo``): a tiny model is fine-tuned (SFT) on
demonstrations written by a careless teacher, sampled, the samples are checked by a verifier,
and DPO on the resulting (correct, incorrect) pairs fixes what SFT copied from the teacher.

Why addition: the answer is verifiable exactly, the alphabet is a dozen characters (a tiny
tokenizer and model suffice), and the problem space is small enough to split into disjoint
train and held-out sets.

Why a *systematic* error: the teacher mostly forgets the carry. On problems where the units
column carries (17+25), it writes the answer without the carry (32 instead of 42) with
probability ``carry_slip`` (default 0.7); on top, a small fraction ``random_noise`` of all
answers gets an unsystematic slip (off by one, two digits swapped). Because the carry slip
happens more often than not, a model that imitates the teacher well makes it its *most likely*
answer: greedy SFT gets the carry problems wrong (about 45% of problems), so SFT lands near
55% however long it trains. Its samples still hold the correct answer a good part of the
time, so on-policy pairs labelled by the verifier (correct = chosen, wrong = rejected) contain
exactly the signal DPO needs to push the carry-slip mode down. Unsystematic noise alone would
not do: the correct answer would stay the mode and greedy SFT would already be right.

Everything here is pure Python and deterministic for a given seed (``random.Random(seed)``,
never the global RNG).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Operands are drawn from 0..MAX_OPERAND (two digits): 10,000 distinct problems.
MAX_OPERAND = 99
DEFAULT_HELDOUT = 500
DEFAULT_CARRY_SLIP = 0.7
DEFAULT_RANDOM_NOISE = 0.1
NOISE_KINDS = ("forgot_carry", "off_by_one", "digit_swap")

_ANSWER_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """One problem ``a + b``. ``prompt`` is what the model sees, ``answer`` the correct result."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return format_prompt(self.a, self.b)

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def carries(self) -> bool:
        """True when the units column carries (the case the careless teacher gets wrong)."""
        return (self.a % 10) + (self.b % 10) >= 10


@dataclass(frozen=True)
class Demonstration:
    """A teacher's demonstration: the prompt, the completion text, and what kind of slip it holds.

    ``kind`` is ``"correct"`` or one of ``NOISE_KINDS``; ``correct`` is the verifier's verdict.
    """

    prompt: str
    completion: str
    answer: int
    kind: str

    @property
    def correct(self) -> bool:
        return self.kind == "correct"


@dataclass(frozen=True)
class Splits:
    """Disjoint problem sets: ``train`` (SFT demonstrations, DPO prompts) and ``heldout`` (evaluation)."""

    train: list[Problem]
    heldout: list[Problem]


# --------------------------------------------------------------------------- formatting


def format_prompt(a: int, b: int) -> str:
    """The prompt for ``a + b``: ``"12+7="``. No spaces: one token per character keeps it short.

    (Zero-padding the operands to a fixed width was tried and did not shorten the SFT loss
    plateau of the tiny model; the plain form reads better.)
    """
    return f"{a}+{b}="


def format_completion(answer: int) -> str:
    """The completion for an answer: its decimal digits (EOS is appended by the data pipeline)."""
    return str(answer)


def parse_answer(completion: str) -> int | None:
    """The integer a completion states, or None when it is not well formed (see ``format_ok``)."""
    text = completion.strip()
    if not _ANSWER_RE.fullmatch(text):
        return None
    return int(text)


def format_ok(completion: str) -> bool:
    """The format check: the completion is one integer and nothing else (surrounding spaces allowed).

    Leading zeros ("019") fail: the teacher never writes them, so they are a format error.
    """
    text = completion.strip()
    if not _ANSWER_RE.fullmatch(text):
        return False
    digits = text.lstrip("-")
    return digits == "0" or not digits.startswith("0")


# --------------------------------------------------------------------------- the verifier


def verify(completion: str, answer: int) -> float:
    """The verifier: 1.0 when the completion is well formed and states ``answer``, else 0.0."""
    if not format_ok(completion):
        return 0.0
    return 1.0 if parse_answer(completion) == answer else 0.0


def verify_batch(completions: list[str], answers: list[int]) -> list[float]:
    """``verify`` over parallel lists (the signature reward functions are called with)."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    return [verify(c, a) for c, a in zip(completions, answers)]


def answer_of_prompt(prompt: str) -> int:
    """The correct answer of a demo prompt ``"a+b="`` (lets a reward function need only the prompt)."""
    m = re.fullmatch(r"\s*(\d+)\+(\d+)=\s*", prompt)
    if not m:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return int(m.group(1)) + int(m.group(2))


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Verifier reward over prompts and completions, for the online methods (GRPO, iterative DPO)."""
    return verify_batch(completions, [answer_of_prompt(p) for p in prompts])


# --------------------------------------------------------------------------- problems


def all_problems(max_operand: int = MAX_OPERAND) -> list[Problem]:
    """Every problem ``a + b`` with ``0 <= a, b <= max_operand``, in a fixed order."""
    return [Problem(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def make_splits(
    seed: int = 0, n_heldout: int = DEFAULT_HELDOUT, max_operand: int = MAX_OPERAND
) -> Splits:
    """Partition all problems into disjoint train and held-out sets, by a seeded shuffle.

    ``a+b`` and ``b+a`` are different problems (different token sequences), so either may land in
    either set; what is guaranteed is that no held-out prompt is ever a training prompt.
    """
    problems = all_problems(max_operand)
    if not 0 < n_heldout < len(problems):
        raise ValueError(f"n_heldout must be in 1..{len(problems) - 1}, got {n_heldout}")
    random.Random(f"prefalign-demo-split-{seed}").shuffle(problems)
    return Splits(train=problems[n_heldout:], heldout=problems[:n_heldout])


def sample_problems(pool: list[Problem], n: int, seed: int) -> list[Problem]:
    """``n`` problems drawn from ``pool`` without replacement (with, when ``n`` exceeds the pool)."""
    rng = random.Random(f"prefalign-demo-sample-{seed}")
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


# --------------------------------------------------------------------------- noisy demonstrations


def forgot_carry(problem: Problem) -> int:
    """The answer with the units carry dropped: 17+25 -> 32. Equal to the answer when nothing carries."""
    return problem.answer - 10 if problem.carries else problem.answer


def _digit_swap(answer: int, rng: random.Random) -> int:
    """Swap two adjacent, different digits of ``answer`` (42 -> 24); off by one when none differ."""
    digits = list(str(answer))
    spots = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
    # A swap that would put a zero in front is not a plausible slip: skip those spots.
    spots = [i for i in spots if not (i == 0 and digits[1] == "0")]
    if not spots:
        return _off_by_one(answer, rng)
    i = rng.choice(spots)
    digits[i], digits[i + 1] = digits[i + 1], digits[i]
    return int("".join(digits))


def _off_by_one(answer: int, rng: random.Random) -> int:
    if answer == 0:
        return 1
    return answer + rng.choice((-1, 1))


def wrong_answer(problem: Problem, kind: str, rng: random.Random) -> int:
    """A wrong answer of the given kind (one of ``NOISE_KINDS``); always differs from the answer."""
    if kind == "forgot_carry":
        if not problem.carries:
            raise ValueError(f"{problem.prompt} has no carry to forget")
        return forgot_carry(problem)
    if kind == "off_by_one":
        return _off_by_one(problem.answer, rng)
    if kind == "digit_swap":
        return _digit_swap(problem.answer, rng)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


def noisy_demonstrations(
    problems: list[Problem],
    seed: int = 0,
    carry_slip: float = DEFAULT_CARRY_SLIP,
    random_noise: float = DEFAULT_RANDOM_NOISE,
) -> list[Demonstration]:
    """The careless teacher's demonstrations, one per problem, deterministic for ``seed``.

    For each problem: with probability ``random_noise`` an unsystematic slip (off by one or a
    digit swap, half each); otherwise, when the units column carries, with probability
    ``carry_slip`` the carry is forgotten; otherwise the correct answer. The expected fraction of
    wrong demonstrations is ``expected_noise(problems, ...)``.
    """
    for name, p in (("carry_slip", carry_slip), ("random_noise", random_noise)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    rng = random.Random(f"prefalign-demo-teacher-{seed}")
    demos = []
    for problem in problems:
        # Draw both coins for every problem so one knob does not shift the other's stream.
        u_random, u_carry = rng.random(), rng.random()
        if u_random < random_noise:
            kind = rng.choice(("off_by_one", "digit_swap"))
        elif problem.carries and u_carry < carry_slip:
            kind = "forgot_carry"
        else:
            kind = "correct"
        value = problem.answer if kind == "correct" else wrong_answer(problem, kind, rng)
        demos.append(Demonstration(problem.prompt, format_completion(value), problem.answer, kind))
    return demos


def expected_noise(
    problems: list[Problem],
    carry_slip: float = DEFAULT_CARRY_SLIP,
    random_noise: float = DEFAULT_RANDOM_NOISE,
) -> float:
    """The expected fraction of wrong demonstrations ``noisy_demonstrations`` writes for ``problems``."""
    if not problems:
        return 0.0
    carry_frac = sum(p.carries for p in problems) / len(problems)
    return random_noise + (1.0 - random_noise) * carry_frac * carry_slip


def best_possible_imitation(problems: list[Problem], carry_slip: float = DEFAULT_CARRY_SLIP) -> float:
    """Greedy accuracy of a perfect imitator of the teacher: the carry problems are lost when
    ``carry_slip > 0.5`` (the slip is the teacher's most likely answer). The SFT ceiling."""
    if not problems:
        return 0.0
    if carry_slip <= 0.5:
        return 1.0
    return sum(not p.carries for p in problems) / len(problems)
