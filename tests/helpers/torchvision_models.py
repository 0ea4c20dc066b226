"""torchvision for the tests that build its models (pytorch-fid's Inception-v3) as references.

torchvision does not import beside the pinned CPU torch from PyPI: its compiled ops do not register,
and its fake-tensor registrations then fail ("operator torchvision::nms does not exist"). `make env`
installs torchvision 0.28.0 (the release paired with torch 2.13) into $(VENV)/torchvision-models, off
the default path; here the two op schemas it needs are defined first, and it is imported from there.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

TORCHVISION_DIR = Path(sys.prefix) / "torchvision-models"

_modules: dict[str, ModuleType] = {}  # torchvision and its submodules, imported once per process
_schemas = []  # the torch.library.Library defining torchvision::nms and qnms, kept alive


@contextlib.contextmanager
def torchvision_imported():
    """Within the block, ``import torchvision`` (and what imports it, e.g. pytorch_fid.inception) works;
    yields torchvision. On exit sys.modules is as before, torchvision and the modules imported in the
    block gone again, so that no later test finds torchvision installed (transformers would then
    choose torchvision image processors). Fails, not skips, when the folder is missing."""
    if not _modules:
        if not (TORCHVISION_DIR / "torchvision").is_dir():
            pytest.fail(f"torchvision is not installed in {TORCHVISION_DIR}: run `make env`")
        import torch

        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _schemas.append(library)
        with mock.patch.object(sys, "path", [str(TORCHVISION_DIR), *sys.path]):
            import torchvision  # noqa: F401

        names = [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]
        _modules.update({name: sys.modules.pop(name) for name in names})
    with mock.patch.dict(sys.modules, _modules):
        yield sys.modules["torchvision"]
