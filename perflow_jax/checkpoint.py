"""Training checkpoints: Orbax CheckpointManager in WORKDIR/checkpoints.

Each checkpoint holds the train state (student, optimizer, EMA, step), the grain iterator's
position (one small JSON per process) and the run's config; saving is asynchronous, and Orbax
commits a checkpoint only once it is complete, so an interrupted save leaves no half-written
checkpoint behind, and the previous ones stay.

The random state needs no key of its own: step n draws with
``fold_in(key(config.train.seed), n)``, and both the seed (in the saved config, which a resumed
run may not change) and the step are in the checkpoint, so a resumed run draws what an
uninterrupted one would (``tests/test_train.py``, SIGTERM then resume).

A checkpoint that cannot be read back (truncated or garbled files) is named in a warning and the
newest readable one is used instead (a resuming run moves the broken one to
WORKDIR/broken_checkpoints/, out of the way of its own saves); a save that fails (a full disk)
raises CheckpointError, and the temporary folders of failed saves are removed at the next start.
A WORKDIR is written by one run at a time: ``WorkdirLock``. It may be a ``gs://`` URL: Orbax and
etils.epath write it directly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from perflow_jax import paths
from perflow_jax import weights as weights_io  # trained_unet has a `weights` parameter


class Checkpoints:
    """Save and restore a training run's checkpoints.

    Args:
      workdir: the run's folder; checkpoints go to ``workdir/checkpoints/<step>``.
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3):
        self.workdir = paths.absolute(workdir)
        self.directory = self.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step of the last save started

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, config: dict[str, Any]) -> None:
        """Start saving (returns before the write ends; ``wait`` blocks until it is committed).

        Raises CheckpointError if this save, or the previous one, failed.
        """
        self.wait()
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                    config=ocp.args.JsonSave(config),
                ),
                force=True,
            )
        except OSError as error:
            raise self._failed(error) from None

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """(state, config) of checkpoint ``step``; ``data_iterator`` is moved to the saved position.

        ``abstract_state``: the state's tree of jax.ShapeDtypeStruct with the shardings to restore
        into (e.g. ``jax.eval_shape`` of the initial state with ``sharding`` set).
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.config

    def restore_newest(self, abstract_state: Any, data_iterator: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores (as ``restore``); None when there is none.

        Newer checkpoints that do not restore are named in a warning and moved to
        WORKDIR/broken_checkpoints/ (kept for a look, out of the way of this run's next saves).
        """
        steps = self.all_steps()
        if not steps:
            return None
        step, state = _newest_readable(
            self.directory, steps, lambda s: self.restore(s, abstract_state, data_iterator)[0]
        )
        broken = [s for s in steps if s > step]
        if broken:
            if jax.process_index() == 0:
                aside = self.workdir / "broken_checkpoints"
                aside.mkdir(exist_ok=True)
                stamp = time.strftime("%Y%m%dT%H%M%S")
                for s in broken:
                    (self.directory / str(s)).rename(aside / f"{s}-{stamp}")
                print(f"warning: moved the unreadable checkpoints {broken} to {aside}", file=sys.stderr, flush=True)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("perflow_broken_checkpoints_moved")
            self.manager.reload()
        return step, state

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config a checkpoint was saved with (without touching its state)."""
        return _saved_config(self.manager, step)

    def check(self) -> None:
        """Raise CheckpointError if the last save has failed (without waiting for one still being written)."""
        if not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the last save is committed; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # an OSError, or whatever the file system's library raised
            raise self._failed(error) from None

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _failed(self, error: BaseException) -> CheckpointError:
        self.manager.reload()
        kept = self.manager.latest_step()
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        return CheckpointError(
            f"saving the checkpoint of step {self._saving} in {self.directory} failed ({_one_line(error)}); the run "
            f"stops, its newest checkpoint is {'step ' + str(kept) if kept is not None else 'none'}: "
            + ("free some space" if full else "fix the cause")
            + ", then run the same command again to resume"
        )


class WorkdirLock:
    """WORKDIR/lock while a training run writes WORKDIR: its host, pid and start time as JSON.

    A context manager: it creates the file (atomically on a disk, O_CREAT | O_EXCL; on an object store,
    which has no such call, after checking that it does not exist) and removes it on exit;
    SIGTERM, until a later handler (the training loop's) takes over, exits with status 143 through
    that exit (one process; a multi-process run leaves SIGTERM to JAX's preemption service). A lock
    of a process of this host that runs no more is taken over with a warning; another run's, or one
    from another host (which cannot be checked), raises CheckpointError.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = paths.absolute(workdir) / "lock"
        start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": start}
        self._previous_sigterm = None

    def __enter__(self) -> WorkdirLock:
        while True:
            try:
                self._create()
            except FileExistsError:
                self._take_over_if_stale()
                continue
            break
        if jax.process_count() == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def _create(self) -> None:
        """Write the lock file; FileExistsError if there is one."""
        if paths.is_url(self.path):
            if self.path.exists():
                raise FileExistsError(self.path)
            self.path.write_text(json.dumps(self.holder))
            return
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as file:
            json.dump(self.holder, file)

    def __exit__(self, *exc_info) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self._read() == self.holder:  # still ours (not removed by hand and taken by another run)
            self.path.unlink()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _take_over_if_stale(self) -> None:
        holder = self._read()
        remove = f"if no run uses it, remove {self.path} and start again"
        if not isinstance(holder, dict) or not {"host", "pid", "start"} <= holder.keys():
            raise CheckpointError(f"{self.path.parent} is locked by {self.path}, which names no run: {remove}")
        who = f"process {holder['pid']} on {holder['host']}, started {holder['start']}"
        if holder["host"] != self.holder["host"]:
            raise CheckpointError(
                f"{self.path.parent} is in use by {who}, which cannot be checked from here: wait for it to end, "
                f"use another --workdir, or, if you know that run is gone, remove {self.path}"
            )
        if weights_io.process_alive(int(holder["pid"])):
            raise CheckpointError(
                f"{self.path.parent} is in use by {who}: wait for it to end (or stop it) or use another --workdir; "
                f"{remove}"
            )
        print(f"warning: taking over {self.path} from {who}, which runs no more", file=sys.stderr, flush=True)
        self.path.unlink(missing_ok=True)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _saved_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def _newest_readable(directory: epath.Path, steps: list[int], read: Callable[[int], Any]) -> tuple[int, Any]:
    """(step, ``read(step)``) of the newest of ``steps`` that reads; each newer one is named in a warning."""
    for step in sorted(steps, reverse=True):
        try:
            return step, read(step)
        except Exception as error:  # whatever Orbax, TensorStore or JSON raise on truncated or garbled files
            print(
                f"warning: the checkpoint {directory / str(step)} cannot be read ({_one_line(error)}); "
                "trying the one before it",
                file=sys.stderr,
                flush=True,
            )
    raise CheckpointError(
        f"none of the checkpoints in {directory} (steps {', '.join(map(str, sorted(steps)))}) can be read (the "
        "warnings above say why): restore them from a copy, or move the folder away to start anew"
    )


def _one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text if len(text) <= 400 else text[:400] + '...'}"


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs of ``state``'s arrays, keeping their shardings (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ---------------------------------------------------------------------------------------------
# Reading a run's trained UNet back (sample, export), without the optimizer state.

WEIGHTS = {"ema": "ema_params", "student": "params"}  # --weights choice -> TrainState field


class CheckpointError(ValueError):
    """A WORKDIR without checkpoints, or without the one asked for."""


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run's folder (it has a checkpoints/ subfolder)."""
    return (epath.Path(path) / "checkpoints").is_dir()


def run_config(workdir: str | os.PathLike, *, step: int | None = None) -> tuple[int, dict]:
    """(step, the run's config dict) of a run's checkpoint ``step`` (None: the newest readable); reads no weights.

    Readable: its config and the index of its state's arrays read (the arrays' data are not read).
    """

    def read(s: int) -> dict:
        _state_metadata(directory / str(s) / "state")
        return _saved_config(manager, s)

    with _reader(workdir) as (directory, manager, steps):
        return _read(directory, steps, step, read)


def trained_unet(workdir: str | os.PathLike, *, step: int | None = None, weights: str = "ema") -> tuple[int, Any, dict]:
    """(step, UNet parameters as numpy float32, the run's config dict) of a run's checkpoint.

    Only the chosen weights are read (the optimizer state, twice the parameters, stays on disk). A
    LoRA run's (``config.model.lora_rank`` > 0) are its adapters, whatever ``weights`` says: it keeps no EMA.

    Args:
      workdir: the run's folder (``--workdir`` of python -m perflow_jax.train).
      step: the checkpoint's step; None for the newest that can be read.
      weights: "ema" (the EMA of the student, what the reference releases) or "student".
    """
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    field = WEIGHTS[weights]

    def read(s: int) -> tuple[Any, dict]:
        config = _saved_config(manager, s)
        state_dir = directory / str(s) / "state"
        metadata = _state_metadata(state_dir)
        saved_field = field if metadata[field] is not None else WEIGHTS["student"]  # a LoRA run has no EMA
        saved = metadata[saved_field]
        with ocp.PyTreeCheckpointer() as checkpointer:
            item = {saved_field: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
            return checkpointer.restore(state_dir, args=args)[saved_field], config

    with _reader(workdir) as (directory, manager, steps):
        step, (params, config) = _read(directory, steps, step, read)
    return step, params, config


def _state_metadata(state_dir: epath.Path) -> dict[str, Any]:
    """The tree of a checkpoint's state's array metadata (shapes, dtypes)."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.metadata(state_dir).item_metadata.tree


@contextlib.contextmanager
def _reader(workdir: str | os.PathLike) -> Iterator[tuple[epath.Path, ocp.CheckpointManager, list[int]]]:
    """(checkpoints folder, a read-only CheckpointManager of it, its steps); CheckpointError if there are none."""
    directory = paths.absolute(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{workdir} has no checkpoints yet (nothing in {directory}): train first")
        yield directory, manager, steps


def _read(directory: epath.Path, steps: list[int], step: int | None, read: Callable[[int], Any]) -> tuple[int, Any]:
    """(step, ``read(step)``); step None: the newest that reads (``_newest_readable``)."""
    if step is None:
        return _newest_readable(directory, steps, read)
    if step not in steps:
        raise CheckpointError(
            f"{directory.parent} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}"
        )
    try:
        return step, read(step)
    except Exception as error:  # as in _newest_readable
        raise CheckpointError(
            f"the checkpoint {directory / str(step)} cannot be read ({_one_line(error)}): give another step (it "
            f"has steps {', '.join(map(str, steps))}), or none for the newest readable one"
        ) from None
