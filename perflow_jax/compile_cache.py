"""JAX's persistent compilation cache: compiled programs are saved to a folder, and a later process
that compiles the same program (a run resumed after a preemption, the next sample command) loads it
from there instead of compiling it again.

``train`` keeps it in ``config.compilation_cache_dir`` ("": WORKDIR/jax_cache); ``sample`` and
``evaluate`` in ``--compilation-cache DIR``. ``"none"`` (train) or no flag leaves JAX's own
settings, e.g. the JAX_COMPILATION_CACHE_DIR environment variable. The folder may be on GCS
(``gs://``: JAX writes it through etils.epath). Only process 0 writes entries: on a pod the other
hosts load them when the folder is one they all see (gs:// or a shared mount).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

FLAG_HELP = "JAX compilation cache: load compiled programs from DIR and save new ones there"  # --compilation-cache
OFF = "none"  # config.compilation_cache_dir: no cache of this run's own
MIN_COMPILE_SECS = 1.0  # programs compiled faster are not saved (the step and the samplers take longer)
_HIT = "/jax/compilation_cache/cache_hits"  # the jax.monitoring event of a program loaded from the cache


def training_folder(setting: str, workdir: str | os.PathLike) -> str | None:
    """The folder of ``config.compilation_cache_dir``: WORKDIR/jax_cache for "", None for "none", else itself."""
    if setting == OFF:
        return None
    return setting or os.path.join(os.fspath(workdir), "jax_cache")


@contextlib.contextmanager
def cache_in(folder: str | os.PathLike | None, min_compile_secs: float = MIN_COMPILE_SECS) -> Iterator[None]:
    """Compilations in this block load from and save to ``folder``; afterwards JAX's settings are as they
    were. ``folder`` None: nothing changes."""
    if folder is None:
        yield
        return
    settings = {
        "jax_compilation_cache_dir": os.fspath(folder),
        "jax_persistent_cache_min_compile_time_secs": min_compile_secs,
    }
    saved = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # a cache this process opened before reads the new folder
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


class Loads:
    """A context manager counting the compilations in its block that were loads from the persistent cache."""

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, **kwargs) -> None:
        if event == _HIT:
            self.count += 1

    def __enter__(self) -> Loads:
        jax.monitoring.register_event_listener(self._listen)
        return self

    def __exit__(self, *exc_info) -> None:
        jax.monitoring.unregister_event_listener(self._listen)
