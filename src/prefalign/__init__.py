"""prefalign: align causal language models with preference data.

    from prefalign import TrainConfig, train, sft, evaluate, generate

(see prefalign.api and docs/python.md). Importing the package is light: torch and
transformers load when one of these is first used, not on `import prefalign`.
"""

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {"TrainConfig": "prefalign.config", "RunResult": "prefalign.train", "UserError": "prefalign.errors",
         "sft": "prefalign.api", "evaluate": "prefalign.api", "generate": "prefalign.api"}
# `train` is also a submodule (prefalign/train.py), and importing a submodule binds its name on the
# package whatever we bind first. So that module is made callable (callable_module below):
# `prefalign.train(...)` calls prefalign.api.train, and `prefalign.train.train` keeps working.
_CALLABLE = ("train",)
__all__ = ["__version__", *_LAZY, *_CALLABLE]


def __getattr__(name):
    import importlib

    if name in _CALLABLE:
        return importlib.import_module(f"prefalign.{name}")  # the import binds it on the package
    if name not in _LAZY:
        raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def callable_module(module_name: str, api_name: str) -> None:
    """Calling module `module_name` calls prefalign.api.`api_name` (see _CALLABLE)."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            from prefalign import api

            return getattr(api, api_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule


def __dir__():
    return sorted(__all__)
