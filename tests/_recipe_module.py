"""Import a script of recipes/ as a module in tests (the recipes are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

RECIPES = pathlib.Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(name: str):
    """``recipes/<name>.py`` as a module, registered in ``sys.modules`` with the recipes folder on ``sys.path``
    (recipes import each other by name, e.g. compare imports noisy_dpo)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
