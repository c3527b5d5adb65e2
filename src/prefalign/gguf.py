"""A llama.cpp `.gguf` file as a model: `prefalign train --model path/to/model.gguf`.

transformers reads the file and dequantizes every tensor to float (the `gguf` package parses
it). The object it returns still carries the gguf quantization config, so `save_pretrained`
refuses it ("quantized with gguf"); `load_model` therefore rebuilds a plain model of the same
class from the config without it and moves the weights over, and from then on the model is an
ordinary float model: it trains, saves as safetensors and reloads without the gguf file.

No cache: every load converts again (about 10-30 s for a 135M model on a small CPU; a
`--reference copy` run loads the file twice). For repeated runs convert once,
`python -m prefalign.gguf model.gguf out_dir`, and pass `out_dir` as --model. A silent cache
would write 4 bytes/parameter to disk per file, which users of a 7B file would not expect.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from prefalign.errors import UserError

MAGIC = b"GGUF"


def is_gguf(path) -> bool:
    return isinstance(path, str) and path.lower().endswith(".gguf")


def check(path: str) -> str:
    """The expanded path of a readable GGUF file, with the gguf package importable; UserError if not."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise UserError(f"model file not found: {path}")
    try:
        with open(full, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read the model file ({e.strerror})") from None
    if head != MAGIC:
        raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{path}: loading a .gguf model needs the gguf package: pip install 'prefalign[gguf]'")
    return full


def _split(path: str) -> tuple[str, str]:
    full = check(path)
    return os.path.dirname(full) or ".", os.path.basename(full)


def _refused(path: str, e: Exception) -> UserError:
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return UserError(f"could not load {path} as a GGUF model: {first[:200]}")


def load_tokenizer(path: str):
    """The tokenizer stored in the file's metadata (vocabulary, merges, chat template)."""
    from transformers import AutoTokenizer

    folder, name = _split(path)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise _refused(path, e) from None


def load_model(path: str, *, dtype: torch.dtype = torch.float32, attention: str = "auto"):
    """The dequantized model as a plain (saveable) transformers model in `dtype`."""
    from transformers import AutoModelForCausalLM

    folder, name = _split(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (OSError, ValueError, KeyError, NotImplementedError, ImportError) as e:
        raise _refused(path, e) from None
    model = plain_copy(loaded, dtype, attention)
    model.config._name_or_path = os.path.abspath(os.path.expanduser(path))  # what a LoRA adapter names as its base
    return model


def plain_copy(loaded, dtype: torch.dtype, attention: str = "auto"):
    """The same weights in a model built from the config minus its gguf quantization_config."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    kwargs = {} if attention == "auto" else {"attn_implementation": attention}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    state = loaded.state_dict()
    del loaded  # the copy below is the only other full set of weights alive
    model.load_state_dict(state)
    return model.eval()


def convert(path: str, out_dir: str) -> None:
    """Write the model and tokenizer of a GGUF file as an ordinary HF directory (safetensors)."""
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    try:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror}") from None


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m prefalign.gguf MODEL.gguf OUT_DIR", file=sys.stderr)
        return 2
    try:
        convert(*args)
    except UserError as e:
        print(f"prefalign: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
