"""Every module of the package imports on its own (no circular imports, no missing optional deps)."""

import importlib
import pkgutil

import pytest

import prefalign

MODULES = sorted(m.name for m in pkgutil.walk_packages(prefalign.__path__, prefix="prefalign."))


def test_found_the_modules():
    for name in ("prefalign.losses", "prefalign.logprobs", "prefalign.data.tokenize", "prefalign.trainer",
                 "prefalign.step", "prefalign.online.grpo", "prefalign.demo.run", "prefalign.audit", "prefalign.cli"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
