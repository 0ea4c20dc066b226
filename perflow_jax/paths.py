"""Local folders and storage URLs (``gs://`` and the other schemes of etils.epath) alike.

A WORKDIR, a converted model folder and an export's source are opened as ``epath.Path``: a local
path reads as with pathlib, a URL goes through fsspec (gcsfs for ``gs://``) and Orbax takes it as
is (pathlib would make ``gs://b/x`` the local folder ``gs:/b/x``). What a library reads only
from a disk (ArrayRecord data, tokenizer files) goes through ``local`` or ``local_copy``.
``tests/test_paths.py`` keeps pathlib's ``Path`` calls out of the modules that handle those paths.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a storage URL (``scheme://...``) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URL as it is, a local path made absolute as pathlib does (``..`` kept).

    (epath's own ``absolute`` turns ``gs://b/x`` into ``$PWD/gs:/b/x``.)
    """
    return epath.Path(path) if is_url(path) else epath.Path(pathlib.Path(path).absolute())


def local(path: str | os.PathLike, error: type[Exception], what: str) -> pathlib.Path:
    """``path`` as a local ``pathlib.Path``; a URL raises ``error`` naming ``what`` (e.g. "--out") and the fix."""
    if is_url(path):
        raise error(
            f"{what} {os.fspath(path)} is a URL, but {what} is a local path: mount the bucket (gcsfuse) and give "
            "the mounted path, or use a local disk and copy with gcloud storage cp -r"
        )
    return pathlib.Path(path)


@contextlib.contextmanager
def local_copy(folder: epath.Path) -> Iterator[pathlib.Path]:
    """A local folder with ``folder``'s files (not its subfolders): ``folder`` itself, or a URL's temporary copy."""
    if not is_url(folder):
        yield pathlib.Path(folder)
        return
    with tempfile.TemporaryDirectory() as copy:
        for file in folder.iterdir():
            if file.is_file():
                (pathlib.Path(copy) / file.name).write_bytes(file.read_bytes())
        yield pathlib.Path(copy)


def upload(folder: pathlib.Path, url: epath.Path) -> None:
    """Copy the local ``folder``'s files to ``url``, replacing what was there, file by file."""
    if url.exists():
        url.rmtree()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            target = url / file.relative_to(folder).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(file, "rb") as source, target.open("wb") as copy:
                shutil.copyfileobj(source, copy)


def open_append(path: epath.Path, mode: str = "a", part_bytes: int | None = None) -> IO:
    """``path`` opened for appending (``mode`` "a" or "ab"). Object stores cannot append to a file, so
    for a URL the file is rewritten whole, what it held and all that was written, at each ``flush``;
    with ``part_bytes``, a flush that leaves it that long goes on in a new file, ``path``.0001, .0002, ...
    (for TensorBoard event files, which a reader takes in name order: no file is rewritten forever)."""
    if not is_url(path):
        return open(path, mode)
    return _Rewritten(path, mode, part_bytes)


class _Rewritten:
    """A file opened for appending on an object store: kept in memory, written whole by ``flush`` and ``close``."""

    def __init__(self, path: epath.Path, mode: str, part_bytes: int | None):
        self.first, self.path, self.binary, self.part_bytes, self.parts = path, path, "b" in mode, part_bytes, 0
        self.empty = b"" if self.binary else ""
        self.held = (path.read_bytes() if self.binary else path.read_text()) if path.exists() else self.empty
        self.written = len(self.held)

    def write(self, data: str | bytes) -> int:
        self.held += data
        return len(data)

    def flush(self) -> None:
        if len(self.held) != self.written:
            (self.path.write_bytes if self.binary else self.path.write_text)(self.held)
            self.written = len(self.held)
        if self.part_bytes is not None and self.written >= self.part_bytes:
            self.parts += 1
            self.path = self.first.parent / f"{self.first.name}.{self.parts:04d}"
            self.held, self.written = self.empty, 0

    def close(self) -> None:
        self.flush()
