"""Loading models and tokenizers (local path or hub id), LoRA/QLoRA through peft.

Safety defaults: `trust_remote_code` is off unless asked, and weights load from
safetensors only (a repo with only pickled `.bin` weights is refused, since
unpickling runs code).
"""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors import SafetensorError

from prefalign import gguf, paths, sources
from prefalign.errors import UserError


def _check_source(path: str, what: str) -> None:
    if gguf.is_gguf(path):  # a file, not a directory
        gguf.check(path)
        return
    if not path:
        raise UserError(f"no {what} given (--{what})")
    if paths.looks_local(path) or os.path.exists(os.path.expanduser(path)):
        if not os.path.isdir(os.path.expanduser(path)):
            raise UserError(f"{what} path not found: {path}{paths.did_you_mean(path, dirs_only=True)}")
        if (what == "model" and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json"))
                and sources.resolve_model_source(path).kind == "plain"):
            raise UserError(f"{path}: not a model directory (no config.json, no LoRA adapter, not a checkpoint)")
    elif "/" not in path and (paths.near_miss(path, dirs_only=True) or paths.hub_offline()):
        # A bare word next to a local folder of almost that name is a typo, not one of the hub's
        # few legacy ids without an owner ("gpt2"): fail now, not after the hub's retries.
        raise UserError(f"no such {what} directory {path!r} (a hub id looks like owner/name)"
                        f"{paths.did_you_mean(path, dirs_only=True)}")
    elif paths.hub_offline() and not paths.in_hub_cache(path):
        raise UserError(f"{what} {path}: no such directory, and HF_HUB_OFFLINE is set and the hub cache "
                        f"does not hold it{paths.did_you_mean(path, dirs_only=True)}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (EOS stands in when the tokenizer has none)."""
    from transformers import AutoTokenizer

    if gguf.is_gguf(path):  # a llama.cpp file: vocabulary and chat template from its metadata
        return _with_pad(gguf.load_tokenizer(path), path)
    path = sources.tokenizer_source(path)  # a LoRA adapter or checkpoint folder: its tokenizer's place
    _check_source(path, "tokenizer")
    try:
        with quiet_third_party():
            tok = AutoTokenizer.from_pretrained(os.path.expanduser(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    return _with_pad(tok, path)


def _with_pad(tok, path: str):
    if tok.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer has no EOS token; completions need one to end "
                        f"(set eos_token in tokenizer_config.json)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               qlora: bool = False, attention: str = "auto"):
    """Any AutoModelForCausalLM from a local directory or a hub id, from safetensors.

    `attention`: the transformers attn_implementation ("auto" leaves transformers' choice)."""
    from transformers import AutoModelForCausalLM

    if gguf.is_gguf(path):  # a llama.cpp file, dequantized to a plain float model
        if qlora:
            raise UserError(f"{path}: --qlora needs a model directory; convert the file first "
                            f"(python -m prefalign.gguf {path} OUT_DIR)")
        return gguf.load_model(path, dtype=dtype, attention=attention)
    src = sources.resolve_model_source(path)  # a LoRA adapter or a checkpoint: its base, then its weights
    if src.kind != "plain":
        return sources.load(src, lambda base: load_model(base, trust_remote_code=trust_remote_code, dtype=dtype,
                                                         attention=attention), qlora=qlora)
    _check_source(path, "model")
    # Loading info + no exception on size mismatches: prefalign itself refuses missing or
    # mismatched tensors (transformers would only print a report and train on random weights).
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=dtype, use_safetensors=True,
                  output_loading_info=True, ignore_mismatched_sizes=not qlora)
    if attention != "auto":
        kwargs["attn_implementation"] = attention
    if qlora:
        kwargs["quantization_config"] = _qlora_config()
    try:
        with _quiet_load_report(), quiet_third_party():
            model, info = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), **kwargs)
    except SafetensorError as e:
        raise UserError(f"{path}: the safetensors weights are truncated or corrupted ({e})") from None
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0]
        if "safetensors" in first.lower():
            raise UserError(f"{path}: no safetensors weights found; prefalign does not unpickle .bin "
                            f"weights (convert them with save_pretrained(safe_serialization=True))") from None
        if attention != "auto" and attention in first:
            raise UserError(f"{path}: {_attention_refused(first, attention)}") from None
        raise UserError(f"could not load a model from {path}: {first}") from None
    check_loading_info(path, info)
    return model


