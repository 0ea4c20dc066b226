"""The PyTorch side installs and runs without the JAX stack (setup.cfg's extras), in a fresh virtualenv."""

import configparser
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from perflow_jax.torch import PeRFlowScheduler
from tests.helpers.networks import TINY_UNETS

ROOT = Path(__file__).resolve().parents[1]
# Absent where only `pip install perflow_jax[torch]` installed: the JAX stack and what only the JAX side uses.
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "array_record", "tensorflow_datasets", "transformers")


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


@pytest.mark.slow
def test_the_torch_extra_installs_in_a_fresh_venv_without_jax_and_runs(tmp_path):
    """`pip install perflow_jax[torch]` in a new virtualenv (torch and diffusers at requirements.txt's pins,
    the CPU torch from the machine's disk): no JAX stack, and the scheduler and the delta merge run there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pins = [
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if re.match(r"(torch|diffusers)==", line)
    ]
    install = [python, "-m", "pip", "install", "--quiet", f"{ROOT}[torch]", *pins]
    result = subprocess.run(install, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    script = f"""
        import importlib.util, json
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
            "absent": [name for name in {JAX_STACK} if importlib.util.find_spec(name) is None],
            "merged": all(torch.equal(unet.state_dict()[key], value + 0.5) for key, value in before.items()),
            "timesteps": scheduler.timesteps.tolist(),
            "step": step.flatten().tolist(),
        }}))
    """
    result = subprocess.run([python, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["absent"] == list(JAX_STACK) and report["merged"]
    scheduler = PeRFlowScheduler(prediction_type="diff_eps")
    scheduler.set_timesteps(4)
    sample = torch.linspace(-1, 1, 32).reshape(1, 2, 4, 4)
    step = scheduler.step(0.5 * sample, scheduler.timesteps[0], sample).prev_sample
    assert report["timesteps"] == scheduler.timesteps.tolist()
    assert report["step"] == step.flatten().tolist()
