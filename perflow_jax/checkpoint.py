"""Training checkpoints: Orbax CheckpointManager in WORKDIR/checkpoints.

Each checkpoint holds the train state (student, optimizer, EMA, step), the grain iterator's
position (one small JSON per process) and the run's config; saving is asynchronous, and Orbax
commits a checkpoint only once it is complete, so an interrupted save leaves no half-written
checkpoint behind, and the previous ones stay.

The random state needs no key of its own: step n draws with
``fold_in(key(config.train.seed), n)``, and both the seed (in the saved config, which a resumed
run may not change) and the step are in the checkpoint, so a resumed run draws what an
uninterrupted one would (``tests/test_train.py``, SIGTERM then resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """Save and restore a training run's checkpoints.

    Args:
      workdir: the run's folder; checkpoints go to ``workdir/checkpoints/<step>``.
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, workdir: str | Path, *, keep: int = 3):
        directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, config: dict[str, Any]) -> None:
        """Start saving (returns before the write ends; ``wait`` blocks until it is committed)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

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

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config a checkpoint was saved with (without touching its state)."""
        return _saved_config(self.manager, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _saved_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs of ``state``'s arrays, keeping their shardings (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ---------------------------------------------------------------------------------------------
# Reading a run's trained UNet back (sample, export), without the optimizer state.

WEIGHTS = {"ema": "ema_params", "student": "params"}  # --weights choice -> TrainState field


class CheckpointError(ValueError):
    """A WORKDIR without checkpoints, or without the one asked for."""


def is_workdir(path: str | Path) -> bool:
    """Whether ``path`` is a training run's folder (it has a checkpoints/ subfolder)."""
    return (Path(path) / "checkpoints").is_dir()


def run_config(workdir: str | Path, *, step: int | None = None) -> tuple[int, dict]:
    """(step, the run's config dict) of a run's checkpoint ``step`` (None: the newest); reads no weights."""
    directory = Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{workdir} has no checkpoints yet (nothing in {directory}): train first")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"{workdir} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}"
            )
        return step, _saved_config(manager, step)


def trained_unet(workdir: str | Path, *, step: int | None = None, weights: str = "ema") -> tuple[int, Any, dict]:
    """(step, UNet parameters as numpy float32, the run's config dict) of a run's checkpoint.

    Only the chosen weights are read (the optimizer state, twice the parameters, stays on disk).

    Args:
      workdir: the run's folder (``--workdir`` of python -m perflow_jax.train).
      step: the checkpoint's step; None for the newest.
      weights: "ema" (the EMA of the student, what the reference releases) or "student".
    """
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    step, config = run_config(workdir, step=step)
    state_dir = Path(workdir).absolute() / "checkpoints" / str(step) / "state"
    field = WEIGHTS[weights]
    with ocp.PyTreeCheckpointer() as checkpointer:
        saved = checkpointer.metadata(state_dir).item_metadata.tree[field]
        item = {field: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        restored = checkpointer.restore(state_dir, args=args)
    return step, restored[field], config
