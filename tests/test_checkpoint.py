"""Training checkpoints: state, data position and config saved together, restored exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import checkpoint, data
from perflow_jax.step import TrainState


@pytest.fixture
def prepared(tmp_path):
    """A prepared data folder of 40 examples whose mean holds the example's index."""
    folder = tmp_path / "data"
    folder.mkdir()
    records = [
        data.encode_record({"key": str(i), "caption": "c", "mean": np.full((2, 2, 4), i, np.float16),
                            "logvar": np.zeros((2, 2, 4), np.float16), "input_ids": np.full(77, i, np.int32),
                            "original_size": np.array([8, 8], np.int32), "crop_top_left": np.zeros(2, np.int32)})
        for i in range(40)
    ]  # fmt: skip
    data.write_shard(folder / "shard-00000.array_record", records)
    data.write_manifest(
        folder, {"count": 40, "resolution": 8, "shards": [{"file": "shard-00000.array_record", "count": 40}]}
    )
    return folder


def state(value: float) -> TrainState:
    params = {"w": jnp.full((3, 4), value), "b": jnp.arange(4.0) + value}
    return TrainState(step=jnp.array(int(value), jnp.int32), params=params, opt_state=(params,), ema_params=params)


def ids(batch) -> list[int]:
    return [int(x) for x in batch["mean"][:, 0, 0, 0]]


def test_restore_gives_the_state_the_config_and_the_data_position(tmp_path, prepared):
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    for _ in range(3):
        next(iterator)
    ckpt = checkpoint.Checkpoints(tmp_path / "run", keep=2)
    ckpt.save(3, state(3.0), iterator, {"optim": {"lr": 1e-4}})
    expected_next = [ids(next(iterator)) for _ in range(12)]  # crosses the epoch boundary (10 batches)
    ckpt.close()

    fresh = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    reopened = checkpoint.Checkpoints(tmp_path / "run", keep=2)
    assert reopened.latest_step() == 3
    restored, config = reopened.restore(3, checkpoint.abstract_like(state(0.0)), fresh)
    assert config == {"optim": {"lr": 1e-4}} and reopened.saved_config(3) == config
    assert int(restored.step) == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state(3.0)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [ids(next(fresh)) for _ in range(12)] == expected_next


def test_only_the_newest_checkpoints_are_kept(tmp_path, prepared):
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    ckpt = checkpoint.Checkpoints(tmp_path / "run", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state(float(step)), iterator, {})
        ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_an_uncommitted_save_is_not_a_checkpoint(tmp_path, prepared):
    """A save that never finished (a leftover temporary folder) is ignored; the last one is restored."""
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    ckpt = checkpoint.Checkpoints(tmp_path / "run")
    ckpt.save(1, state(1.0), iterator, {})
    ckpt.close()
    (tmp_path / "run/checkpoints/2.orbax-checkpoint-tmp").mkdir()  # what an interrupted save leaves
    reopened = checkpoint.Checkpoints(tmp_path / "run")
    assert reopened.latest_step() == 1
