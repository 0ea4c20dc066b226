"""Cloud Storage without a network: ``gs://BUCKET/...`` read and written by etils.epath, as on a pod.

etils.epath sends ``gs://`` to fsspec's "gcs" file system (gcsfs on a pod); ``fake_gcs`` puts a
local file system rooted at a folder in its place, so that the project's own reads and writes of
a ``gs://`` WORKDIR or model folder take the code path they take on GCS. Code that bypasses epath
(``open``, ``os``, ``pathlib``) misses the fake and fails. Orbax's array files do not go through
fsspec (TensorStore's own GCS driver writes them), so they cannot be faked this way.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
from etils.epath import backend
from fsspec.implementations.local import LocalFileSystem


class _FakeGCS(LocalFileSystem):
    """gs://BUCKET/KEY is the file ``root``/BUCKET/KEY."""

    protocol = ("gs", "gcs")
    root = ""
    cachable = False

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        if path.startswith(cls.root):
            return path.rstrip("/")
        return os.path.join(cls.root, path.removeprefix("gs://").removeprefix("gcs://")).rstrip("/")

    def glob(self, path, **kwargs):
        """What gcsfs's glob gives: BUCKET/KEY, without the protocol (epath adds it back)."""
        return [os.path.relpath(p, self.root) for p in super().glob(path, **kwargs)]


@contextlib.contextmanager
def fake_gcs(root: Path) -> Iterator[Path]:
    """Within the block, ``gs://`` URLs are files under ``root``; yields ``root``."""
    registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry is also a read-only view
    previous = registry.get("gcs")
    _FakeGCS.root = str(root)
    fsspec.register_implementation("gcs", _FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield root
    finally:
        if previous is None:
            registry.pop("gcs", None)  # back to gcsfs, imported on demand
        else:
            fsspec.register_implementation("gcs", previous, clobber=True)
        backend.fsspec_backend._get_filesystem.cache_clear()
