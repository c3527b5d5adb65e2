"""Model folders that are not a plain transformers model, made loadable by every command.

- A LoRA adapter (OUTPUT/model of a `--lora-r` run: adapter_config.json, no config.json):
  the base model named in adapter_config.json's `base_model_name_or_path` (prefalign writes an
  absolute path there, see `absolute_base`) with the adapter merged into it.
- A checkpoint (OUTPUT/checkpoints/step-N: weights.safetensors + optim.pt + state.json): the
  run's base model (OUTPUT/config.yaml's `model`) with the checkpoint's weights copied in; for a
  LoRA run, the adapters rebuilt with the run's LoRA settings, loaded and merged.

Either way the result is a plain model (models.load_model loads it), so eval, generate, audit and train (`--model`) treat it
as any other. With transformers alone: an adapter loads with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`; a
full-fine-tuning checkpoint with `model.load_state_dict(safetensors.torch.load_file(
"step-N/weights.safetensors"), strict=False)` on the base model.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from prefalign.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_WEIGHTS = "weights.safetensors"


class Source(NamedTuple):
    kind: str  # "plain" | "adapter" | "checkpoint"
    path: str  # the folder as given (expanded)
    base: str = ""  # the base model to load first ("" for plain)
    tokenizer: str = ""  # where its tokenizer is


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def _is_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (CHECKPOINT_WEIGHTS, "state.json"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            value = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not read it ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def run_config(checkpoint: str) -> dict:
    """The config.yaml of the run a checkpoint belongs to (OUTPUT/checkpoints/step-N -> OUTPUT)."""
    from prefalign.config import load_yaml

    run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        raise UserError(f"{checkpoint}: a checkpoint, but its run's config.yaml ({path}) is missing: it names "
                        f"the base model the checkpoint's weights apply to")
    return load_yaml(path)


def resolve_model_source(path: str) -> Source:
    """What kind of folder `path` is, and for an adapter or a checkpoint which base model it needs."""
    local = os.path.expanduser(path) if isinstance(path, str) else ""
    if not local or not os.path.isdir(local):
        return Source("plain", path)
    if _is_adapter(local):
        base = _read_json(os.path.join(local, ADAPTER_CONFIG)).get("base_model_name_or_path") or ""
        if not base:
            raise UserError(f"{path}: a LoRA adapter whose {ADAPTER_CONFIG} names no base_model_name_or_path")
        base = _locate(base, local)
        return Source("adapter", local, base, local if _has_tokenizer(local) else base)
    if _is_checkpoint(local) and not os.path.isfile(os.path.join(local, "config.json")):
        cfg = run_config(local)
        base = cfg.get("model") or ""
        if not base:
            raise UserError(f"{path}: its run's config.yaml names no model (an in-process model was trained; "
                            f"load it yourself and apply {CHECKPOINT_WEIGHTS})")
        return Source("checkpoint", local, _locate(base, local), _locate(cfg.get("tokenizer") or base, local))
    return Source("plain", path)


def tokenizer_source(path: str) -> str:
    """Where the tokenizer of the model folder `path` is."""
    src = resolve_model_source(path)
    return src.tokenizer if src.kind != "plain" else path


def _locate(name: str, folder: str) -> str:
    """A relative base path is looked up from the current directory, then from each folder above
    the model folder (a run started as `--model base --output run` records `base`, relative to
    the folder that holds `run`)."""
    base = os.path.expanduser(name)
    if os.path.isabs(base) or os.path.exists(base):
        return base
    above = os.path.dirname(os.path.abspath(folder))
    for _ in range(4):
        if os.path.exists(os.path.join(above, base)):
            return os.path.join(above, base)
        above = os.path.dirname(above)
    return name  # a hub id


def absolute_base(adapter_dir: str) -> None:
    """Rewrite a saved adapter's base_model_name_or_path as an absolute path when it names a local
    folder, so the adapter loads from any working directory (a hub id is left as it is)."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return
    cfg = _read_json(path)
    base = cfg.get("base_model_name_or_path") or ""
    if base and os.path.exists(os.path.expanduser(base)) and not os.path.isabs(base):
        cfg["base_model_name_or_path"] = os.path.abspath(os.path.expanduser(base))
        with open(path, "w") as fh:
            json.dump(cfg, fh, indent=2)
