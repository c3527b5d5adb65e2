"""The demo's building blocks, shared by `prefalign demo`, `prefalign compare` and the
experiments: an SFT starting point, on-policy pairs labelled by the verifier, and the
held-out evaluation (prefalign.evaluation) scored by the verifier.

Everything trains through the real trainer (`prefalign.train.train`) on JSONL files
written to the run folder, so the demo exercises the code paths a user's run takes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time


from prefalign import config, evaluation, train
from prefalign.demo import task
from prefalign.errors import UserError
from prefalign.demo.model import build_model
from prefalign.demo.tokenizer import build_tokenizer
from prefalign.metrics import write_jsonl
from prefalign.online.pairs import build_pairs
from prefalign.sampling import SamplingConfig, generate

from prefalign.demo.settings import MAX_NEW_TOKENS, DemoSettings  # noqa: F401 (here since before the split)


def _run_config(output: str, data: str, settings: DemoSettings, **kw) -> config.TrainConfig:
    values = dict(data=data, output=output, max_length=16, seed=settings.seed, precision=settings.precision,
                  progress=settings.progress, overwrite=True, lr_schedule="constant", packing=True)
    values.update(kw)
    return config.build(values, where="demo")


def sft_cache_key(settings: DemoSettings) -> dict:
    """The settings the SFT model depends on: OUTPUT/sft/demo_settings.json holds them, and a
    cached SFT model is reused only when they are equal (also by `prefalign compare --sft-from`)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k.startswith(("sft_", "seed", "n_held", "carry",
                                                                                    "random", "precision", "max_op"))}


def sft_start(output: str, settings: DemoSettings):
    """(SFT model, tokenizer, splits): a tiny model fine-tuned on noisy demonstrations.

    Written to OUTPUT/sft (model, metrics, plots); a later call with the same settings reuses it."""
    splits = task.make_splits(seed=settings.seed, n_heldout=settings.n_heldout, max_operand=settings.max_operand)
    tok = build_tokenizer()
    sft_dir = os.path.join(output, "sft")
    stamp = os.path.join(sft_dir, "demo_settings.json")
    key = sft_cache_key(settings)
    if os.path.isfile(stamp) and json.load(open(stamp)) == key:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(os.path.join(sft_dir, "model")), tok, splits
    demos = task.noisy_demonstrations(splits.train, seed=settings.seed, carry_slip=settings.carry_slip,
                                      random_noise=settings.random_noise)
    data = write_jsonl(os.path.join(output, "data", "sft.jsonl"),
                       [{"prompt": d.prompt, "completion": d.completion} for d in demos])
    cfg = _run_config(sft_dir, data, settings, loss="sft", reference="none", lr=settings.sft_lr,
                      warmup_steps=settings.sft_warmup, lr_schedule="linear", max_steps=settings.sft_steps,
                      batch_size=settings.sft_batch, adam_beta2=0.98, log_every=10)
    result = train.train(cfg, model=build_model(tok, seed=settings.seed), tokenizer=tok)
    if result.stopped:  # a half-trained model must never be mistaken for the cached SFT start
        raise UserError(f"SFT stopped early ({result.stopped}); run the command again to train it")
    with open(stamp, "w") as fh:
        json.dump(key, fh)
    return result.policy.eval(), tok, splits


def sample(model, tok, problems: list[task.Problem], n: int, temperature: float, seed: int):
    """n samples per problem: (texts [P*n], scores [P*n], Generations)."""
    gen = generate(model, tok, [p.prompt for p in problems],
                   SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, n=n, seed=seed))
    answers = [p.answer for p in problems for _ in range(n)]
    return gen.texts, task.verify_batch(gen.texts, answers), gen


def sample_pairs(model, tok, problems: list[task.Problem], settings: DemoSettings, seed: int) -> list[dict]:
    """On-policy pairs: samples of `model` labelled by the verifier (correct = chosen)."""
    texts, scores, _ = sample(model, tok, problems, settings.samples, settings.temperature, seed)
    return build_pairs([p.prompt for p in problems], texts, scores, group_size=settings.samples, min_gap=0.5,
                       pairs_per_prompt=settings.pairs_per_prompt, extra={"answer": [p.answer for p in problems]})


def heldout_metrics(model, tok, problems: list[task.Problem], settings: DemoSettings, reference_model=None,
                    degenerate: bool = False) -> dict:
    """evaluation.generation_metrics on `problems`, scored by the task's verifier (1 = right and well formed)."""
    answers = [p.answer for p in problems]
    return evaluation.generation_metrics(model, tok, [tok(p.prompt)["input_ids"] for p in problems],
                                         lambda texts: task.verify_batch(texts, answers),
                                         max_new_tokens=MAX_NEW_TOKENS, seed=settings.seed,
                                         reference_model=reference_model,
                                         well_formed=task.format_ok if degenerate else None)


def dpo(output: str, sft_model, tok, train_pairs: str, eval_pairs: str, settings: DemoSettings, **overrides):
    """DPO (or any loss via overrides) from a copy of the SFT model against the frozen SFT model."""
    kw = dict(loss="dpo", beta=settings.beta, lr=settings.dpo_lr, max_steps=settings.dpo_steps,
              batch_size=settings.dpo_batch, eval_data=eval_pairs)
    kw.update(overrides)
    cfg = _run_config(output, train_pairs, settings, **kw)
    ref = copy.deepcopy(sft_model) if cfg.reference != "none" and cfg.loss != "sft" else None
    return train.train(cfg, model=copy.deepcopy(sft_model).train(), tokenizer=tok, ref_model=ref)


class Timer:
    """Wall-clock per named stage."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.time()

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.time() - self.t0

        return _Stage()
