"""The recipes of configs/*.py, loaded as the training CLI loads them."""

import importlib.util
from pathlib import Path

import ml_collections

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load(name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of configs/``name``.py."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
