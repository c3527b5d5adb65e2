"""The Python API: `from prefalign import TrainConfig, train, sft, evaluate, generate`.

Thin wrappers over the functions the CLI runs, so a notebook and `prefalign train` share one
code path. In-memory data (a `datasets.Dataset` or a list of dicts) is written to a JSON Lines
file first and that file is what the run reads: validation, `on_bad_row`/rejects.jsonl, the
data fingerprint in config.yaml and `--resume` all work exactly as for a file on disk.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from prefalign.config import TrainConfig, build
from prefalign.errors import UserError

_SFT_DEFAULTS = {"loss": "sft", "lr": 2e-5, "reference": "none"}  # as `prefalign sft`


def data_path(data, where: str = "data") -> str:
    """A path for `data`: a path is kept; a `datasets.Dataset` or a list of dicts is written to a
    JSON Lines file in a fresh temporary directory (kept after the run: rejects.jsonl and a
    resume name it)."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return os.fspath(data) if data is not None else ""
    rows = data.to_list() if hasattr(data, "to_list") else data
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{where}: expected a path, a datasets.Dataset or a list of dicts; got {type(data).__name__}")
    path = os.path.join(tempfile.mkdtemp(prefix="prefalign-data-"), f"{where}.jsonl")
    from prefalign.metrics import write_jsonl

    return write_jsonl(path, rows)


def _config(cfg: TrainConfig | None, fields: dict, base: dict) -> TrainConfig:
    # cfg's fields left at their defaults do not override the command's defaults (sft's loss and lr).
    defaults = dataclasses.asdict(TrainConfig())
    given = {k: v for k, v in dataclasses.asdict(cfg).items() if v != defaults[k]} if cfg is not None else {}
    values = {**base, **given, **fields}
    for key in ("data", "eval_data"):
        if key in values:
            values[key] = data_path(values[key], key)
    if not values.get("output"):
        values["output"] = tempfile.mkdtemp(prefix="prefalign-run-")
    values.setdefault("progress", False)
    return build({k: v for k, v in values.items() if v is not None}, where="prefalign.train")


def _split_objects(model, tokenizer, ref_model, fields: dict) -> dict:
    """Paths go into the config; model and tokenizer objects are passed to the run as they are."""
    objects = {}
    for name, value in (("model", model), ("tokenizer", tokenizer), ("ref_model", ref_model)):
        if isinstance(value, (str, os.PathLike)):
            fields[name] = os.fspath(value)
        elif value is not None:
            objects[name] = value
    if "model" in objects and "tokenizer" not in objects and not fields.get("tokenizer"):
        raise UserError("prefalign.train: a model object needs its tokenizer (tokenizer=...)")
    return objects


def train(cfg: TrainConfig | None = None, *, model=None, tokenizer=None, data=None, ref_model=None, **fields):
    """Train with a preference loss (default dpo) or SFT, as `prefalign train` does.

    cfg: a TrainConfig; any TrainConfig field may also be given as a keyword (it wins over cfg).
    model, tokenizer, ref_model: paths / hub ids, or in-process objects (a PreTrainedModel, its
        tokenizer, an optional reference model; without one the reference is a frozen copy of the
        model as given, or the adapters switched off under LoRA). A model object is trained in place.
    data, eval_data: a path, a `datasets.Dataset` or a list of dicts (written to a JSONL file first,
        see the module doc).
    output: the run directory (model/, metrics.jsonl, checkpoints/); default a fresh temporary one.

    Returns a RunResult: `.policy` (the trained model), `.tokenizer`, `.history` (one dict per
    logged step), `.final_eval`, `.output`, `.steps`. Bad inputs raise prefalign.errors.UserError.
    """
    return _run(cfg, {}, model, tokenizer, data, ref_model, fields)


def sft(cfg: TrainConfig | None = None, *, model=None, tokenizer=None, data=None, **fields):
    """Supervised fine-tuning (loss sft, lr 2e-5, no reference), as `prefalign sft`; the same
    arguments and result as `train`."""
    return _run(cfg, _SFT_DEFAULTS, model, tokenizer, data, None, fields)


def _run(cfg, base, model, tokenizer, data, ref_model, fields):
    from prefalign import train as trainer

    if data is not None:
        fields["data"] = data
    objects = _split_objects(model, tokenizer, ref_model, fields)
    config = _config(cfg, fields, base)
    if "model" in objects and "ref_model" not in objects and not config.ref_model:
        from prefalign import prepare

        if prepare.reference_strategy(config, prepare.loss_spec(config)) in ("copy", "precomputed"):
            import copy  # the reference is the model as given, before training changes it in place

            objects["ref_model"] = copy.deepcopy(objects["model"])
    return trainer.train(config, **objects)


def evaluate(model, ref_model, data, *, tokenizer=None, beta: float = 0.1, batch_size: int = 8,
             max_length: int = 1024, samples: int = 0, max_new_tokens: int = 64) -> dict:
    """Held-out metrics of `model` against `ref_model` on preference pairs, as `prefalign eval`:
    the dpo loss at `beta`, implicit-reward accuracy and margins, log-probs; with `samples` > 0 also
    the KL to the reference on the policy's own samples. Models: paths or objects (objects need
    `tokenizer`); data: a path, a Dataset or a list of dicts."""
    from types import SimpleNamespace

    from prefalign.evaluation import run_eval

    fields: dict = {}
    objects = _split_objects(model, tokenizer, ref_model, fields)
    args = SimpleNamespace(model=fields.get("model", ""), ref_model=fields.get("ref_model", ""),
                           tokenizer=fields.get("tokenizer", ""), data=data_path(data), beta=beta,
                           batch_size=batch_size, max_length=max_length, samples=samples,
                           max_new_tokens=max_new_tokens, json=None, quiet=True)
    return run_eval(args, **objects)


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 128, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, n: int = 1, seed: int | None = None, batch_size: int = 64):
    """Sample `n` completions per prompt (strings or token-id lists); temperature 0 = greedy.
    `model`/`tokenizer`: objects, or a path (the tokenizer then defaults to the model's).
    Returns prefalign.sampling.Generations (`.texts`, `.token_ids`, `.finish_reasons`, row i*n+j =
    sample j of prompt i)."""
    from prefalign import models
    from prefalign.sampling import SamplingConfig, generate as sample

    if isinstance(model, (str, os.PathLike)):
        tokenizer = models.load_tokenizer(os.fspath(tokenizer or model)) if not hasattr(tokenizer, "decode") \
            else tokenizer
        model = models.load_model(os.fspath(model))
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = models.load_tokenizer(os.fspath(tokenizer))
    if tokenizer is None:
        raise UserError("prefalign.generate: a model object needs its tokenizer")
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            n=n, seed=seed)
    return sample(model, tokenizer, list(prompts), config, batch_size=batch_size)
