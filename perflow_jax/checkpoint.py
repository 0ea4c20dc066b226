"""Training checkpoints: Orbax CheckpointManager in WORKDIR/checkpoints.

Each checkpoint holds the train state (student, optimizer, EMA, step), the grain iterator's
position (one small JSON per process) and the run's config; saving is asynchronous, and Orbax
commits a checkpoint only once it is complete, so an interrupted save leaves no half-written
checkpoint behind, and the previous ones stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"


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
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(data_iterator),
                    CONFIG: ocp.args.JsonSave(config),
                }
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
                **{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: grain.checkpoint.CheckpointRestore(data_iterator),
                    CONFIG: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[STATE], restored[CONFIG]

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config a checkpoint was saved with (without touching its state)."""
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs of ``state``'s arrays, keeping their shardings (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
