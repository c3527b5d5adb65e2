"""prefalign: align causal language models with preference data.

    from prefalign import TrainConfig, train, sft, evaluate, generate
    from prefalign import GRPOConfig, grpo, PPOConfig, ppo, IterativeConfig, iterate
    from prefalign import RewardConfig, train_reward

(see prefalign.api and docs/python.md). Importing the package is light: torch and
transformers load when one of these is first used, not on `import prefalign`.
"""

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {"TrainConfig": "prefalign.config", "RunResult": "prefalign.trainer", "UserError": "prefalign.errors",
         "train": "prefalign.api", "sft": "prefalign.api", "evaluate": "prefalign.api", "generate": "prefalign.api",
         # the online methods and the reward model: each run function takes its settings and objects
         "GRPOConfig": "prefalign.online.settings", "grpo": "prefalign.online.grpo",
         "PPOConfig": "prefalign.online.settings", "ppo": "prefalign.online.ppo",
         "IterativeConfig": "prefalign.online.settings", "iterate": "prefalign.online.iterative",
         "RewardConfig": "prefalign.reward_config", "train_reward": "prefalign.reward_train"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(__all__)
