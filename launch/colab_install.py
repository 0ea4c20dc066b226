"""The install step of colab_demo.ipynb: the pip commands that add this project to a runtime as it is.

Colab's jax, jaxlib, libtpu and numpy are never replaced (a TPU runtime's jax and libtpu fit its
chips; replacing numpy under a running kernel breaks it): present within the project's ranges
(setup.cfg), they are kept and pinned at their versions while the rest installs; outside them the
install stops with a message. Any other package of requirements-tpu.txt is installed at its pin
only when it is missing or outside the ranges; the project itself goes in with ``--no-deps``.
Loaded by path (launch/ is no package): the notebook runs it before perflow_jax is installed.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import platform
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PRESERVED = ("jax", "jaxlib", "libtpu", "numpy")  # the runtime's own: kept, never replaced


def ranges(setup_cfg: Path) -> dict[str, SpecifierSet]:
    """{name: allowed versions} of setup.cfg's install_requires and its [jax] extra."""
    setup = configparser.ConfigParser()
    setup.read(setup_cfg)
    lines = setup["options"]["install_requires"].split() + setup["options.extras_require"]["jax"].split()
    return {canonicalize_name(r.name): r.specifier for r in map(Requirement, lines)}


def to_install(
    requirements: list[str], allowed: dict[str, SpecifierSet], installed: dict[str, str], python: str
) -> list[str]:
    """The requirement strings for pip: each missing or out-of-range package at its pin, then
    ``name==version`` of each PRESERVED one present, so that pip keeps it (or fails) rather than replace it;
    nothing when nothing is missing.

    requirements: requirements-tpu.txt's lines; installed: {name: version} of this runtime; python: "3.12".
    Raises ValueError for a PRESERVED package present outside ``allowed``.
    """
    installed = {canonicalize_name(name): version for name, version in installed.items()}
    missing = []
    for line in requirements:
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"python_version": python}):
            continue
        name = canonicalize_name(requirement.name)
        version, span = installed.get(name), allowed.get(name, SpecifierSet())
        if name in PRESERVED and version is not None and version not in span:
            raise ValueError(
                f"this runtime has {name} {version}, outside perflow_jax's range {span}: use a runtime whose "
                f"{name} lies in it (Colab's current TPU runtime does), or install perflow_jax by hand"
            )
        if version is None or version not in span:
            requirement.marker = None
            missing.append(str(requirement))
    kept = [f"{name}=={installed[name]}" for name in PRESERVED if name in installed]
    return missing + kept if missing else []


def pip_commands(checkout: Path, python_executable: str = sys.executable) -> list[list[str]]:
    """The pip commands that install ``checkout`` (a clone of this repository) into this runtime."""
    installed = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    python = ".".join(platform.python_version_tuple()[:2])
    requirements = (checkout / "requirements-tpu.txt").read_text().splitlines()
    pip = [python_executable, "-m", "pip", "install", "--quiet"]
    wanted = to_install(requirements, ranges(checkout / "setup.cfg"), installed, python)
    return ([pip + wanted] if wanted else []) + [pip + ["--no-deps", "-e", str(checkout)]]
