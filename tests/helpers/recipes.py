"""The recipes of configs/*.py, loaded as the training CLI loads them."""

from pathlib import Path

import ml_collections

from perflow_jax import recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load(name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of configs/``name``.py."""
    return recipe.config_module(CONFIGS / f"{name}.py").get_config()
