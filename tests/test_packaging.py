"""The PyTorch side installs and imports without the JAX stack (setup.cfg's extras)."""

import configparser
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from perflow_jax.torch import PeRFlowScheduler
from tests.helpers.networks import TINY_UNETS

ROOT = Path(__file__).resolve().parents[1]
# Absent where only `pip install perflow_jax[torch]` installed: the JAX stack, what only the JAX side
# uses, and peft / accelerate (in this venv, not dependencies of torch or diffusers; peft needs transformers).
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "array_record", "tensorflow_datasets", "transformers")
ABSENT = (*JAX_STACK, "peft", "accelerate")


def requirement_names(text: str) -> set[str]:
    return {re.match(r"[\w.-]+", line)[0].lower() for line in text.strip().splitlines()}


def test_jax_stack_is_in_extras_and_the_torch_extra_holds_none_of_it():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = setup["options.extras_require"]
    required = requirement_names(setup["options"]["install_requires"])
    torch_side = required | requirement_names(extras["torch"])
    assert torch_side == {"numpy", "safetensors", "torch", "diffusers"}
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= requirement_names(extras["jax"])
    for accelerator in ("tpu", "cuda"):
        assert "perflow_jax[jax]" in extras[accelerator].split()


def test_torch_side_imports_and_runs_with_the_jax_stack_absent():
    """A PathFinder that finds none of ABSENT: to diffusers and to imports, they are not installed."""
    script = f"""
        import importlib.machinery, importlib.util, json, sys

        class Absent(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                return None if name.partition(".")[0] in {ABSENT} else super().find_spec(name, path, target)

        sys.meta_path = [Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
        import diffusers, torch
        from perflow_jax.torch import PeRFlowScheduler, merge_delta_weights

        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**{json.dumps(TINY_UNETS["sd1"])})
        before = {{key: value.clone() for key, value in unet.state_dict().items()}}
        merge_delta_weights(unet, {{key: torch.full_like(value, 0.5) for key, value in before.items()}})
        scheduler = PeRFlowScheduler(prediction_type="diff_eps")
        scheduler.set_timesteps(4)
        sample = torch.linspace(-1, 1, 32).reshape(1, 2, 4, 4)
        step = scheduler.step(0.5 * sample, scheduler.timesteps[0], sample).prev_sample
        print(json.dumps({{
            "absent": [name for name in {ABSENT} if importlib.util.find_spec(name) is None],
            "merged": all(torch.equal(unet.state_dict()[key], value + 0.5) for key, value in before.items()),
            "timesteps": scheduler.timesteps.tolist(),
            "step": step.flatten().tolist(),
        }}))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["absent"] == list(ABSENT) and report["merged"]
    scheduler = PeRFlowScheduler(prediction_type="diff_eps")
    scheduler.set_timesteps(4)
    sample = torch.linspace(-1, 1, 32).reshape(1, 2, 4, 4)
    step = scheduler.step(0.5 * sample, scheduler.timesteps[0], sample).prev_sample
    assert report["timesteps"] == scheduler.timesteps.tolist()
    assert report["step"] == step.flatten().tolist()
