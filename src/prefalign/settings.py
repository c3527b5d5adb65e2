"""The settings of `prefalign eval` and `prefalign generate`: their flags and --config keys.

Import-light (no torch), like config.TrainConfig and online.settings: prefalign.fields turns each
field into a flag (max_new_tokens <-> --max-new-tokens) and reads the same keys from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.fields import option
from prefalign.validation import check_table


@dataclass
class EvalConfig:
    """Held-out metrics of a trained model against its reference (pairs or KTO rows)."""

    model: str = option("", "the trained model: a local path, a LoRA output folder or a hub id")
    ref_model: str = option("", "its reference model (the implicit rewards and the KL are measured against it)")
    tokenizer: str = option("", "tokenizer path or hub id (empty: the model's)")
    data: str = option("", "held-out preference pairs, or KTO rows (prompt, completion, label)")
    beta: float = option(0.1, "beta of the implicit reward")
    batch_size: int = option(8, "pairs per forward pass")
    max_length: int = option(1024, "max tokens of prompt + completion")
    samples: int = option(32, "prompts to sample for the KL estimate (0 = skip)")
    max_new_tokens: int = option(64, "new tokens per sample of the KL estimate")
    json: str = option("", "also write the results to this JSON file")

    RANGES = {"beta": "> 0", "batch_size": ">= 1", "max_length": ">= 1", "samples": ">= 0", "max_new_tokens": ">= 1"}
    PATHS = ("model", "ref_model", "tokenizer", "data", "json")
    REQUIRED = ("model", "ref_model", "data")

    def __post_init__(self):
        check_table(self, self.RANGES, "eval")


@dataclass
class GenerateConfig:
    """Completions for a prompts file, one JSONL row per sample, optionally scored."""

    model: str = option("", "model: a local path, a LoRA output folder or a hub id")
    tokenizer: str = option("", "tokenizer path or hub id (empty: the model's)")
    prompts: str = option("", "a file with a `prompt` column (jsonl/json/parquet/csv)")
    output: str = option("", "JSONL out: prompt, completion, sample, finish_reason, num_tokens")
    n: int = option(1, "samples per prompt")
    max_new_tokens: int = option(128, "new tokens per completion")
    max_prompt_length: int = option(512, "max prompt tokens (longer prompts are truncated)")
    temperature: float = option(1.0, "sampling temperature; 0 = greedy")
    top_p: float = option(1.0, "nucleus sampling p")
    top_k: int = option(0, "top-k sampling; 0 = off")
    stop: list[str] = option([], "stop strings (EOS always stops)")
    seed: int = option(0, "sampling seed")
    batch_size: int = option(64, "rows decoded together")
    reward: list[str] = option([], "also score each completion with these reward specs")

    RANGES = {"n": ">= 1", "max_new_tokens": ">= 1", "max_prompt_length": ">= 1", "temperature": ">= 0",
              "top_p": "(0, 1]", "top_k": ">= 0", "seed": "[0, 2**32)", "batch_size": ">= 1"}
    PATHS = ("model", "tokenizer", "prompts", "output")
    REQUIRED = ("model", "prompts", "output")

    def __post_init__(self):
        check_table(self, self.RANGES, "generate")
