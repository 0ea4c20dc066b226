"""The PyTorch side installs and runs without the JAX stack (setup.cfg's extras), in a fresh virtualenv; the
requirement files fit the extras' ranges (`make check-requirements` resolves requirements-tpu.txt against the index)."""

import configparser
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

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


def pins(path: Path, python: str) -> dict[str, str]:
    """{name: version} of a requirements file's ``name==version`` lines whose markers hold on ``python``."""
    found = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"python_version": python}):
                assert requirement.name not in found, f"{path.name} pins {requirement.name} twice on Python {python}"
                found[requirement.name] = next(iter(requirement.specifier)).version
    return found


def test_the_jax_extra_admits_jax_0_10_2_to_0_12_and_every_pinned_version():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = setup["options.extras_require"]
    ranges = {r.name: r.specifier for r in map(Requirement, extras["jax"].strip().splitlines())}
    assert [v for v in ("0.10.1", "0.10.2", "0.11.2", "0.12.0.1", "0.13.0") if v in ranges["jax"]] == [
        "0.10.2",
        "0.11.2",
        "0.12.0.1",
    ]
    assert Requirement(extras["tpu"].split()[-1]).specifier == ranges["jax"]
    tested = pins(ROOT / "requirements.txt", "3.11")
    tpu = {python: pins(ROOT / "requirements-tpu.txt", python) for python in ("3.11", "3.12", "3.13")}
    assert tpu["3.11"]["jax"] == tested["jax"] == "0.10.2" and tpu["3.12"]["jax"] == tpu["3.13"]["jax"] == "0.12.0.1"
    assert not [python for python, pinned in tpu.items() if "torch" in pinned or "diffusers" in pinned]
    for python, pinned in [("3.11", tested), *tpu.items()]:
        for name, version in pinned.items():
            assert version in ranges.get(name, SpecifierSet()), f"{name}=={version} on Python {python}"