def check_loading_info(path: str, info: dict) -> None:
    """Refuse weights files that lack tensors or hold tensors of another shape (tied weights,
    such as an lm_head tied to the embeddings, are not reported missing by transformers)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{path}: the weights file lacks {', '.join(missing[:3])}{more} "
                        f"(they would train from random values)")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        name, saved, wanted = mismatched[0]
        raise UserError(f"{path}: {name} has shape {list(saved)} in the weights but {list(wanted)} in config.json "
                        f"(config and weights do not match, e.g. vocab_size)")


def check_vocab(tokenizer, model, model_path: str) -> None:
    """Before the first step: an id past the embedding rows would index out of range mid-run."""
    rows = model.get_input_embeddings().weight.shape[0]
    largest = len(tokenizer) - 1
    if largest >= rows:
        raise UserError(f"the tokenizer has ids up to {largest} but the model {model_path or '(in-process)'} has "
                        f"only {rows} embedding rows; use the model's own tokenizer (--tokenizer) or resize "
                        f"its embeddings")


def verbose() -> bool:
    """`prefalign -v`: third-party progress bars and warnings are shown (an environment variable, so
    the processes of --num-processes inherit it)."""
    return os.environ.get("PREFALIGN_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def quiet_third_party():
    """transformers' "Loading weights" bars and the libraries' FutureWarnings, off while prefalign
    loads a model or tokenizer (unless -v): they speak to library authors, not to users, and bury
    prefalign's own lines. Only during loading: warnings from the user's own code stay on."""
    if verbose():
        yield
        return
    import warnings

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    noisy = [hf_logging.get_logger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(hf_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


# Deprecation notices libraries raise inside each other, outside loading (a user cannot act on them).
KNOWN_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


def hide_known_warnings() -> None:
    """For a CLI run without -v: the KNOWN_WARNINGS off, every other warning as Python decides."""
    import warnings

    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


# Loggers that warn on every load of a sound model ("The following layers were not sharded": a
# tensor-parallel plan nobody asked for).
_NOISY_LOGGERS = ("transformers.distributed.tensor_parallel",)


@contextlib.contextmanager
def _quiet_load_report():
    # transformers prints a multi-line LOAD REPORT before our one-line error says the same.
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def set_attention(model, attention: str):
    """Switch an in-process model (the demo's, the tests') to another attention implementation."""
    if attention == "auto":
        return model
    try:
        model.set_attn_implementation(attention)
    except (ValueError, ImportError) as e:
        raise UserError(_attention_refused(str(e).splitlines()[0], attention)) from None
    return model


def _attention_refused(first_line: str, attention: str) -> str:
    # transformers' own message names the architecture; add which flag to change.
    return f"attention {attention!r} is not available for this model ({first_line[:160]}); use --attention sdpa or eager"


def _qlora_config():
    if not torch.cuda.is_available():
        raise UserError("qlora needs a CUDA GPU (4-bit weights through bitsandbytes); use LoRA without --qlora on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("qlora needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: str = "all-linear", qlora=False,
               task_type: str = "CAUSAL_LM"):
    """Wrap the model with LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=task_type, bias="none")
    try:
        with quiet_third_party():  # peft reads transformers' deprecated is_gradient_checkpointing
            return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"LoRA target modules {target_modules!r}: {str(e).splitlines()[0]}") from None


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_model(model, tokenizer, path: str, merged_path: str | None = None) -> None:
    """HF format (safetensors): a full model, or a LoRA adapter (+ merged weights on request).

    Each directory is written under a temporary name beside it and renamed into place, so `path`
    always holds a whole model: the previous one or this one (a full disk leaves the previous)."""
    from prefalign import rundir

    targets = [path] + ([merged_path] if merged_path and is_peft(model) else [])
    tmps = [os.path.join(os.path.dirname(t) or ".", f"{rundir.TMP}{os.path.basename(t)}-{os.getpid()}")
            for t in targets]
    try:
        for tmp in tmps:
            if os.path.exists(tmp):
                rundir.remove(tmp)
        os.makedirs(tmps[0])
        with quiet_third_party():  # transformers' "Writing model shards" bar
            model.save_pretrained(tmps[0], safe_serialization=True)
            sources.absolute_base(tmps[0])  # a LoRA adapter then loads from any directory
            tokenizer.save_pretrained(tmps[0])
            if len(tmps) > 1:
                import copy

                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(tmps[1], safe_serialization=True)
                tokenizer.save_pretrained(tmps[1])
        for tmp, final in zip(tmps, targets):
            rundir.follow_umask(tmp)
            rundir.swap_in(tmp, final)
    except OSError as e:
        raise UserError(f"could not save the model to {path}: {e.strerror or e}"
                        + (f" ({e.filename})" if e.filename else "")) from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                rundir.remove(tmp)
